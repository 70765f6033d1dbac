//! Cgroup v2 directories made for one test, removed on drop.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Result, SandboxError, unique_name};

/// The cgroup v2 mount point of this machine (hybrid or unified).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| SandboxError::Io {
            what: "reading",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    enforcer_common::mountinfo::find_cgroup2_mount(&text).ok_or(SandboxError::NoCgroup2)
}

/// A cgroup subtree of our own directly under the cgroup2 root.
pub struct TestCgroup {
    root: PathBuf,
    /// Every directory made, parents first.
    made: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Result<TestCgroup> {
        let root = cgroup2_mount()?.join(unique_name(tag));
        mkdir(&root)?;
        Ok(TestCgroup {
            made: vec![root.clone()],
            root,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Makes `relative` (which may nest, `a/b/c`) below the root.
    pub fn child(&mut self, relative: &str) -> Result<PathBuf> {
        let mut dir = self.root.clone();
        for part in Path::new(relative).components() {
            dir.push(part);
            if !dir.exists() {
                mkdir(&dir)?;
                self.made.push(dir.clone());
            }
        }
        Ok(dir)
    }

    /// Removes a directory made by [`Self::child`] early (its processes are killed).
    pub fn remove(&mut self, dir: &Path) {
        let (gone, keep): (Vec<_>, Vec<_>) = self.made.drain(..).partition(|d| d.starts_with(dir));
        self.made = keep;
        gone.iter().rev().for_each(|d| remove_dir(d));
    }
}

/// The cgroup id the kernel reports: the directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| SandboxError::Io {
            what: "stat",
            path: dir.to_path_buf(),
            source,
        })
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir(dir).map_err(|source| SandboxError::Io {
        what: "creating cgroup",
        path: dir.to_path_buf(),
        source,
    })
}

/// Kills what still runs in `dir`, waits for it to empty, and removes it.
fn remove_dir(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) if Instant::now() > deadline => {
                eprintln!("cleanup: cannot remove cgroup {}: {err}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Children first.
        self.made.iter().rev().for_each(|d| remove_dir(d));
    }
}
