//! The daemon's skeleton, which both modes run: check the host, attach or
//! adopt the programs, start the tasks around them (event reader, metrics,
//! HTTP endpoints and the mode's own), then one loop for signals, reloads,
//! the mode's changes and tasks that die, and a shutdown that cancels and
//! joins every task. A mode ([`DaemonMode`]) supplies only what differs.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    bpf::{
        loader::LoaderAhead,
        maps::{Access, CgroupAccess},
        owner::{Enforcer, EnforcerError, EnforcerHandle, StartSettings, Started},
        pins::PinRoot,
    },
    config::{Common, ConfigError, ModeSettings, Settings, Sources, Switch, rules::RuleSet},
    edge::{self, PodAddresses},
    host::{
        cgroup::{self, CgroupDir, CgroupError},
        preflight::{self, PreflightError},
        privilege::{self, PrivilegeError},
    },
    report::{
        events::{self, Namer, PodNames, PodNotice, Reporter},
        explain::{ExplainRequest, RecentAttempts},
        http::{self, Endpoints, Health, ListenError},
        metrics::{self, Metrics},
    },
};

pub mod tasks;

use tasks::Tasks;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    /// What only a mode can fail at.
    #[error(transparent)]
    Mode(Box<dyn std::error::Error + Send + Sync>),
    #[error("the daemon's {} task panicked", tasks.join(", "))]
    TasksPanicked { tasks: Vec<&'static str> },
}

/// What a mode decides before anything is loaded.
pub struct Target {
    /// The cgroup whose subtree loses metadata access.
    pub cgroup: CgroupDir,
    /// The cgroups listed from the start; `None` keeps what the pinned
    /// state holds (Kubernetes mode, until its first full list).
    pub allowed: Option<CgroupAccess>,
}

/// What the shared reporting needs of a mode.
#[derive(Default)]
pub struct Reporting {
    /// This node's pods, for naming workloads and for `/pods`.
    pub pods: Option<PodNames>,
    /// Where first attempts of pods go, to become Kubernetes Events.
    pub pod_notices: Option<mpsc::Sender<PodNotice>>,
    /// Whether readiness waits for the mode's first sync.
    pub needs_sync: bool,
    /// Where `explain` questions go (a mode that knows pods answers them).
    pub explain: Option<mpsc::Sender<ExplainRequest>>,
}

/// What differs between the daemon's modes. The skeleton calls these in
/// order: [`prepare`](DaemonMode::prepare) before anything is loaded,
/// [`start`](DaemonMode::start) once the programs enforce, then
/// [`next_change`](DaemonMode::next_change) and
/// [`apply`](DaemonMode::apply) for each change from outside, and
/// [`plan_reload`](DaemonMode::plan_reload) then
/// [`apply_reload`](DaemonMode::apply_reload) for each reload.
pub trait DaemonMode: Sized {
    /// The mode's own settings.
    type Settings: ModeSettings;
    /// A change from outside, which [`DaemonMode::apply`] acts on.
    type Change;
    /// A checked reload, ready to apply.
    type Reload;
    /// What only this mode can fail at.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Files, besides the configuration file, whose change reloads.
    fn watched_files(_settings: &Self::Settings) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Decides what to protect, from settings already checked and the
    /// cgroup2 mount, before anything is loaded: what fails here leaves
    /// nothing behind.
    fn prepare(
        settings: &Settings<Self::Settings>,
        cgroup_root: &Path,
    ) -> impl Future<Output = Result<(Self, Target), Self::Error>>;

    /// What the event reader and the endpoints need of this mode.
    fn reporting(&self) -> Reporting {
        Reporting::default()
    }

    /// Starts the mode's own tasks, once the programs enforce.
    fn start(
        &mut self,
        _settings: &Settings<Self::Settings>,
        _daemon: &mut Daemon,
    ) -> impl Future<Output = Result<(), Self::Error>> {
        async { Ok(()) }
    }

    /// Waits for the next change from outside. Cancel-safe: the main loop
    /// drops it when something else happens first.
    fn next_change(&mut self) -> impl Future<Output = Result<Self::Change, Self::Error>>;

