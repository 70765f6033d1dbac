//! Standalone mode: protect one cgroup subtree on a plain Linux host (a
//! Docker host, a CI runner) with a fixed allow list. The configuration and
//! the allow file are reloaded on SIGHUP and when their contents change.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
};

use crate::{
    app::{Daemon, DaemonMode, Target},
    bpf::{
        maps::{Access, CgroupAccess},
        owner::EnforcerError,
    },
    config::{Settings, Standalone},
    host::cgroup::{CgroupDir, CgroupError, CgroupMount},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("allow file {path}: {source}")]
    AllowFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("allow file {path}, line {line}: {source}")]
    AllowFileEntry {
        path: PathBuf,
        line: usize,
        source: CgroupError,
    },
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
}

/// The allow file's entries: one cgroup directory a line, absolute or
/// relative to the cgroup2 mount; blank lines and `#` comments are skipped.
/// Returns (line number, path) pairs.
pub fn parse_allow_file(text: &str) -> Vec<(usize, PathBuf)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let entry = line.split('#').next().unwrap_or_default().trim();
            (!entry.is_empty()).then(|| (i + 1, PathBuf::from(entry)))
        })
        .collect()
}

/// The cgroups to list: every `allow` directory and allow-file entry
/// allowed, every `audit` directory audited (unless also allowed). Any bad
/// entry fails the whole set, so a typo never changes the map.
fn listed_cgroups(settings: &Standalone, mount: &Path) -> Result<CgroupAccess, StandaloneError> {
    let mount = CgroupMount::new(mount);
    let mut listed = CgroupAccess::new();
    for dir in &settings.audit {
        listed.insert(mount.cgroup_id(dir)?, Access::Audit);
    }
    for dir in &settings.allow {
        listed.insert(mount.cgroup_id(dir)?, Access::Allow);
    }
    if let Some(path) = &settings.allow_file {
        let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::AllowFile {
            path: path.clone(),
            source,
        })?;
        let entries = parse_allow_file(&text);
        let dirs: Vec<&Path> = entries.iter().map(|(_, dir)| dir.as_path()).collect();
        let ids =
            mount
                .cgroup_ids(&dirs)
                .map_err(|(index, source)| StandaloneError::AllowFileEntry {
                    path: path.clone(),
                    line: entries[index].0,
                    source,
                })?;
        listed.extend(ids.into_iter().map(|id| (id, Access::Allow)));
    }
    Ok(listed)
}

/// The fixed subtree and allow list of a plain host.
pub struct StandaloneMode {
    /// The cgroup2 mount, which relative allow entries start from.
    mount: PathBuf,
}

impl DaemonMode for StandaloneMode {
    type Settings = Standalone;
    /// Nothing changes from outside but the files.
    type Change = Infallible;
    /// The new allow list.
    type Reload = CgroupAccess;
    type Error = StandaloneError;

    fn watched_files(settings: &Standalone) -> Vec<PathBuf> {
        settings.allow_file.iter().cloned().collect()
    }

    async fn prepare(
        settings: &Settings<Standalone>,
        cgroup_root: &Path,
    ) -> Result<(StandaloneMode, Target), StandaloneError> {
        let target = Target {
            cgroup: CgroupDir::open(&settings.mode.cgroup, cgroup_root)?,
            allowed: Some(listed_cgroups(&settings.mode, cgroup_root)?),
        };
        let mode = StandaloneMode {
            mount: cgroup_root.to_path_buf(),
        };
        Ok((mode, target))
    }

    async fn next_change(&mut self) -> Result<Infallible, StandaloneError> {
        std::future::pending().await
    }

    async fn apply(
        &mut self,
        change: Infallible,
        _: &Settings<Standalone>,
        _: &Daemon,
    ) -> Result<(), StandaloneError> {
        match change {}
    }

    fn plan_reload(&self, new: &Standalone) -> Result<CgroupAccess, StandaloneError> {
        listed_cgroups(new, &self.mount)
    }

    async fn apply_reload(
        &mut self,
        allowed: CgroupAccess,
        _: &Settings<Standalone>,
        daemon: &Daemon,
    ) -> Result<Option<usize>, StandaloneError> {
        let count = allowed.len();
        daemon.handle.set_allowed(allowed).await?;
        Ok(Some(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_file_lines() {
        let text = "\
# CI runner jobs that may use the instance role
/sys/fs/cgroup/system.slice/runner.service

docker/abc123   # relative to the mount
   # indented comment
";
        assert_eq!(
            parse_allow_file(text),
            vec![
                (
                    2,
                    PathBuf::from("/sys/fs/cgroup/system.slice/runner.service")
                ),
                (4, PathBuf::from("docker/abc123")),
            ]
        );
        assert!(parse_allow_file("").is_empty());
    }
}
