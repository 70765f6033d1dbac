//! Standalone mode: protect one cgroup subtree on a plain Linux host (a
//! Docker host, a CI runner) with a fixed allow list. The configuration and
//! the allow file are reloaded on SIGHUP and when their contents change.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use enforcer_common::BlockCounters;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    bpf::Mode,
    cgroup::{self, CgroupDir, CgroupError},
    config::{self, ConfigError, ConfigFile, Overrides},
    enforcer::{Enforcer, EnforcerError, EnforcerHandle, StartSettings, Started},
    pins::PinRoot,
    preflight::{self, PreflightError},
    privilege::{self, PrivilegeError},
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
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
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// Where standalone mode's settings come from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub config_file: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Standalone mode's settings, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    common: config::Common,
    standalone: config::Standalone,
}

impl Sources {
    fn resolve(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config_file {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        Ok(Settings {
            common: config::Common::resolve(&file, &self.overrides)?,
            standalone: config::Standalone::resolve(&file, &self.overrides)?,
        })
    }

    /// Checks everything that needs no privilege: a bad config exits here,
    /// before the kernel is touched.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.resolve().map(|_| ())
    }
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

fn listen(
    kind: SignalKind,
    name: &'static str,
) -> Result<tokio::signal::unix::Signal, StandaloneError> {
    signal(kind).map_err(|source| StandaloneError::Signal {
        signal: name,
        source,
    })
}

fn log_start(started: &Started, target: &CgroupDir, settings: &Settings, allowed: usize) {
    let common = &settings.common;
    match started {
        Started::Adopted { generation } => info!(
            %generation,
            "adopted the pinned programs: enforcement never stopped"
        ),
        Started::Installed {
            generation,
            carried_from,
            removed,
        } => info!(
            %generation,
            carried_from = carried_from.as_deref().unwrap_or("nothing"),
            removed = removed.len(),
            "attached and pinned new programs"
        ),
    }
    info!(
        cgroup = %target.path().display(),
        cgroup_id = target.id(),
        mode = ?common.mode,
        rules = common.rules.rules().len(),
        allowed,
        pins = %common.bpffs_dir.display(),
        "imds-guard is enforcing"
    );
    for rule in common.rules.rules() {
        info!(%rule, "destination rule");
    }
}

/// Runs until SIGTERM or SIGINT. The programs stay pinned and attached when
/// it returns: only `imds-guard uninstall` removes them.
pub async fn run(sources: Sources) -> Result<(), StandaloneError> {
    let mut settings = sources.resolve()?;
    privilege::check()?;
    preflight::check_node(&settings.common.bpffs_dir)?;
    let mount = match &settings.common.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::detect_cgroup2_mount()?,
    };
    let target = CgroupDir::open(&settings.standalone.cgroup, &mount)?;
    let allowed = allowed_ids(&settings.standalone, &mount)?;
    // Subscribe before attaching, so no signal falls between.
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;

    let pins = PinRoot::new(&settings.common.bpffs_dir);
    let (enforcer, started) = Enforcer::start(&StartSettings {
        pins: &pins,
        mode: settings.common.mode,
        rules: &settings.common.rules,
        cgroup: &target,
        allowed: Some(&allowed),
    })?;
    log_start(&started, &target, &settings, allowed.len());
    let (handle, enforcer_task) = enforcer.spawn();
    let reporter = tokio::spawn(report_blocks(
        handle.clone(),
        target.path().to_path_buf(),
        settings.common.mode,
    ));

    let mut watched = WatchedFiles::read(&sources, &settings);
    let mut poll = tokio::time::interval(FILE_POLL_INTERVAL);
    loop {
        let reload = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => true,
            _ = poll.tick() => {
                let now = WatchedFiles::read(&sources, &settings);
                let changed = now != watched;
                watched = now;
                changed
            }
        };
        if reload {
            match reload_settings(&sources, &settings, &mount, &handle).await {
                Ok(new) => settings = new,
                Err(err) => warn!("configuration not reloaded, the running one stays: {err}"),
            }
            watched = WatchedFiles::read(&sources, &settings);
        }
    }
    info!("stopping; the programs stay attached (imds-guard uninstall removes them)");
    reporter.abort();
    drop(handle);
    // The task ends once the last handle is gone; a panic there is a bug to surface.
    if let Err(err) = enforcer_task.await {
        std::panic::resume_unwind(err.into_panic());
    }
    Ok(())
}

