//! `imds-guard run`: attach to this node's pod cgroup subtree at once (fail
//! closed), then keep the allow map equal to the pods the policy allows, as
//! the API server reports them.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    bpf::{
        owner::{Enforcer, EnforcerError, EnforcerHandle, StartSettings},
        pins::PinRoot,
    },
    config::{self, ConfigError, Sources},
    host::{
        cgroup::{CgroupDir, CgroupError},
        preflight,
    },
    k8s::{
        layout::{PodLayout, RealDirs},
        notify,
        view::{ClusterView, PodEntry, namespace_entry},
    },
    report::{
        events::{PodNames, PodNotice, PodRef},
        http::Health,
        metrics::Metrics,
    },
    service::{self, FILE_POLL_INTERVAL, RunOptions, ServiceError, Signals, WatchedFiles},
};

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "no pod cgroup subtree under {root} (looked for kubepods.slice, kubepods, \
         kubelet.slice/kubelet-kubepods.slice, kubelet/kubepods): set kubernetes.podCgroup"
    )]
    NoPodSubtree { root: PathBuf },
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

type Settings = config::Settings<config::Kubernetes>;

/// Checks everything that needs no privilege, before the kernel is touched.
pub fn check(sources: &Sources) -> Result<(), ConfigError> {
    Settings::resolve(sources).map(|_| ())
}

/// Feeds watcher events into a list that a full (re)list replaces whole, so
/// objects deleted while the watch was away disappear.
struct Relist<T> {
    buffer: Option<Vec<T>>,
    synced: bool,
}

/// What a watcher event changes.
enum Change<T> {
    Apply(T),
    Delete(T),
    Replace(Vec<T>),
    Nothing,
}

impl<T> Relist<T> {
    fn new() -> Self {
        Relist {
            buffer: None,
            synced: false,
        }
    }

    fn feed<K>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> Change<T> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                Change::Nothing
            }
            watcher::Event::InitApply(object) => {
                if let (Some(buffer), Some(entry)) = (self.buffer.as_mut(), convert(&object)) {
                    buffer.push(entry);
                }
                Change::Nothing
            }
            watcher::Event::InitDone => {
                self.synced = true;
                Change::Replace(self.buffer.take().unwrap_or_default())
            }
            watcher::Event::Apply(object) => {
                convert(&object).map_or(Change::Nothing, Change::Apply)
            }
            watcher::Event::Delete(object) => {
                convert(&object).map_or(Change::Nothing, Change::Delete)
            }
        }
    }
}

/// Waits for the next event of a watch; an ended watch is an error (the
/// watcher retries on its own, with backoff, and never ends).
async fn next_event<K>(
    stream: &mut (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin),
    what: &'static str,
) -> Result<Option<watcher::Event<K>>, KubernetesError> {
    match stream.next().await {
        Some(Ok(event)) => Ok(Some(event)),
        Some(Err(err)) => {
            warn!(
                watch = what,
                "API server watch failed, retrying with backoff: {err}"
            );
            Ok(None)
        }
        None => Err(KubernetesError::WatchEnded(what)),
    }
}

