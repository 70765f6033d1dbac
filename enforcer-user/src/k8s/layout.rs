//! Where the kubelet puts pod cgroups, for both cgroup drivers and the
//! nested layouts kind uses (reading a pod back out of a cgroup path is
//! `host::identity`).

use std::path::{Path, PathBuf};

/// The kubelet's cgroup driver, as seen in the directory names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods/burstable/pod<uid>`
    Cgroupfs,
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`
    Systemd,
}

/// Pod subtree bases, relative to the cgroup2 root, in probing order: the
/// usual node layouts first, then kind's nodes-in-containers.
pub const KNOWN_BASES: [(&str, Driver); 4] = [
    ("kubepods.slice", Driver::Systemd),
    ("kubepods", Driver::Cgroupfs),
    ("kubelet.slice/kubelet-kubepods.slice", Driver::Systemd),
    ("kubelet/kubepods", Driver::Cgroupfs),
];

/// A pod's quality-of-service class (`status.qosClass`): Guaranteed pods
/// sit directly under the base, the others one level down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn from_status(class: &str) -> Option<Qos> {
        match class {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    fn dir_word(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// What the layout code needs of a file system, so tests can fake one.
pub trait DirTree {
    fn is_dir(&self, path: &Path) -> bool;
    fn subdirs(&self, path: &Path) -> Vec<PathBuf>;
}

/// The real file system.
pub struct RealDirs;

impl DirTree for RealDirs {
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn subdirs(&self, path: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The pod subtree of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLayout {
    /// Absolute path of the base (e.g. `/sys/fs/cgroup/kubepods.slice`).
    pub base: PathBuf,
    pub driver: Driver,
}

/// The systemd spelling of a pod UID: unit names cannot carry dashes.
fn systemd_uid(uid: &str) -> String {
    uid.replace('-', "_")
}

impl PodLayout {
    /// Probes the known bases under the cgroup2 root; the first that exists wins.
    pub fn detect(root: &Path, dirs: &dyn DirTree) -> Option<PodLayout> {
        KNOWN_BASES.iter().find_map(|(relative, driver)| {
            let base = root.join(relative);
            dirs.is_dir(&base).then_some(PodLayout {
                base,
                driver: *driver,
            })
        })
    }

    /// An explicitly given base; the driver follows from its name.
    pub fn at(base: PathBuf) -> PodLayout {
        let driver = if base.extension().is_some_and(|e| e == "slice") {
            Driver::Systemd
        } else {
            Driver::Cgroupfs
        };
        PodLayout { base, driver }
    }

    /// The slice name prefix of a systemd base: `kubepods`, or
    /// `kubelet-kubepods` in kind's nested layout.
    fn slice_prefix(&self) -> String {
        self.base
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".slice").to_owned())
            .unwrap_or_default()
    }

    /// Where the kubelet puts the pod-level cgroup of `uid` with `qos`.
    pub fn pod_dir(&self, uid: &str, qos: Qos) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => match qos.dir_word() {
                None => self.base.join(format!("pod{uid}")),
                Some(word) => self.base.join(word).join(format!("pod{uid}")),
            },
            Driver::Systemd => {
                let prefix = self.slice_prefix();
                let uid = systemd_uid(uid);
                match qos.dir_word() {
                    None => self.base.join(format!("{prefix}-pod{uid}.slice")),
                    Some(word) => self
                        .base
                        .join(format!("{prefix}-{word}.slice"))
                        .join(format!("{prefix}-{word}-pod{uid}.slice")),
                }
            }
        }
    }

    /// Finds the pod's cgroup: where its QoS class says, or else by looking
    /// for its UID in either spelling in the two levels under the base.
    pub fn find_pod_dir(&self, uid: &str, qos: Option<Qos>, dirs: &dyn DirTree) -> Option<PathBuf> {
        if let Some(expected) = qos.map(|q| self.pod_dir(uid, q))
            && dirs.is_dir(&expected)
        {
            return Some(expected);
        }
        let names = [format!("pod{uid}"), format!("pod{}", systemd_uid(uid))];
        let matches = |dir: &Path| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| {
                    names.iter().any(|want| {
                        n.ends_with(want.as_str()) || n.ends_with(&format!("{want}.slice"))
                    })
                })
        };
        let first = dirs.subdirs(&self.base);
        first.iter().find(|d| matches(d)).cloned().or_else(|| {
            first
                .iter()
                .flat_map(|d| dirs.subdirs(d))
                .find(|d| matches(d))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const UID: &str = "6f1c2a8e-3b7d-4e2f-9a1b-0c4d5e6f7a8b";
    const UID_: &str = "6f1c2a8e_3b7d_4e2f_9a1b_0c4d5e6f7a8b";

    struct FakeDirs(BTreeSet<PathBuf>);

    impl FakeDirs {
        fn new(paths: &[&str]) -> FakeDirs {
            let mut all = BTreeSet::new();
            for p in paths {
                // Every ancestor of a directory exists too.
                for ancestor in Path::new(p).ancestors() {
                    all.insert(ancestor.to_path_buf());
                }
            }
            FakeDirs(all)
        }
    }

    impl DirTree for FakeDirs {
        fn is_dir(&self, path: &Path) -> bool {
            self.0.contains(path)
        }
        fn subdirs(&self, path: &Path) -> Vec<PathBuf> {
            self.0
                .iter()
                .filter(|p| p.parent() == Some(path))
                .cloned()
                .collect()
        }
    }

    #[test]
    fn detects_the_base_of_each_real_layout() {
        let root = Path::new("/sys/fs/cgroup");
        let cases = [
            ("/sys/fs/cgroup/kubepods.slice", Driver::Systemd),
            ("/sys/fs/cgroup/kubepods", Driver::Cgroupfs),
            (
                "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice",
                Driver::Systemd,
            ),
            ("/sys/fs/cgroup/kubelet/kubepods", Driver::Cgroupfs),
        ];
        for (base, driver) in cases {
            let dirs = FakeDirs::new(&[base, "/sys/fs/cgroup/system.slice"]);
            assert_eq!(
                PodLayout::detect(root, &dirs),
                Some(PodLayout {
                    base: base.into(),
                    driver
                }),
                "{base}"
            );
        }
        assert_eq!(
            PodLayout::detect(root, &FakeDirs::new(&["/sys/fs/cgroup/system.slice"])),
            None
        );
        assert_eq!(
            PodLayout::at("/x/kubepods.slice".into()).driver,
            Driver::Systemd
        );
        assert_eq!(PodLayout::at("/x/kubepods".into()).driver, Driver::Cgroupfs);
    }

    #[test]
    fn pod_dirs_for_every_driver_and_qos_class() {
        let systemd = PodLayout::at("/c/kubepods.slice".into());
        let kind_systemd = PodLayout::at("/c/kubelet.slice/kubelet-kubepods.slice".into());
        let cgroupfs = PodLayout::at("/c/kubepods".into());
        let kind_cgroupfs = PodLayout::at("/c/kubelet/kubepods".into());
        let cases = [
            (
                &systemd,
                Qos::Guaranteed,
                format!("/c/kubepods.slice/kubepods-pod{UID_}.slice"),
            ),
            (
                &systemd,
                Qos::Burstable,
                format!(
                    "/c/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
            ),
            (
                &systemd,
                Qos::BestEffort,
                format!(
                    "/c/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
            ),
            (
                &kind_systemd,
                Qos::Burstable,
                format!(
                    "/c/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice"
                ),
            ),
            (&cgroupfs, Qos::Guaranteed, format!("/c/kubepods/pod{UID}")),
            (
                &cgroupfs,
                Qos::Burstable,
                format!("/c/kubepods/burstable/pod{UID}"),
            ),
            (
                &kind_cgroupfs,
                Qos::BestEffort,
                format!("/c/kubelet/kubepods/besteffort/pod{UID}"),
            ),
        ];
        for (layout, qos, want) in cases {
            assert_eq!(
                layout.pod_dir(UID, qos),
                PathBuf::from(&want),
                "{layout:?} {qos:?}"
            );
        }
    }

    #[test]
    fn finds_pods_by_scanning_when_the_qos_class_is_wrong_or_unknown() {
        let layout = PodLayout::at("/c/kubepods.slice".into());
        let actual = format!(
            "/c/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        );
        let dirs = FakeDirs::new(&[
            &format!("{actual}/cri-containerd-abc.scope"),
            "/c/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_2222_3333_4444_555555555555.slice",
        ]);
        for qos in [Some(Qos::Burstable), None, Some(Qos::BestEffort)] {
            assert_eq!(
                layout.find_pod_dir(UID, qos, &dirs),
                Some(PathBuf::from(&actual)),
                "{qos:?}"
            );
        }
        let cgroupfs = PodLayout::at("/c/kubepods".into());
        let dirs = FakeDirs::new(&[&format!("/c/kubepods/pod{UID}/0123abcd")]);
        assert_eq!(
            cgroupfs.find_pod_dir(UID, Some(Qos::Burstable), &dirs),
            Some(PathBuf::from(format!("/c/kubepods/pod{UID}")))
        );
        assert_eq!(
            cgroupfs.find_pod_dir(UID, None, &FakeDirs::new(&["/c/kubepods"])),
            None
        );
    }
}
