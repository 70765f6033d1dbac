//! Finding the cgroup v2 hierarchy and naming cgroups by the ids the kernel
//! reports (the inode number of the cgroup directory).

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

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

/// The cgroup v2 hierarchy's mount point on this machine.
pub fn detect_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&mountinfo).map_err(|source| CgroupError::Read {
        path: mountinfo.clone(),
        source,
    })?;
    enforcer_common::mountinfo::find_cgroup2_mount(&text)
        .ok_or(CgroupError::NoCgroup2Mount { mountinfo })
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
            || stat.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC
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