/// Pause before looking again for pod cgroups that do not exist yet: short
/// at first (the kubelet creates them within milliseconds of the pod
/// event), doubling to at most a second, so waiting is never busy.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Makes the allow map hold the cgroups of the pods the policy allows.
struct Reconciler {
    layout: PodLayout,
    applied: Option<BTreeSet<u64>>,
    /// Pods told about once: a label their namespace does not permit.
    warned: BTreeSet<String>,
    /// Allowed pods whose cgroup did not exist at the last pass.
    waiting: usize,
    retry: Duration,
    notices: mpsc::Sender<PodNotice>,
    metrics: Arc<Metrics>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Reconciler {
    async fn reconcile(
        &mut self,
        view: &ClusterView,
        settings: &Settings,
        handle: &EnforcerHandle,
    ) -> Result<(), EnforcerError> {
        let started = Instant::now();
        let (allowed, ignored) = view.judge(&settings.mode.policy);
        for uid in &ignored {
            if self.warned.insert((*uid).to_owned())
                && let Some(pod) = view.pod(uid)
            {
                warn!(
                    namespace = %pod.namespace,
                    pod = %pod.name,
                    "pod asks for metadata access, but its namespace does not permit it: it stays blocked"
                );
                // A full queue means the API is behind: the log has it.
                let _ = self.notices.try_send(PodNotice::LabelIgnored {
                    pod: PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                    },
                });
            }
        }
        self.warned.retain(|uid| ignored.contains(uid.as_str()));
        let mut ids = BTreeSet::new();
        let mut waiting = 0;
        for pod in &allowed {
            match self.pod_cgroup_id(pod) {
                Some(id) => {
                    ids.insert(id);
                }
                None => waiting += 1,
            }
        }
        if waiting == 0 || waiting < self.waiting {
            self.retry = FIRST_RETRY;
        }
        self.waiting = waiting;
        if self.applied.as_ref() != Some(&ids) {
            let count = ids.len();
            let writing = Instant::now();
            handle.set_allowed(ids.clone()).await?;
            self.metrics
                .map_update_seconds
                .observe(writing.elapsed().as_secs_f64());
            self.applied = Some(ids);
            info!(
                allowed = count,
                waiting_for_cgroup = waiting,
                took_us = started.elapsed().as_micros() as u64,
                "allow list updated"
            );
        }
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn pod_cgroup_id(&self, pod: &PodEntry) -> Option<u64> {
        let dir = self.layout.find_pod_dir(&pod.uid, pod.qos, &RealDirs)?;
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    /// Doubles the retry pause, up to the maximum.
    fn back_off(&mut self) {
        self.retry = (self.retry * 2).min(MAX_RETRY);
    }
}

/// Runs until SIGTERM or SIGINT; the programs stay pinned.
pub async fn run(sources: Sources) -> Result<(), KubernetesError> {
    let watched = |s: &Sources| WatchedFiles::read(&[s.config_file.as_deref()]);
    // The file is looked at before the settings are read from it, so a
    // change in between shows as a change at the first poll.
    let mut seen = watched(&sources);
    let mut settings = Settings::resolve(&sources)?;
    let root = service::prepare(&settings.common)?;
    preflight::warn_writable_cgroup_mounts(&root);
    let layout = match &settings.mode.pod_cgroup {
        Some(base) if base.is_absolute() => PodLayout::at(base.clone()),
        Some(base) => PodLayout::at(root.join(base)),
        None => PodLayout::detect(&root, &RealDirs)
            .ok_or_else(|| KubernetesError::NoPodSubtree { root: root.clone() })?,
    };
    let target = CgroupDir::open(&layout.base, &root)?;
    let mut signals = Signals::listen()?;

    // Attach first: pods not known yet are blocked from the first instant.
    // The pinned allow list (if any) stays until the first full list.
    let pins = PinRoot::new(&settings.common.bpffs_dir);
    let (enforcer, started) = Enforcer::start(&StartSettings {
        pins: &pins,
        mode: settings.common.mode,
        rules: &settings.common.rules,
        cgroup: &target,
        allowed: None,
    })?;
    service::log_start(&started, &target, &settings.common);
    info!(node = %settings.mode.node_name, driver = ?layout.driver, "watching this node's pods");
    let pod_names = PodNames::default();
    let (notices, notice_queue) = mpsc::channel(notify::QUEUE);
    let options = RunOptions {
        http_listen: settings.common.http_listen,
        pods: Some(pod_names.clone()),
        pod_events: Some(notices.clone()),
        needs_sync: true,
    };
    let running = service::start(enforcer, &started, &target, &settings.common, options).await?;

    let client = Client::try_default()
        .await
        .map_err(KubernetesError::Client)?;
    let publisher = tokio::spawn(notify::publish(
        client.clone(),
        settings.mode.node_name.clone(),
        notice_queue,
    ));
    let prober = tokio::spawn(probe_api(client.clone(), Arc::clone(&running.health)));
    let node_field = format!("spec.nodeName={}", settings.mode.node_name);
    let mut pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&node_field),
    )
    .default_backoff()
    .boxed();
    let mut namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();

