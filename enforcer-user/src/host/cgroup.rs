//! Finding the cgroup v2 hierarchy and naming cgroups by the ids the kernel
//! reports (the inode number of the cgroup directory).

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsStr,
    fs::File,
    os::{
        fd::OwnedFd,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Component, Path, PathBuf},
};

use nix::{
    fcntl::{OFlag, OpenHow, ResolveFlag},
    sys::{
        stat::Mode,
        statfs::{CGROUP2_SUPER_MAGIC, fstatfs},
    },
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
        let stat = fstatfs(&file).map_err(|errno| read_err(errno.into()))?;
        let metadata = file.metadata().map_err(read_err)?;
        if !metadata.is_dir() || stat.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 { path: canonical });
        }
        Ok(CgroupDir {
            path: canonical,
            file,
            id: metadata.ino(),
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

/// The cgroup v2 mount, opened once to name many cgroups by id (a long
/// allow list): a cgroup below it costs one short lookup from the mount's
/// descriptor instead of [`CgroupDir::open`]'s walk of every component,
/// and many cgroups in one parent cost one listing of that parent.
pub struct CgroupMount {
    /// The mount as configured, for [`CgroupDir::open`].
    path: PathBuf,
    /// Without (the mount is no cgroup2 directory), every lookup goes
    /// [`CgroupDir::open`]'s way.
    beneath: Option<Beneath>,
}

/// The canonical cgroup2 mount, which paths of plain names are resolved
/// below.
struct Beneath {
    canonical: PathBuf,
    dir: OwnedFd,
    /// No other filesystem is mounted below it, so a directory listing
    /// names its children as lookups would (a lookup would cross into a
    /// mount on a child; the listing would not).
    listable: bool,
}

impl CgroupMount {
    pub fn new(mount: &Path) -> CgroupMount {
        let beneath = mount.canonicalize().ok().and_then(|canonical| {
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            let dir = nix::fcntl::open(&canonical, flags, Mode::empty()).ok()?;
            if fstatfs(&dir).ok()?.filesystem_type() != CGROUP2_SUPER_MAGIC {
                return None;
            }
            let listable = std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|text| !mounts_below(&text, &canonical));
            Some(Beneath {
                canonical,
                dir,
                listable,
            })
        });
        CgroupMount {
            path: mount.to_path_buf(),
            beneath,
        }
    }

    /// The id of the cgroup directory at `path` (absolute, or relative to
    /// the mount), accepted and refused exactly as [`CgroupDir::open`] does.
    pub fn cgroup_id(&self, path: &Path) -> Result<u64, CgroupError> {
        match self.beneath.as_ref().and_then(|b| b.lookup(path)) {
            Some(id) => Ok(id),
            // What the short lookup cannot settle goes the full way, which
            // also words the error.
            None => CgroupDir::open(path, &self.path).map(|dir| dir.id()),
        }
    }

    /// The ids of the cgroup directories at `paths`, in order, each as
    /// [`CgroupMount::cgroup_id`] gives it; the first refusal comes with
    /// the index of its path.
    pub fn cgroup_ids(&self, paths: &[&Path]) -> Result<Vec<u64>, (usize, CgroupError)> {
        let listed = match &self.beneath {
            Some(beneath) if beneath.listable => beneath.listed(paths),
            _ => vec![None; paths.len()],
        };
        paths
            .iter()
            .zip(listed)
            .enumerate()
            .map(|(index, (path, listed))| {
                listed
                    .map_or_else(|| self.cgroup_id(path), Ok)
                    .map_err(|err| (index, err))
            })
            .collect()
    }
}

impl Beneath {
    /// Opens a directory below the mount, resolved by the kernel without
    /// leaving the mount's directory or filesystem and without following a
    /// symlink: a directory whose canonical path is the mount's joined with
    /// `below`, on cgroup2, which is what [`CgroupDir::open`] checks.
    fn open(&self, below: &Path, flags: OFlag) -> Option<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_XDEV
                    | ResolveFlag::RESOLVE_NO_SYMLINKS,
            );
        nix::fcntl::openat2(&self.dir, below, how).ok()
    }

    /// The short lookup of one path of plain names.
    fn lookup(&self, path: &Path) -> Option<u64> {
        let cgroup = self.open(names_below(path, &self.canonical)?, OFlag::O_PATH)?;
        Some(nix::sys::stat::fstat(&cgroup).ok()?.st_ino)
    }

    /// The ids of `paths` that listings of their parents settle, in order:
    /// a parent holding enough of them to be worth listing is listed once.
    fn listed(&self, paths: &[&Path]) -> Vec<Option<u64>> {
        // Each path as (parent, name) below the mount, borrowed: no
        // allocation for each of many entries.
        let split: Vec<Option<(&OsStr, &OsStr)>> = paths
            .iter()
            .map(|path| {
                let below = names_below(path, &self.canonical)?;
                Some((below.parent()?.as_os_str(), below.file_name()?))
            })
            .collect();
        let mut wanted: HashMap<&OsStr, HashMap<&OsStr, Option<u64>>> = HashMap::new();
        for &(parent, name) in split.iter().flatten() {
            wanted.entry(parent).or_default().insert(name, None);
        }
        for (parent, children) in &mut wanted {
            self.list(Path::new(parent), children);
        }
        split
            .iter()
            .map(|&entry| {
                let (parent, name) = entry?;
                *wanted.get(parent)?.get(name)?
            })
            .collect()
    }

    /// Fills in the ids of `children` (by name) of `parent` (below the
    /// mount) from one listing of it, when that costs less than looking
    /// them up one by one; a name the listing lacks is left to the lookup.
    fn list(&self, parent: &Path, children: &mut HashMap<&OsStr, Option<u64>>) {
        let below = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let Some(dir) = self.open(below, OFlag::O_RDONLY) else {
            return;
        };
        // A cgroup directory's link count is its child cgroups plus two.
        let Ok(stat) = nix::sys::stat::fstat(&dir) else {
            return;
        };
        let wanted = u64::try_from(children.len()).unwrap_or(u64::MAX);
        // st_nlink is u64 on x86_64 and u32 on aarch64.
        #[allow(clippy::useless_conversion)]
        let links = u64::from(stat.st_nlink);
        if !worth_listing(wanted, links.saturating_sub(2)) {
            return;
        }
        let Ok(mut dir) = nix::dir::Dir::from_fd(dir) else {
            return;
        };
        // A listing cut short by an error leaves the rest to the lookup.
        for entry in dir.iter().map_while(Result::ok) {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if entry.file_type() == Some(nix::dir::Type::Directory)
                && let Some(id) = children.get_mut(name)
            {
                *id = Some(entry.ino());
            }
        }
    }
}

