//! Standalone mode: protect one cgroup subtree on a plain Linux host (a
//! Docker host, a CI runner) with a fixed allow list, reloaded on SIGHUP.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use enforcer_common::BlockCounters;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    bpf::{BpfError, Mode},
    cgroup::{self, CgroupDir, CgroupError},
    enforcer::{Enforcer, EnforcerError, EnforcerHandle},
    privilege::{self, PrivilegeError},
    rules::RuleSet,
};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
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
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// Everything standalone mode needs, already validated where possible.
#[derive(Debug)]
pub struct Settings {
    /// The cgroup v2 directory whose subtree is protected.
    pub cgroup: PathBuf,
    /// Cgroup directories (and their subtrees) that keep metadata access.
    pub allow: Vec<PathBuf>,
    /// A file listing more allowlisted cgroup directories, re-read on SIGHUP.
    pub allow_file: Option<PathBuf>,
    pub rules: RuleSet,
    pub mode: Mode,
    /// Where the cgroup v2 hierarchy is mounted; detected when absent.
    pub cgroup_root: Option<PathBuf>,
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

/// The cgroup ids to allow: every `--allow` directory and every allow-file
/// entry. Any bad entry fails the whole set, so a typo never changes the map.
fn allowed_ids(settings: &Settings, mount: &Path) -> Result<BTreeSet<u64>, StandaloneError> {
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

/// Runs until SIGTERM or SIGINT; the programs are detached on return.
pub async fn run(settings: Settings) -> Result<(), StandaloneError> {
    privilege::check()?;
    let mount = match &settings.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::detect_cgroup2_mount()?,
    };
    let target = CgroupDir::open(&settings.cgroup, &mount)?;
    let allowed = allowed_ids(&settings, &mount)?;
    // Subscribe before attaching, so no signal falls between.
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;

    let enforcer = Enforcer::start(settings.mode, &settings.rules, &allowed, &target)?;
    let (handle, enforcer_task) = enforcer.spawn();
    info!(
        cgroup = %target.path().display(),
        cgroup_id = target.id(),
        mode = ?settings.mode,
        rules = settings.rules.rules().len(),
        allowed = allowed.len(),
        "imds-guard is enforcing"
    );
    for rule in settings.rules.rules() {
        info!(%rule, "destination rule");
    }
    let reporter = tokio::spawn(report_blocks(
        handle.clone(),
        target.path().to_path_buf(),
        settings.mode,
    ));

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => match allowed_ids(&settings, &mount) {
                Ok(ids) => {
                    let count = ids.len();
                    handle.set_allowed(ids).await?;
                    info!(allowed = count, "allow list reloaded");
                }
                Err(err) => warn!("allow list not reloaded, the previous one stays: {err}"),
            },
        }
    }
    info!("stopping: detaching the programs");
    reporter.abort();
    drop(handle);
    // The task ends once the last handle is gone; a panic there is a bug to surface.
    if let Err(err) = enforcer_task.await {
        std::panic::resume_unwind(err.into_panic());
    }
    Ok(())
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
    let mut seen: BTreeMap<u64, BlockCounters> = BTreeMap::new();
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
