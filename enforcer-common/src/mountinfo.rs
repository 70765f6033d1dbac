//! Reading /proc/self/mountinfo (host side only).

use std::path::PathBuf;

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
    /// Per-mount options (`rw` or `ro` first).
    pub options: String,
    /// The optional fields: propagation (`shared:N`, `master:N`), which
    /// containerd checks for HostToContainer mounts.
    pub propagation: Vec<String>,
    /// Per-superblock options; for cgroup v1 they name the controllers.
    pub super_options: String,
}

impl Mount {
    /// Whether this mount lets its users write (per-mount `ro` is absent).
    pub fn writable(&self) -> bool {
        !self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo text, skipping lines it cannot read.
pub fn parse(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split_whitespace();
            let fstype = right.next()?.to_owned();
            let super_options = right.nth(1).unwrap_or_default().to_owned();
            let mut left = left.split_whitespace();
            let point = PathBuf::from(unescape_mountinfo(left.nth(4)?));
            let options = left.next()?.to_owned();
            let propagation = left.map(str::to_owned).collect();
            Some(Mount {
                point,
                fstype,
                options,
                propagation,
                super_options,
            })
        })
        .collect()
}

/// Finds the mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo`
/// text: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    parse(mountinfo)
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        let value = octal
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(b) = value {
            out.push(b);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn propagation_fields_are_kept() {
        let propagation: Vec<Vec<String>> =
            parse(HYBRID).into_iter().map(|m| m.propagation).collect();
        assert_eq!(propagation[1], ["shared:9"]);
        assert_eq!(parse(IN_POD)[0].propagation, ["master:10"]);
    }

    #[test]
    fn per_mount_options_tell_read_only() {
        let writable: Vec<(String, bool)> = parse(HYBRID)
            .into_iter()
            .map(|m| (m.point.display().to_string(), m.writable()))
            .collect();
        assert_eq!(
            writable,
            [
                ("/sys".to_owned(), true),
                ("/sys/fs/cgroup".to_owned(), false),
                ("/sys/fs/cgroup/unified".to_owned(), true),
                ("/sys/fs/cgroup/systemd".to_owned(), true),
            ]
        );
    }

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mountinfo(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape_mountinfo(r"plain"), "plain");
    }
}
