//! Start-up checks: say clearly and early what is wrong with the node,
//! instead of attaching programs that would never run.

use std::path::{Path, PathBuf};

use enforcer_common::mountinfo::{self, Mount};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "this node has cgroup v1 only: imds-guard needs the cgroup v2 hierarchy \
         (boot with systemd.unified_cgroup_hierarchy=1, or hybrid mode)"
    )]
    CgroupV1Only,
    #[error("no cgroup v2 filesystem is mounted: imds-guard needs cgroup v2")]
    NoCgroup2,
    #[error(
        "hybrid cgroups with the v1 {controllers} controller(s) mounted on kernel {kernel} \
         (older than 5.15): sockets fall back to the root cgroup and programs on a \
         subtree never run. Unmount {controllers}, or use kernel 5.15 or newer"
    )]
    NetClsOnOldKernel { controllers: String, kernel: String },
    #[error(
        "bpffs is not mounted at or above {path} (found {found}): mount it with \
         `mount -t bpf bpf /sys/fs/bpf` (in a DaemonSet, mount the host's /sys/fs/bpf)"
    )]
    NoBpffs { path: PathBuf, found: String },
    #[error(
        "refusePacketSockets needs the bpf LSM, which is not active on this kernel \
         (active: {active}): add bpf to lsm= on the kernel command line, or turn \
         refusePacketSockets off"
    )]
    NoBpfLsm { active: String },
    #[error(
        "refusePacketSockets needs CAP_PERFMON (BPF LSM programs are tracing programs): \
         use deploy/overlays/packet-socket-lsm, or turn refusePacketSockets off"
    )]
    NoPerfmon,
    #[error(
        "refusePacketSockets needs the kernel's BTF at /sys/kernel/btf/vmlinux \
         (CONFIG_DEBUG_INFO_BTF), which this kernel does not have"
    )]
    NoKernelBtf,
    #[error(
        "refusePacketSockets needs Linux 5.13 or newer, whose BPF LSM programs may read the \
         caller's cgroup ancestors (bpf_get_current_ancestor_cgroup_id); this kernel is \
         {kernel}: turn refusePacketSockets off on this node"
    )]
    LsmKernelTooOld { kernel: String },
}

/// The active security modules, from securityfs or, where it is not
/// mounted (a container), the kernel command line's `lsm=`; `None` when
/// neither says.
pub fn active_lsms() -> Option<String> {
    if let Ok(list) = std::fs::read_to_string("/sys/kernel/security/lsm") {
        return Some(list.trim().to_owned());
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    lsm_from_cmdline(&cmdline).map(str::to_owned)
}

/// The value of `lsm=` on a kernel command line (the last one wins).
fn lsm_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("lsm="))
        .next_back()
}

/// Whether a list of active security modules (`lsm=`'s form) has `bpf`.
pub fn bpf_lsm_listed(active: &str) -> bool {
    active.split(',').any(|m| m.trim() == "bpf")
}

/// Where the kernel's BTF is, which BPF LSM programs are typed against.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What the BPF LSM program's load and run depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LsmFacts {
    /// Effective capabilities.
    pub effective: u64,
    pub kernel: String,
    /// Whether [`KERNEL_BTF`] exists.
    pub kernel_btf: bool,
    /// [`active_lsms`].
    pub active_lsms: Option<String>,
}

impl LsmFacts {
    /// This process on this machine.
    pub fn of_this_process(effective: u64) -> LsmFacts {
        LsmFacts {
            effective,
            kernel: super::kernel::release(),
            kernel_btf: Path::new(KERNEL_BTF).exists(),
            active_lsms: active_lsms(),
        }
    }