/// How many child cgroups one listing reads in the time of one lookup
/// (measured: a lookup by name costs 2 to 5 µs, a listing about 0.4 µs a
/// child).
const LISTED_PER_LOOKUP: u64 = 8;

/// Whether listing a parent with `subdirs` children beats looking up
/// `wanted` of them.
fn worth_listing(wanted: u64, subdirs: u64) -> bool {
    wanted > 1 && subdirs <= wanted.saturating_mul(LISTED_PER_LOOKUP)
}

/// Whether mountinfo `text` has a mount point strictly below `mount`.
fn mounts_below(text: &str, mount: &Path) -> bool {
    enforcer_common::mountinfo::parse(text)
        .iter()
        .any(|m| m.point != mount && m.point.starts_with(mount))
}

/// `path` below `mount` (canonical) as plain names, when it is written so:
/// relative, or absolute under `mount`, with no `.` or `..`.
fn names_below<'a>(path: &'a Path, mount: &Path) -> Option<&'a Path> {
    let below = if path.is_absolute() {
        path.strip_prefix(mount).ok()?
    } else {
        path
    };
    let mut components = below.components().peekable();
    let plain = components.peek().is_some()
        && components.all(|component| matches!(component, Component::Normal(_)));
    plain.then_some(below)
}

/// Finds the directory of the cgroup with id `id` below `root` (inclusive),
/// for naming cgroups in reports. Unreadable directories are skipped.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    let mut found = None;
    walk(root, |dir, ino| {
        if ino == id {
            found = Some(dir.to_path_buf());
        }
        found.is_none()
    });
    found
}

/// The ids of `root` and every cgroup below it.
pub fn subtree_ids(root: &Path) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    walk(root, |_, ino| {
        ids.insert(ino);
        true
    });
    ids
}

