//! Standalone mode: protect one cgroup subtree on a plain Linux host (a
//! Docker host, a CI runner) with a fixed allow list. The configuration and
//! the allow file are reloaded on SIGHUP and when their contents change.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    bpf::{
        owner::{Enforcer, EnforcerError, EnforcerHandle, StartSettings},
        pins::PinRoot,
    },
    config::{self, ConfigError, Sources},
    host::cgroup::{CgroupDir, CgroupError},
    service::{self, FILE_POLL_INTERVAL, RunOptions, ServiceError, Signals, WatchedFiles},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Service(#[from] ServiceError),
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

type Settings = config::Settings<config::Standalone>;

/// Checks everything that needs no privilege: a bad configuration exits
/// here, before the kernel is touched.
pub fn check(sources: &Sources) -> Result<(), ConfigError> {
    Settings::resolve(sources).map(|_| ())
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

/// The cgroup ids to allow: every `allow` directory and every allow-file
/// entry. Any bad entry fails the whole set, so a typo never changes the map.
fn allowed_ids(
    settings: &config::Standalone,
    mount: &Path,
) -> Result<BTreeSet<u64>, StandaloneError> {
    let mut ids = BTreeSet::new();
    for dir in &settings.allow {
        ids.insert(CgroupDir::open(dir, mount)?.id());
    }
    if let Some(path) = &settings.allow_file {
        let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::AllowFile {
            path: path.clone(),
            source,
        })?;
        for (line, dir) in parse_allow_file(&text) {
            let cgroup =
                CgroupDir::open(&dir, mount).map_err(|source| StandaloneError::AllowFileEntry {
                    path: path.clone(),
                    line,
                    source,
                })?;
            ids.insert(cgroup.id());
        }
    }
    Ok(ids)
}

/// The files whose changes trigger a reload.
fn watched(sources: &Sources, settings: &Settings) -> WatchedFiles {
    WatchedFiles::read(&[
        sources.config_file.as_deref(),
        settings.mode.allow_file.as_deref(),
    ])
}

/// Runs until SIGTERM or SIGINT. The programs stay pinned and attached when
/// it returns: only `imds-guard uninstall` removes them.
pub async fn run(sources: Sources) -> Result<(), StandaloneError> {
    // The files are looked at before the settings are read from them, so a
    // change in between shows as a change at the first poll.
    let mut seen = watched(&sources, &Settings::resolve(&sources)?);
    let mut settings = Settings::resolve(&sources)?;
    let mount = service::prepare(&settings.common)?;
    let target = CgroupDir::open(&settings.mode.cgroup, &mount)?;
    let allowed = allowed_ids(&settings.mode, &mount)?;
    let mut signals = Signals::listen()?;

    let pins = PinRoot::new(&settings.common.bpffs_dir);
    let (enforcer, started) = Enforcer::start(&StartSettings {
        pins: &pins,
        mode: settings.common.mode,
        rules: &settings.common.rules,
        cgroup: &target,
        allowed: Some(&allowed),
    })?;
    service::log_start(&started, &target, &settings.common);
    info!(allowed = allowed.len(), "allow list applied");
    let options = RunOptions {
        http_listen: settings.common.http_listen,
        pods: None,
        pod_events: None,
        needs_sync: false,
    };
    let running = service::start(enforcer, &started, &target, &settings.common, options).await?;

    let mut poll = tokio::time::interval(FILE_POLL_INTERVAL);
    loop {
        let reload = tokio::select! {
            _ = signals.terminate.recv() => break,
            _ = signals.interrupt.recv() => break,
            _ = signals.hangup.recv() => true,
            _ = poll.tick() => {
                let now = watched(&sources, &settings);
                let changed = now != seen;
                seen = now;
                changed
            }
        };
        if reload {
            seen = watched(&sources, &settings);
            match reload_settings(&sources, &settings, &mount, &running.handle).await {
                Ok(new) => {
                    running
                        .metrics
                        .rules
                        .set(new.common.rules.rules().len() as i64);
                    settings = new;
                }
                Err(err) => warn!("configuration not reloaded, the running one stays: {err}"),
            }
        }
    }
    running.stop().await;
    Ok(())
}

/// Re-reads everything; applies it only if all of it is valid. Settings
/// that shape the loaded programs take effect at the next start.
async fn reload_settings(
    sources: &Sources,
    running: &Settings,
    mount: &Path,
    handle: &EnforcerHandle,
) -> Result<Settings, StandaloneError> {
    let new = Settings::resolve(sources)?;
    let allowed = allowed_ids(&new.mode, mount)?;
    let settings = service::apply_reload(running, new, handle).await?;
    handle.set_allowed(allowed.clone()).await?;
    info!(
        rules = settings.common.rules.rules().len(),
        allowed = allowed.len(),
        "configuration reloaded"
    );
    Ok(settings)
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