    /// Acts on a change.
    fn apply(
        &mut self,
        change: Self::Change,
        settings: &Settings<Self::Settings>,
        daemon: &Daemon,
    ) -> impl Future<Output = Result<(), Self::Error>>;

    /// Checks the mode's part of a reloaded configuration, before any of
    /// the reload is applied: a reload applies whole or not at all.
    fn plan_reload(&self, new: &Self::Settings) -> Result<Self::Reload, Self::Error>;

    /// Applies a checked reload (the new rules are already in force, and
    /// `settings` are the ones to run with); returns how many cgroups the
    /// allow list holds when the reload set it.
    fn apply_reload(
        &mut self,
        reload: Self::Reload,
        settings: &Settings<Self::Settings>,
        daemon: &Daemon,
    ) -> impl Future<Output = Result<Option<usize>, Self::Error>>;
}

fn mode_error<E: std::error::Error + Send + Sync + 'static>(err: E) -> AppError {
    AppError::Mode(Box::new(err))
}

/// What runs around the enforcer while the daemon is up, for the modes.
pub struct Daemon {
    pub handle: EnforcerHandle,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    tasks: Tasks,
    /// What the node edge guard follows: the rules, the allowed pods' addresses.
    edge_rules: watch::Sender<RuleSet>,
    pod_addresses: watch::Sender<Option<PodAddresses>>,
}

impl Daemon {
    /// Tells the node edge guard the allowed pods' addresses (a mode that
    /// knows pods calls it; without, no pod is let through the node).
    pub fn publish_pod_addresses(&self, addresses: PodAddresses) {
        self.pod_addresses.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&addresses);
            *current = Some(addresses);
            changed
        });
    }

    /// Runs a helper task under supervision until shutdown.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(name, task);
    }
}

/// Checks everything that needs no privilege: a bad configuration exits
/// here, before the kernel is touched. Returns the settings checked.
pub fn check<M: DaemonMode>(sources: &Sources) -> Result<Settings<M::Settings>, ConfigError> {
    Settings::<M::Settings>::resolve(sources)
}

/// Runs a mode until SIGTERM or SIGINT. The programs stay pinned and
/// attached when it returns: only `imds-guard uninstall` removes them.
/// `checked` is what [`check`] returned; the eBPF loader is made `ahead`,
/// while the settings and the host are checked.
pub async fn run<M: DaemonMode>(
    sources: Sources,
    checked: Settings<M::Settings>,
    ahead: LoaderAhead,
) -> Result<(), AppError> {
    // The files are looked at before the settings are read from them, so a
    // change in between shows as a change at the first poll.
    let mut seen = WatchedFiles::read::<M>(&sources, &checked);
    let mut settings = Settings::<M::Settings>::resolve(&sources)?;
    let cgroup_root = check_host(&settings.common)?;
    let (mut mode, target) = M::prepare(&settings, &cgroup_root)
        .await
        .map_err(mode_error)?;
    let mut signals = Signals::listen()?;

    let pins = PinRoot::new(&settings.common.bpffs_dir);
    let (enforcer, started) = Enforcer::start(
        &StartSettings {
            pins: &pins,
            mode: settings.common.mode,
            rules: &settings.common.rules,
            cgroup: &target.cgroup,
            allowed: target.allowed.as_ref(),
            node_guard: settings.common.node_guard == Switch::On,
            refuse_packet_sockets: settings.common.refuse_packet_sockets == Switch::On,
        },
        ahead,
    )?;
    log_start(&started, &target.cgroup, &settings.common);
    if let Some(allowed) = &target.allowed {
        info!(allowed = allowed.len(), "allow list applied");
    }
    let mut daemon = start(
        enforcer,
        &started,
        &target.cgroup,
        &settings.common,
        mode.reporting(),
    )
    .await?;

    let outcome = async {
        mode.start(&settings, &mut daemon)
            .await
            .map_err(mode_error)?;
        let mut poll = tokio::time::interval(FILE_POLL_INTERVAL);
        loop {
            let reload = tokio::select! {
                _ = signals.terminate.recv() => return Ok(()),
                _ = signals.interrupt.recv() => return Ok(()),
                _ = signals.hangup.recv() => true,
                _ = poll.tick() => {
                    let now = WatchedFiles::read::<M>(&sources, &settings);
                    let changed = now != seen;
                    seen = now;
                    changed
                }
                Some(ended) = daemon.tasks.next_end() => {
                    error!(
                        task = ended.name,
                        cause = ended.cause(),
                        "a task of the daemon stopped: /healthz reports it until a restart"
                    );
                    daemon.health.task_stopped(ended.name);
                    false
                }
                change = mode.next_change() => {
                    let change = change.map_err(mode_error)?;
                    mode.apply(change, &settings, &daemon).await.map_err(mode_error)?;
                    false
                }
            };
            if reload {
                seen = WatchedFiles::read::<M>(&sources, &settings);
                match reload_settings(&sources, &settings, &mut mode, &daemon).await {
                    Ok(new) => settings = new,
                    Err(err) => warn!("configuration not reloaded, the running one stays: {err}"),
                }
            }
        }
    }
    .await;
    info!("stopping; the programs stay attached (imds-guard uninstall removes them)");
    let handle = daemon.handle.clone();
    let panicked = daemon.tasks.shutdown(handle.shutdown()).await;
    if !panicked.is_empty() {
        return Err(AppError::TasksPanicked { tasks: panicked });
    }
    outcome
}