/// How often the configuration and allow files are checked for changes.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The contents of the files we reload from, to notice changes (a
/// ConfigMap update swaps a symlink, which contents comparison sees).
#[derive(PartialEq, Eq)]
struct WatchedFiles(Vec<Option<Vec<u8>>>);

impl WatchedFiles {
    fn read(sources: &Sources, settings: &Settings) -> WatchedFiles {
        let paths = [
            sources.config_file.as_deref(),
            settings.standalone.allow_file.as_deref(),
        ];
        WatchedFiles(
            paths
                .iter()
                .map(|p| p.and_then(|p| std::fs::read(p).ok()))
                .collect(),
        )
    }
}

/// Re-reads everything; applies it only if all of it is valid. Settings
/// that shape the loaded programs take effect at the next start.
async fn reload_settings(
    sources: &Sources,
    running: &Settings,
    mount: &Path,
    handle: &EnforcerHandle,
) -> Result<Settings, StandaloneError> {
    let new = sources.resolve()?;
    let allowed = allowed_ids(&new.standalone, mount)?;
    let at_restart = [
        ("mode", new.common.mode != running.common.mode),
        ("bpffsDir", new.common.bpffs_dir != running.common.bpffs_dir),
        (
            "cgroupRoot",
            new.common.cgroup_root != running.common.cgroup_root,
        ),
        ("cgroup", new.standalone.cgroup != running.standalone.cgroup),
    ];
    for (field, changed) in at_restart {
        if changed {
            warn!(
                field,
                "changed in the configuration: it takes effect at the next start"
            );
        }
    }
    if new.common.rules != running.common.rules {
        handle.set_rules(new.common.rules.clone()).await?;
    }
    handle.set_allowed(allowed.clone()).await?;
    info!(
        rules = new.common.rules.rules().len(),
        allowed = allowed.len(),
        "configuration reloaded"
    );
    Ok(Settings {
        common: config::Common {
            mode: running.common.mode,
            bpffs_dir: running.common.bpffs_dir.clone(),
            cgroup_root: running.common.cgroup_root.clone(),
            rules: new.common.rules,
        },
        standalone: config::Standalone {
            cgroup: running.standalone.cgroup.clone(),
            ..new.standalone
        },
    })
}

/// How often new blocked attempts are reported.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Logs, once a second, the cgroups that made new attempts to reach a
/// denied destination.
async fn report_blocks(handle: EnforcerHandle, subtree: PathBuf, mode: Mode) {
    let verdict = match mode {
        Mode::Enforce => "refused",
        Mode::Audit => "audited (let through)",
    };
    let mut seen: Option<BTreeMap<u64, BlockCounters>> = None;
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tick.tick().await;
        let counters = match handle.counters().await {
            Ok(c) => c,
            Err(err) => {
                warn!("cannot read the block counters: {err}");
                continue;
            }
        };
        // Counts carried over from before this start are not news.
        let Some(seen) = seen.as_mut() else {
            seen = Some(counters);
            continue;
        };
        for (id, now) in counters {
            let before = seen.insert(id, now).unwrap_or_default();
            if before == now {
                continue;
            }
            let name = names.entry(id).or_insert_with(|| {
                cgroup::find_by_id(&subtree, id)
                    .map_or_else(|| format!("cgroup id {id}"), |p| p.display().to_string())
            });
            warn!(
                cgroup = %name,
                cgroup_id = id,
                connect = now.connect - before.connect,
                sendmsg = now.sendmsg - before.sendmsg,
                egress = now.egress - before.egress,
                verdict,
                "attempts to reach a metadata address"
            );
        }
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