    /// What loading and running the BPF LSM program needs: `CAP_PERFMON`
    /// (or `CAP_SYS_ADMIN`), Linux 5.13 (the cgroup helper), the kernel's
    /// BTF, and `bpf` among the active security modules. `Ok(false)` when
    /// the active modules cannot be read (then the attach is tried).
    pub fn check(&self) -> Result<bool, PreflightError> {
        use super::privilege::{CAP_PERFMON, CAP_SYS_ADMIN, holds};
        if !holds(self.effective, CAP_PERFMON) && !holds(self.effective, CAP_SYS_ADMIN) {
            return Err(PreflightError::NoPerfmon);
        }
        if super::kernel::version(&self.kernel).is_none_or(|v| v < (5, 13)) {
            return Err(PreflightError::LsmKernelTooOld {
                kernel: self.kernel.clone(),
            });
        }
        if !self.kernel_btf {
            return Err(PreflightError::NoKernelBtf);
        }
        match &self.active_lsms {
            Some(active) if !bpf_lsm_listed(active) => Err(PreflightError::NoBpfLsm {
                active: active.clone(),
            }),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }
}

/// Checks this process and machine can run the BPF LSM program
/// ([`LsmFacts::check`]).
pub fn check_bpf_lsm(effective: u64) -> Result<(), PreflightError> {
    if !LsmFacts::of_this_process(effective).check()? {
        tracing::warn!(
            "cannot tell whether the bpf LSM is active (no /sys/kernel/security/lsm, \
             no lsm= on the command line): sockets are refused only if it is"
        );
    }
    Ok(())
}

/// Checks the cgroup setup of a node from its mountinfo and kernel release.
pub fn check_cgroups(mounts: &[Mount], kernel_release: &str) -> Result<(), PreflightError> {
    let v1: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup").collect();
    if !mounts.iter().any(|m| m.fstype == "cgroup2") {
        return Err(if v1.is_empty() {
            PreflightError::NoCgroup2
        } else {
            PreflightError::CgroupV1Only
        });
    }
    // Before 5.15, a socket whose task uses net_cls or net_prio loses its
    // cgroup v2 pointer and is charged to the root cgroup.
    let controllers: Vec<&str> = ["net_cls", "net_prio"]
        .into_iter()
        .filter(|c| {
            v1.iter()
                .any(|m| m.super_options.split(',').any(|o| o == *c))
        })
        .collect();
    let old = super::kernel::version(kernel_release).is_none_or(|v| v < (5, 15));
    if !controllers.is_empty() && old {
        return Err(PreflightError::NetClsOnOldKernel {
            controllers: controllers.join(" and "),
            kernel: kernel_release.to_owned(),
        });
    }
    Ok(())
}

/// Checks that `path` (the pin root) lies on a bpffs mount.
pub fn check_bpffs(mounts: &[Mount], path: &Path) -> Result<(), PreflightError> {
    let covering = mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len());
    match covering {
        Some(m) if m.fstype == "bpf" => Ok(()),
        other => Err(PreflightError::NoBpffs {
            path: path.to_path_buf(),
            found: other.map_or_else(
                || "nothing".to_owned(),
                |m| format!("{} at {}", m.fstype, m.point.display()),
            ),
        }),
    }
}

/// The mounts at or below `cgroup_root` that are writable. The daemon only
/// reads the hierarchy; a DaemonSet's read-only hostPath of a hybrid host's
/// /sys/fs/cgroup still leaves the cgroup2 submount writable unless the
/// runtime makes it read-only recursively.
pub fn writable_mounts_under<'a>(mounts: &'a [Mount], cgroup_root: &Path) -> Vec<&'a Mount> {
    mounts
        .iter()
        .filter(|m| m.point.starts_with(cgroup_root) && m.writable())
        .collect()
}

/// Warns, naming each, about writable mounts of the cgroup hierarchy
/// (Kubernetes mode, where the manifest promises a read-only one).
pub fn warn_writable_cgroup_mounts(cgroup_root: &Path) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts = mountinfo::parse(&text);
    for mount in writable_mounts_under(&mounts, cgroup_root) {
        tracing::warn!(
            mount = %mount.point.display(),
            fstype = %mount.fstype,
            "the cgroup hierarchy is writable here, and imds-guard only reads it: mount the \
             cgroup2 filesystem itself read-only (deploy/overlays/hybrid-cgroups on hybrid \
             hosts), or use recursiveReadOnly with a runtime that supports it"
        );
    }
}

