//! Plumbing both daemon modes share: node checks, signals, noticing file
//! changes, the start-up log, and the tasks around the enforcer (events,
//! metrics, HTTP endpoints).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    bpf::{
        owner::{Enforcer, EnforcerError, EnforcerHandle, Started},
        pins::PinRoot,
    },
    config::{Common, ModeSettings, Settings},
    host::{
        cgroup::{self, CgroupDir, CgroupError},
        preflight::{self, PreflightError},
        privilege::{self, PrivilegeError},
    },
    report::{
        events::{self, Namer, PodNames, PodNotice, Reporter},
        http::{self, Endpoints, Health, ListenError},
        metrics::Metrics,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Listen(#[from] ListenError),
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

/// What a mode adds to the common tasks.
pub struct RunOptions {
    /// Where to serve metrics and health; none serves nothing.
    pub http_listen: Option<SocketAddr>,
    /// This node's pods, for naming workloads (Kubernetes mode).
    pub pods: Option<PodNames>,
    /// Where first attempts of pods go, for Kubernetes Events.
    pub pod_events: Option<mpsc::Sender<PodNotice>>,
    /// Whether readiness waits for a first sync with the API server.
    pub needs_sync: bool,
}

/// How often the metrics take the enforcer's state.
const METRICS_REFRESH: Duration = Duration::from_secs(2);

/// Starts the enforcer's owner task, the event reader, the metrics and the
/// HTTP endpoints.
pub async fn start(
    mut enforcer: Enforcer,
    started: &Started,
    target: &CgroupDir,
    common: &Common,
    options: RunOptions,
) -> Result<Running, ServiceError> {
    let listener = match options.http_listen {
        Some(address) => {
            let listener = http::bind(address).await?;
            if let Ok(bound) = listener.local_addr() {
                info!(address = %bound, "serving /metrics, /healthz and /readyz");
            }
            Some(listener)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    metrics.rules.set(common.rules.rules().len() as i64);
    let events = enforcer.take_events();
    let (handle, task) = enforcer.spawn();
    let health = Arc::new(Health {
        pins: PinRoot::new(&common.bpffs_dir),
        generation: started.generation().to_owned(),
        handle: handle.clone(),
        synced: AtomicBool::new(!options.needs_sync),
        api_reachable: AtomicBool::new(true),
    });
    let mut helpers = Vec::new();
    if let Some(ring) = events {
        let namer = Namer::new(target.path().to_path_buf(), options.pods.clone());
        let reporter = Reporter::new(namer, Arc::clone(&metrics), options.pod_events);
        helpers.push(tokio::spawn(events::read_events(ring, reporter)));
    }
    // Before anything is served: a probe that answers 200 implies the
    // gauges operators read are already set.
    refresh_metrics_once(&health, &metrics).await;
    helpers.push(tokio::spawn(refresh_metrics(
        Arc::clone(&health),
        Arc::clone(&metrics),
    )));
    if let Some(listener) = listener {
        let endpoints = Arc::new(Endpoints {
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            pods: options.pods,
        });
        helpers.push(tokio::spawn(http::serve(listener, endpoints)));
    }
    Ok(Running {
        handle,
        metrics,
        health,
        task,
        helpers,
    })
}

/// Sets the gauges that mirror the maps from what the kernel holds now.
async fn refresh_metrics_once(health: &Health, metrics: &Metrics) {
    metrics
        .programs_attached
        .set(health.programs_attached() as i64);
    match health.handle.snapshot().await {
        Ok(snapshot) => {
            metrics.allowlisted.set(snapshot.allowed.len() as i64);
            metrics.set_events_dropped(snapshot.events_dropped);
        }
        Err(err) => warn!("cannot read the enforcer's state: {err}"),
    }
}

/// Keeps the gauges that mirror the maps up to date (the first refresh
/// happened before the endpoints were served).
async fn refresh_metrics(health: Arc<Health>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + METRICS_REFRESH,
        METRICS_REFRESH,
    );
    loop {
        tick.tick().await;
        refresh_metrics_once(&health, &metrics).await;
    }
}

/// The tasks of a running daemon.
pub struct Running {
    pub handle: EnforcerHandle,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    task: tokio::task::JoinHandle<()>,
    helpers: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the tasks; the pinned programs stay attached.
    pub async fn stop(self) {
        info!("stopping; the programs stay attached (imds-guard uninstall removes them)");
        for helper in &self.helpers {
            helper.abort();
        }
        self.handle.shutdown().await;
        // A panic in the owner task is a bug to surface.
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

/// Applies a reloaded configuration's rules, and warns about the changed
/// settings that wait for the next start; returns the settings to run with.
pub async fn apply_reload<M: ModeSettings>(
    running: &Settings<M>,
    new: Settings<M>,
    handle: &EnforcerHandle,
) -> Result<Settings<M>, EnforcerError> {
    let (settings, at_restart) = running.reloaded(new);
    for field in at_restart {
        warn!(
            field,
            "changed in the configuration: it takes effect at the next start"
        );
    }
    if settings.common.rules != running.common.rules {
        handle.set_rules(settings.common.rules.clone()).await?;
    }
    Ok(settings)
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