/// Re-reads everything; applies it only if all of it is valid. Settings
/// that shape the loaded programs take effect at the next start.
async fn reload_settings<M: DaemonMode>(
    sources: &Sources,
    running: &Settings<M::Settings>,
    mode: &mut M,
    daemon: &Daemon,
) -> Result<Settings<M::Settings>, AppError> {
    let new = Settings::<M::Settings>::resolve(sources)?;
    let reload = mode.plan_reload(&new.mode).map_err(mode_error)?;
    let (settings, at_restart) = running.reloaded(new);
    for field in at_restart {
        warn!(
            field,
            "changed in the configuration: it takes effect at the next start"
        );
    }
    if settings.common.rules != running.common.rules {
        daemon
            .handle
            .set_rules(settings.common.rules.clone())
            .await?;
        daemon
            .edge_rules
            .send_replace(settings.common.rules.clone());
    }
    let allowed = mode
        .apply_reload(reload, &settings, daemon)
        .await
        .map_err(mode_error)?;
    let rules = settings.common.rules.rules().len();
    daemon.metrics.rules.set(metrics::gauge_count(rules));
    if let Some(allowed) = allowed {
        info!(rules, allowed, "configuration reloaded");
    } else {
        info!(rules, "configuration reloaded");
    }
    Ok(settings)
}

/// Checks the privileges and the node, and finds the cgroup2 root: what
/// every mode does before it loads anything.
fn check_host(common: &Common) -> Result<PathBuf, AppError> {
    privilege::check()?;
    preflight::check_node(&common.bpffs_dir)?;
    if common.refuse_packet_sockets == Switch::On {
        preflight::check_bpf_lsm(privilege::effective()?)?;
    }
    Ok(match &common.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::detect_cgroup2_mount()?,
    })
}

/// How often the metrics take the enforcer's state.
const METRICS_REFRESH: Duration = Duration::from_secs(2);

