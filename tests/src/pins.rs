//! A bpffs directory of its own for each daemon under test, so tests run
//! side by side; removed on drop, which detaches whatever was left pinned.

use std::path::{Path, PathBuf};

use crate::unique_name;

/// Where bpffs is mounted (`cargo xtask setup` mounts it).
const BPFFS: &str = "/sys/fs/bpf";

pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A fresh path under bpffs; the daemon creates it.
    pub fn new(tag: &str) -> PinDir {
        PinDir {
            path: Path::new(BPFFS).join(unique_name(tag)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry inside, ours or not.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The generation directories inside (the daemon's own layout: `g-`
    /// directories, beside the node edge guard's `tc` links).
    pub fn generations(&self) -> Vec<String> {
        let mut names: Vec<String> = generations_in(&self.path);
        names.sort();
        names
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => eprintln!("cleanup: cannot remove {}: {err}", self.path.display()),
        }
    }
}

/// The generation directories under a pin root.
pub fn generations_in(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.starts_with("g-"))
                .collect()
        })
        .unwrap_or_default()
}