/// Visits `root` and the directories below it with their inode (the
/// cgroup id) until `visit` returns false; unreadable ones are skipped.
fn walk(root: &Path, mut visit: impl FnMut(&Path, u64) -> bool) {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if !visit(&dir, meta.ino()) {
            return;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree under the temporary directory, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let root =
                std::env::temp_dir().join(format!("imds-guard-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("mkdir");
            Tree(root.canonicalize().expect("canonical"))
        }

        /// The lookups of a cgroup2 mount, on this ordinary tree: they use
        /// nothing of cgroup2 but its directories' link counts, which
        /// ordinary filesystems keep the same way.
        fn beneath(&self) -> Beneath {
            let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            Beneath {
                canonical: self.0.clone(),
                dir: nix::fcntl::open(&self.0, flags, Mode::empty()).expect("open"),
                listable: true,
            }
        }

        fn ino(&self, below: &str) -> u64 {
            std::fs::metadata(self.0.join(below)).expect("stat").ino()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_plain_names_below_the_mount_take_the_short_lookup() {
        let mount = Path::new("/sys/fs/cgroup");
        let below = |path: &str| names_below(Path::new(path), mount).map(Path::to_path_buf);
        assert_eq!(
            below("/sys/fs/cgroup/system.slice/a.service"),
            Some(PathBuf::from("system.slice/a.service"))
        );
        assert_eq!(below("docker/abc"), Some(PathBuf::from("docker/abc")));
        assert_eq!(below("/sys/fs/cgroup//x/"), Some(PathBuf::from("x")));
        // Everything else goes the full way.
        for path in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/",
            "/sys/fs/cgroup/a/../b",
            "/sys/fs/cgroupx/a",
            "/tmp/a",
            "../a",
            "a/../../b",
            "./a",
            "",
        ] {
            assert_eq!(below(path), None, "{path:?}");
        }
    }

    #[test]
    fn the_short_lookup_finds_only_directories_reached_without_symlinks() {
        let tree = Tree::new("lookup");
        std::fs::create_dir_all(tree.0.join("a/b")).expect("mkdir");
        std::fs::write(tree.0.join("a/file"), "").expect("write");
        std::os::unix::fs::symlink(tree.0.join("a"), tree.0.join("link")).expect("symlink");
        let beneath = tree.beneath();
        let lookup = |path: &Path| beneath.lookup(path);
        assert_eq!(lookup(Path::new("a/b")), Some(tree.ino("a/b")));
        assert_eq!(lookup(&tree.0.join("a/b")), Some(tree.ino("a/b")));
        for refused in ["a/file", "link", "link/b", "a/missing", "a/../a/b"] {
            assert_eq!(lookup(Path::new(refused)), None, "{refused}");
        }
        assert_eq!(lookup(Path::new("/etc")), None, "outside the mount");
    }

    #[test]
    fn many_directories_in_one_parent_are_named_from_its_listing() {
        let tree = Tree::new("listing");
        let names: Vec<String> = (0..40).map(|n| format!("p/{n:02}")).collect();
        for name in &names {
            std::fs::create_dir_all(tree.0.join(name)).expect("mkdir");
        }
        std::fs::write(tree.0.join("p/file"), "").expect("write");
        std::os::unix::fs::symlink(tree.0.join("p/00"), tree.0.join("p/link")).expect("symlink");
        let beneath = tree.beneath();
        let mut written: Vec<PathBuf> = names.iter().map(|name| tree.0.join(name)).collect();
        // Relative, twice, and what the listing must not name.
        written.extend(["p/07", "p/07", "p/file", "p/link", "p/missing"].map(PathBuf::from));
        let paths: Vec<&Path> = written.iter().map(PathBuf::as_path).collect();
        let mut expected: Vec<Option<u64>> =
            names.iter().map(|name| Some(tree.ino(name))).collect();
        expected.extend([
            Some(tree.ino("p/07")),
            Some(tree.ino("p/07")),
            None,
            None,
            None,
        ]);
        assert_eq!(beneath.listed(&paths), expected);
        // Two of forty children are not worth a listing: lookups name them.
        assert_eq!(beneath.listed(&paths[..2]), [None, None]);
        let mount = CgroupMount {
            path: tree.0.clone(),
            beneath: Some(beneath),
        };
        let short: Vec<u64> = names[..2].iter().map(|name| tree.ino(name)).collect();
        assert_eq!(mount.cgroup_ids(&paths[..2]).expect("named"), short);
    }

    #[test]
    fn listing_pays_only_against_enough_lookups() {
        assert!(worth_listing(10_000, 10_000));
        assert!(worth_listing(2, 16));
        assert!(!worth_listing(2, 17));
        assert!(!worth_listing(1, 0), "one lookup is never beaten");
        assert!(!worth_listing(3, 100_000));
    }

    #[test]
    fn a_mount_below_the_cgroup_mount_forbids_listing() {
        let line = |point: &str, fstype: &str| {
            format!("30 1 0:26 / {point} rw,relatime shared:1 - {fstype} none rw\n")
        };
        let mount = Path::new("/sys/fs/cgroup");
        let plain = [
            line("/", "ext4"),
            line("/sys/fs/cgroup", "cgroup2"),
            line("/sys/fs/cgroupfoo", "tmpfs"),
        ]
        .concat();
        assert!(!mounts_below(&plain, mount));
        let nested = plain + &line("/sys/fs/cgroup/a/b", "tmpfs");
        assert!(mounts_below(&nested, mount));
    }

    #[test]
    fn a_mount_that_is_not_cgroup2_leaves_every_lookup_to_the_full_way() {
        let tree = Tree::new("not-cgroup2");
        std::fs::create_dir_all(tree.0.join("a")).expect("mkdir");
        let mount = CgroupMount::new(&tree.0);
        assert!(mount.beneath.is_none());
        let err = mount.cgroup_id(Path::new("a")).expect_err("not a cgroup");
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        let (index, err) = mount
            .cgroup_ids(&[Path::new("a"), Path::new("b")])
            .expect_err("not cgroups");
        assert_eq!(index, 0, "{err}");
    }
}
