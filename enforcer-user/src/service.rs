//! Plumbing both daemon modes share: signals, noticing file changes, the
//! start-up log and the reports of blocked attempts.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use enforcer_common::BlockCounters;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::{
    bpf::Mode,
    cgroup::{self, CgroupDir, CgroupError},
    config::Common,
    enforcer::{Enforcer, EnforcerHandle, Started},
    preflight::{self, PreflightError},
    privilege::{self, PrivilegeError},
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// Checks the privileges and the node, and finds the cgroup2 root: what
/// every mode does before it loads anything.
pub fn prepare(common: &Common) -> Result<PathBuf, ServiceError> {
    privilege::check()?;
    preflight::check_node(&common.bpffs_dir)?;
    Ok(match &common.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::detect_cgroup2_mount()?,
    })
}

/// Starts the enforcer's owner task and the block reporter on `target`.
pub fn spawn(enforcer: Enforcer, target: &CgroupDir, mode: Mode) -> Running {
    let (handle, task) = enforcer.spawn();
    let reporter = tokio::spawn(report_blocks(
        handle.clone(),
        target.path().to_path_buf(),
        mode,
    ));
    Running {
        handle,
        task,
        reporter,
    }
}

/// The tasks of a running daemon.
pub struct Running {
    pub handle: EnforcerHandle,
    task: tokio::task::JoinHandle<()>,
    reporter: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the tasks; the pinned programs stay attached.
    pub async fn stop(self) {
        info!("stopping; the programs stay attached (imds-guard uninstall removes them)");
        self.reporter.abort();
        drop(self.handle);
        // The task ends once the last handle is gone; a panic there is a bug to surface.
        if let Err(err) = self.task.await {
            std::panic::resume_unwind(err.into_panic());
        }
    }
}

/// The signals a daemon acts on: TERM and INT stop it (leaving the programs
/// pinned), HUP reloads the configuration.
pub struct Signals {
    pub terminate: Signal,
    pub interrupt: Signal,
    pub hangup: Signal,
}

impl Signals {
    /// Subscribe before attaching, so no signal falls between.
    pub fn listen() -> Result<Signals, ServiceError> {
        let listen = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| ServiceError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Signals {
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            hangup: listen(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// How often reloadable files are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The contents of the files we reload from, to notice changes (a
/// ConfigMap update swaps a symlink, which contents comparison sees).
#[derive(PartialEq, Eq)]
pub struct WatchedFiles(Vec<Option<Vec<u8>>>);

impl WatchedFiles {
    pub fn read(paths: &[Option<&Path>]) -> WatchedFiles {
        WatchedFiles(
            paths
                .iter()
                .map(|p| p.and_then(|p| std::fs::read(p).ok()))
                .collect(),
        )
    }
}

/// Logs how the enforcer started and what it enforces.
pub fn log_start(started: &Started, target: &CgroupDir, common: &Common) {
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
        pins = %common.bpffs_dir.display(),
        "imds-guard is enforcing"
    );
    for rule in common.rules.rules() {
        info!(%rule, "destination rule");
    }
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