    let mut view = ClusterView::default();
    let mut pod_list = Relist::new();
    let mut namespace_list = Relist::new();
    let mut reconciler = Reconciler {
        layout,
        applied: None,
        warned: BTreeSet::new(),
        waiting: 0,
        retry: FIRST_RETRY,
        notices,
        metrics: Arc::clone(&running.metrics),
    };
    let health = Arc::clone(&running.health);
    let mut announced_sync = false;
    let mut poll = tokio::time::interval(FILE_POLL_INTERVAL);
    loop {
        let retry_after = reconciler.retry;
        let changed = tokio::select! {
            _ = signals.terminate.recv() => break,
            _ = signals.interrupt.recv() => break,
            event = next_event(&mut pods, "pods") => {
                let event = event?;
                health.api_reachable.store(event.is_some(), Ordering::Relaxed);
                match event.map(|e| pod_list.feed(e, PodEntry::from_pod)) {
                    Some(Change::Apply(pod)) => view.apply_pod(pod),
                    Some(Change::Delete(pod)) => view.delete_pod(&pod.uid),
                    Some(Change::Replace(all)) => view.replace_pods(all),
                    Some(Change::Nothing) | None => {}
                }
                pod_names.replace(view.names());
                true
            }
            event = next_event(&mut namespaces, "namespaces") => {
                let event = event?;
                health.api_reachable.store(event.is_some(), Ordering::Relaxed);
                match event.map(|e| namespace_list.feed(e, namespace_entry)) {
                    Some(Change::Apply((name, labels))) => view.apply_namespace(name, labels),
                    Some(Change::Delete((name, _))) => view.delete_namespace(&name),
                    Some(Change::Replace(all)) => view.replace_namespaces(all),
                    Some(Change::Nothing) | None => {}
                }
                true
            }
            _ = tokio::time::sleep(retry_after), if reconciler.waiting > 0 => {
                reconciler.back_off();
                true
            }
            reload = async {
                tokio::select! {
                    _ = signals.hangup.recv() => true,
                    _ = poll.tick() => {
                        let now = watched(&sources);
                        let changed = now != seen;
                        seen = now;
                        changed
                    }
                }
            } => {
                if reload {
                    seen = watched(&sources);
                    match reload_settings(&sources, &settings, &running.handle).await {
                        Ok(new) => {
                            running.metrics.rules.set(new.common.rules.rules().len() as i64);
                            settings = new;
                        }
                        Err(err) => warn!("configuration not reloaded, the running one stays: {err}"),
                    }
                }
                reload
            }
        };
        if !(changed && pod_list.synced && namespace_list.synced) {
            continue;
        }
        reconciler
            .reconcile(&view, &settings, &running.handle)
            .await?;
        running.metrics.last_sync_timestamp.set(unix_now());
        if !announced_sync {
            announced_sync = true;
            health.synced.store(true, Ordering::Relaxed);
            info!(pods = view.pod_count(), "synced with the API server");
        }
    }
    publisher.abort();
    prober.abort();
    running.stop().await;
    Ok(())
}

/// How often the API server's reachability is checked for readiness.
const API_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps `api_reachable` true while the API server answers. Quiet watches
/// yield no events (kube keeps bookmarks to itself), so readiness cannot
/// learn of a recovery from them alone.
async fn probe_api(client: Client, health: Arc<Health>) {
    let namespaces = Api::<Namespace>::all(client);
    let one = ListParams::default().limit(1);
    let mut tick = tokio::time::interval(API_PROBE_INTERVAL);
    loop {
        tick.tick().await;
        let reachable = namespaces.list(&one).await.is_ok();
        health.api_reachable.store(reachable, Ordering::Relaxed);
    }
}

/// Re-reads the configuration; the rules and the label policy apply at once.
async fn reload_settings(
    sources: &Sources,
    running: &Settings,
    handle: &EnforcerHandle,
) -> Result<Settings, KubernetesError> {
    let new = Settings::resolve(sources)?;
    let settings = service::apply_reload(running, new, handle).await?;
    info!(
        rules = settings.common.rules.rules().len(),
        "configuration reloaded"
    );
    Ok(settings)
}
