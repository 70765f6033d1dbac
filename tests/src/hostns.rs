//! Telling the host's network namespace from a sandbox one, for clients
//! that must never send from the host's.

use std::os::unix::fs::MetadataExt as _;

/// Whether this process may share the host's network namespace: ours is
/// compared with PID 1's and our parent's (the sandbox moves only the
/// client itself into a namespace). If neither can be read, assume the
/// worst.
pub fn in_host_netns() -> bool {
    let inode = |path: &str| std::fs::metadata(path).map(|m| m.ino()).ok();
    let Some(mine) = inode("/proc/self/ns/net") else {
        return true;
    };
    let parent = format!("/proc/{}/ns/net", std::os::unix::process::parent_id());
    let others: Vec<u64> = [inode("/proc/1/ns/net"), inode(&parent)]
        .into_iter()
        .flatten()
        .collect();
    others.is_empty() || others.contains(&mine)
}
