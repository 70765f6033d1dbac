//! What a node offers a container: its mounts with their propagation
//! (which containerd checks for HostToContainer), its kernel and cgroup
//! mode, and whether AppArmor is on.

use std::path::Path;

use enforcer_common::mountinfo::{self, Mount};

use super::{BundleError, Result, io_error};

/// What the node offers the bundle: its mounts, kernel and cgroup mode.
#[derive(Clone, Debug)]
pub struct Node {
    pub mounts: Vec<Mount>,
    pub kernel: (u32, u32),
    /// AppArmor is enabled: containerd would load its own profile.
    pub apparmor: bool,
}

impl Node {
    /// This machine, as the test process sees it.
    pub fn this_machine() -> Result<Node> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_error("reading", "/proc/self/mountinfo"))?;
        let release = nix::sys::utsname::uname()
            .map_err(|e| BundleError::Runtime(format!("uname: {e}")))?
            .release()
            .to_string_lossy()
            .into_owned();
        let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.trim() == "Y");
        Ok(Node::from_parts(&mountinfo, &release, apparmor))
    }

    pub fn from_parts(mountinfo: &str, kernel_release: &str, apparmor: bool) -> Node {
        let mut numbers = kernel_release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        let kernel = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        Node {
            mounts: mountinfo::parse(mountinfo),
            kernel,
            apparmor,
        }
    }

    /// The mount `path` lies on (the last of stacked mounts wins).
    pub fn mount_of(&self, path: &Path) -> Option<&Mount> {
        self.mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path.starts_with(&m.point))
            .max_by_key(|(i, m)| (m.point.components().count(), *i))
            .map(|(_, m)| m)
    }

    /// /sys/fs/cgroup is cgroup2: containerd then gives each container a
    /// cgroup namespace.
    pub fn unified_cgroups(&self) -> bool {
        self.mount_of(Path::new("/sys/fs/cgroup"))
            .is_some_and(|m| m.fstype == "cgroup2" && m.point == Path::new("/sys/fs/cgroup"))
    }

    /// cgroup v1 hierarchies at /sys/fs/cgroup/*, cgroup2 below them.
    pub fn hybrid_cgroups(&self) -> bool {
        !self.unified_cgroups() && self.mounts.iter().any(|m| m.fstype == "cgroup2")
    }
}
