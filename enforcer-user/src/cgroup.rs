//! Finding the cgroup v2 hierarchy and naming cgroups by the ids the kernel
//! reports (the inode number of the cgroup directory).

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// statfs magic of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (read {mountinfo}); imds-guard needs cgroup v2")]
    NoCgroup2Mount { mountinfo: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory (it is not on a cgroup2 filesystem)")]
    NotCgroup2 { path: PathBuf },
    #[error("{path} is not under the cgroup v2 mount {mount}")]
    OutsideMount { path: PathBuf, mount: PathBuf },
}

/// Finds the mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo`
/// text: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        if let Some(value) = octal.and_then(|o| std::str::from_utf8(o).ok()) {
            if let Ok(b) = u8::from_str_radix(value, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 hierarchy's mount point on this machine.
pub fn detect_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&mountinfo).map_err(|source| CgroupError::Read {
        path: mountinfo.clone(),
        source,
    })?;
    find_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2Mount { mountinfo })
}

/// An open cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    file: File,
    id: u64,
}

impl CgroupDir {
    /// Opens `path`, which must be a directory on the cgroup v2 filesystem
    /// mounted at `mount`. A relative path is taken relative to `mount`.
    pub fn open(path: &Path, mount: &Path) -> Result<CgroupDir, CgroupError> {
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            mount.join(path)
        };
        let read_err = |source| CgroupError::Read {
            path: joined.clone(),
            source,
        };
        let canonical = joined.canonicalize().map_err(read_err)?;
        let canonical_mount = mount.canonicalize().map_err(|source| CgroupError::Read {
            path: mount.to_path_buf(),
            source,
        })?;
        if !canonical.starts_with(&canonical_mount) {
            return Err(CgroupError::OutsideMount {
                path: canonical,
                mount: canonical_mount,
            });
        }
        let file = File::open(&canonical).map_err(read_err)?;
        let stat = nix::sys::statfs::fstatfs(&file).map_err(|errno| read_err(errno.into()))?;
        if !file.metadata().map_err(read_err)?.is_dir()
            || i64::from(stat.filesystem_type().0) != CGROUP2_SUPER_MAGIC
        {
            return Err(CgroupError::NotCgroup2 { path: canonical });
        }
        let id = file.metadata().map_err(read_err)?.ino();
        Ok(CgroupDir {
            path: canonical,
            file,
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel reports for this cgroup (`bpf_get_current_cgroup_id`).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Finds the directory of the cgroup with id `id` below `root` (inclusive),
/// for naming cgroups in reports. Unreadable directories are skipped.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            return Some(dir);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        pending.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";
    const UNIFIED: &str = "\
24 31 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V1_ONLY: &str = "\
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 33 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
";
    // A DaemonSet that mounts the host's hierarchy somewhere of its own.
    const IN_POD: &str = "\
700 690 0:29 / /host/sys\\040fs/cgroup rw,relatime master:10 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup2_mount_on_real_layouts() {
        let cases = [
            (HYBRID, Some("/sys/fs/cgroup/unified")),
            (UNIFIED, Some("/sys/fs/cgroup")),
            (V1_ONLY, None),
            (IN_POD, Some("/host/sys fs/cgroup")),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(find_cgroup2_mount(text), want.map(PathBuf::from), "{text}");
        }
    }

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mountinfo(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape_mountinfo(r"plain"), "plain");
    }
}