/// Runs every check against this machine.
pub fn check_node(pin_root: &Path) -> Result<(), PreflightError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts = mountinfo::parse(&text);
    check_cgroups(&mounts, &super::kernel::release())?;
    check_bpffs(&mounts, pin_root)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn finds_lsm_on_a_kernel_command_line() {
        let cases = [
            ("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet", None),
            (
                "console=ttyS0 lsm=lockdown,yama,apparmor,bpf",
                Some("lockdown,yama,apparmor,bpf"),
            ),
            ("lsm=landlock lsm=landlock,bpf splash", Some("landlock,bpf")),
        ];
        for (cmdline, want) in cases {
            assert_eq!(lsm_from_cmdline(cmdline), want, "{cmdline}");
        }
    }

    /// A writable mount, for tests that build a node's mount table.
    pub(crate) fn mount(point: &str, fstype: &str, options: &str) -> Mount {
        Mount {
            point: point.into(),
            fstype: fstype.to_owned(),
            options: "rw".to_owned(),
            propagation: Vec::new(),
            super_options: options.to_owned(),
        }
    }

    #[test]
    fn writable_cgroup_mounts_are_named() {
        let read_only = |point: &str, fstype: &str| Mount {
            options: "ro,nosuid".to_owned(),
            ..mount(point, fstype, "")
        };
        // A hybrid host's /sys/fs/cgroup bound read-only, not recursively.
        let hybrid_bind = vec![
            read_only("/host/sys/fs/cgroup", "tmpfs"),
            mount("/host/sys/fs/cgroup/unified", "cgroup2", "rw"),
            read_only("/host/sys/fs/cgroup/memory", "cgroup"),
            mount("/host/sys/fs/bpf", "bpf", "rw"),
        ];
        let writable: Vec<&Path> =
            writable_mounts_under(&hybrid_bind, Path::new("/host/sys/fs/cgroup"))
                .iter()
                .map(|m| m.point.as_path())
                .collect();
        assert_eq!(writable, [Path::new("/host/sys/fs/cgroup/unified")]);
        let cgroup2_itself = vec![read_only("/host/sys/fs/cgroup", "cgroup2")];
        assert!(
            writable_mounts_under(&cgroup2_itself, Path::new("/host/sys/fs/cgroup")).is_empty()
        );
    }

    #[test]
    fn cgroup_setups() {
        let unified = vec![mount("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate")];
        let hybrid = vec![
            mount("/sys/fs/cgroup/unified", "cgroup2", "rw"),
            mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
        ];
        let hybrid_net_cls = vec![
            mount("/sys/fs/cgroup/unified", "cgroup2", "rw"),
            mount(
                "/sys/fs/cgroup/net_cls,net_prio",
                "cgroup",
                "rw,net_cls,net_prio",
            ),
        ];
        let v1_only = vec![mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory")];
        let cases: [(&[Mount], &str, Result<(), PreflightError>); 6] = [
            (&unified, "6.1.0", Ok(())),
            (&hybrid, "6.18.44", Ok(())),
            (&hybrid_net_cls, "6.18.44", Ok(())),
            (
                &hybrid_net_cls,
                "5.10.0",
                Err(PreflightError::NetClsOnOldKernel {
                    controllers: "net_cls and net_prio".to_owned(),
                    kernel: "5.10.0".to_owned(),
                }),
            ),
            (&v1_only, "6.1.0", Err(PreflightError::CgroupV1Only)),
            (&[], "6.1.0", Err(PreflightError::NoCgroup2)),
        ];
        for (mounts, kernel, want) in cases {
            assert_eq!(check_cgroups(mounts, kernel), want, "{mounts:?} {kernel}");
        }
    }

    #[test]
    fn bpffs_must_cover_the_pin_root() {
        let with = vec![mount("/", "ext4", "rw"), mount("/sys/fs/bpf", "bpf", "rw")];
        let without = vec![mount("/", "ext4", "rw"), mount("/sys", "sysfs", "rw")];
        let root = Path::new("/sys/fs/bpf/imds-guard");
        assert_eq!(check_bpffs(&with, root), Ok(()));
        let err = check_bpffs(&without, root).unwrap_err().to_string();
        assert!(err.contains("found sysfs at /sys"), "{err}");
        assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
    }
}