/// Starts the enforcer's owner task, the event reader, the metrics and the
/// HTTP endpoints.
async fn start(
    mut enforcer: Enforcer,
    started: &Started,
    target: &CgroupDir,
    common: &Common,
    reporting: Reporting,
) -> Result<Daemon, AppError> {
    let mut listeners = Vec::new();
    if let Some(address) = common.http_listen {
        let listener = http::bind(address).await?;
        if let http::Listener::Tcp(tcp) = &listener
            && let Ok(bound) = tcp.local_addr()
        {
            info!(address = %bound, "serving /metrics, /healthz and /readyz");
        }
        listeners.push(listener);
    }
    if let Some(path) = &common.status_socket {
        listeners.push(http::bind_socket(path)?);
        info!(socket = %path.display(), "serving /pods too, node-local");
    }
    let metrics = Arc::new(Metrics::new());
    metrics
        .rules
        .set(metrics::gauge_count(common.rules.rules().len()));
    let events = enforcer.take_events();
    let edge_hook = enforcer.edge_hook();
    let (handle, owner) = enforcer.into_task();
    let mut tasks = Tasks::default();
    // The owner finishes the requests queued before shutdown asks it to end.
    tasks.spawn_until("enforcer", |_| owner);
    let health = Arc::new(Health::new(
        PinRoot::new(&common.bpffs_dir),
        started.generation().to_owned(),
        handle.clone(),
        reporting.needs_sync,
    ));
    let recent_attempts = RecentAttempts::default();
    if let Some(ring) = events {
        let namer = Namer::new(target.path().to_path_buf(), reporting.pods.clone());
        let reporter = Reporter::new(
            namer,
            Arc::clone(&metrics),
            recent_attempts.clone(),
            reporting.pod_notices,
        );
        tasks.spawn("event reader", events::read_events(ring, reporter));
    }
    // Before anything is served: a probe that answers 200 implies the
    // gauges operators read are already set.
    refresh_metrics_once(&health, &metrics).await;
    tasks.spawn(
        "metrics refresh",
        refresh_metrics(Arc::clone(&health), Arc::clone(&metrics)),
    );
    edge::announce(
        edge_hook,
        common.refuse_packet_sockets == Switch::On,
        &metrics,
    );
    let (edge_rules, rules_seen) = watch::channel(common.rules.clone());
    // A mode that syncs with an API knows its allowed pods only then; until
    // it publishes them the pinned interface map stays. Standalone mode
    // has none.
    let initial = (!reporting.needs_sync).then(PodAddresses::new);
    let (pod_addresses, addresses_seen) = watch::channel(initial);
    if edge_hook.is_some() {
        tasks.spawn(
            "node edge guard",
            edge::run(
                handle.clone(),
                rules_seen,
                addresses_seen,
                Arc::clone(&metrics),
            ),
        );
    }
    let endpoints = Arc::new(Endpoints {
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        pods: reporting.pods,
        explain: reporting.explain,
        recent_attempts,
    });
    for listener in listeners {
        let endpoints = Arc::clone(&endpoints);
        tasks.spawn_until("http server", |cancel| {
            http::serve(listener, endpoints, cancel)
        });
    }
    Ok(Daemon {
        handle,
        metrics,
        health,
        tasks,
        edge_rules,
        pod_addresses,
    })
}

/// Sets the gauges that mirror the maps from what the kernel holds now.
async fn refresh_metrics_once(health: &Health, metrics: &Metrics) {
    match health.handle.snapshot().await {
        Ok(snapshot) => {
            let audited = snapshot
                .allowed
                .values()
                .filter(|a| **a == Access::Audit)
                .count();
            metrics
                .allowlisted
                .set(metrics::gauge_count(snapshot.allowed.len() - audited));
            metrics.audited.set(metrics::gauge_count(audited));
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

/// The signals a daemon acts on: TERM and INT stop it (leaving the programs
/// pinned), HUP reloads the configuration.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    /// Subscribe before attaching, so no signal falls between.
    fn listen() -> Result<Signals, AppError> {
        let listen = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| AppError::Signal {
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
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The contents of the files we reload from, to notice changes (a
/// ConfigMap update swaps a symlink, which contents comparison sees).
#[derive(PartialEq, Eq)]
struct WatchedFiles(Vec<Option<Vec<u8>>>);

impl WatchedFiles {
    /// The configuration file and the mode's own watched files, as they are now.
    fn read<M: DaemonMode>(sources: &Sources, settings: &Settings<M::Settings>) -> WatchedFiles {
        let paths = sources
            .config_file
            .iter()
            .cloned()
            .chain(M::watched_files(&settings.mode));
        WatchedFiles(paths.map(|p| std::fs::read(p).ok()).collect())
    }
}

/// Logs how the enforcer started and what it enforces.
fn log_start(started: &Started, target: &CgroupDir, common: &Common) {
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
