//! `imds-guard run`: attach to this node's pod cgroup subtree at once (fail
//! closed), then keep the allow map equal to the pods the policy lists, as
//! the API server reports them, and take the startup taint off this node
//! once that holds.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use futures::{FutureExt as _, future::BoxFuture};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    app::{Daemon, DaemonMode, Reporting, Target},
    bpf::{maps::Access, owner::EnforcerError},
    config::{Kubernetes, Settings},
    host::{
        cgroup::{CgroupDir, CgroupError},
        preflight,
    },
    k8s::{
        arrivals::CgroupArrivals,
        layout::{PodLayout, RealDirs},
        notify,
        reachability::Reachability,
        reconcile::Reconciler,
        taint,
        view::{ClusterView, Touched},
        watch::{Change, Update, WatchEnded, Watches},
    },
    report::{
        events::{PodNames, PodNotice},
        explain::{ExplainRequest, Outcome, PodFacts, PodQuery, PolicyTerms},
        metrics::ErrorKind,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "no pod cgroup subtree under {root} (looked for kubepods.slice, kubepods, \
         kubelet.slice/kubelet-kubepods.slice, kubelet/kubepods): set kubernetes.podCgroup"
    )]
    NoPodSubtree { root: PathBuf },
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error("cannot use the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    NoClientConfig(#[source] kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    WatchEnded(#[from] WatchEnded),
}

/// What comes from outside in Kubernetes mode.
pub enum ClusterChange {
    /// Events of the pod or namespace watch.
    Watch(Vec<Update>),
    /// A directory appeared in the pod subtree.
    CgroupsAppeared(std::io::Result<()>),
    /// A deadline passed: what is due runs (a cgroup recheck or write
    /// retry, the reachability probe, the taint removal).
    Due,
    /// The reachability probe answered (or not).
    Probed(bool),
    /// The startup taint removal ended.
    TaintRemoved(Result<bool, kube::Error>),
    /// `explain` asks about a pod.
    Explain(ExplainRequest),
}

/// How long the probe waits for the API server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// This node's pods, watched, and the allow list kept to the policy.
pub struct KubernetesMode {
    reconciler: Reconciler,
    view: ClusterView,
    /// Filled from the view, read by the reporter and `/pods`.
    pods: PodNames,
    notices: mpsc::Sender<PodNotice>,
    /// Handed to the Event publisher at start.
    notice_queue: Option<mpsc::Receiver<PodNotice>>,
    /// Made before anything is loaded, so a bad configuration refuses the
    /// start; used once the programs enforce.
    client: Client,
    /// `None` when inotify is not available (or failed): the reconciler's
    /// one-second recheck finds late cgroups then.
    arrivals: Option<CgroupArrivals>,
    /// Opened at start.
    watches: Option<Watches>,
    reachability: Reachability,
    probe: Option<BoxFuture<'static, bool>>,
    /// When to remove the startup taint (set at the first sync).
    taint_due: Option<Instant>,
    taint_failures: u32,
    taint_removal: Option<BoxFuture<'static, Result<bool, kube::Error>>>,
    announced_sync: bool,
    /// `explain`'s questions, from the endpoints.
    explain_requests: mpsc::Receiver<ExplainRequest>,
    explain_sender: mpsc::Sender<ExplainRequest>,
}

/// `explain` questions waiting at most; more wait for room.
const EXPLAIN_QUEUE: usize = 16;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A future in a slot, polled when there is one; emptied when it ends.
async fn finish<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot.as_mut() {
        Some(future) => {
            let out = future.await;
            *slot = None;
            out
        }
        None => std::future::pending().await,
    }
}

async fn next_arrival(arrivals: Option<&mut CgroupArrivals>) -> std::io::Result<()> {
    match arrivals {
        Some(arrivals) => arrivals.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl KubernetesMode {
    /// Reconciles the pods `touched` once both watches have listed
    /// everything (before, the pinned allow list stays as it was).
    async fn reconcile(
        &mut self,
        touched: &Touched,
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<(), KubernetesError> {
        if !self.watches.as_ref().is_some_and(Watches::synced) {
            return Ok(());
        }
        // The first reconcile after the sync looks at every pod.
        let touched = if self.announced_sync {
            touched
        } else {
            &Touched::All
        };
        self.reconciler
            .reconcile(&self.view, touched, &settings.mode.policy, daemon)
            .await?;
        self.announce_sync(settings, daemon);
        Ok(())
    }

    /// Once the first full list is in the map (not merely computed: its
    /// write may have failed and wait for a retry), the node is synced:
    /// readiness, and then the startup taint.
    fn announce_sync(&mut self, settings: &Settings<Kubernetes>, daemon: &Daemon) {
        let listed = self.watches.as_ref().is_some_and(Watches::synced);
        if !listed || !self.reconciler.in_force() {
            return;
        }
        daemon.metrics.last_sync_timestamp.set(unix_now());
        if !self.announced_sync {
            self.announced_sync = true;
            daemon.health.synced.store(true, Ordering::Relaxed);
            info!(pods = self.view.pod_count(), "synced with the API server");
            if settings.mode.startup_taint.is_some() {
                self.taint_due = Some(Instant::now());
            }
        }
    }

    fn apply_update(&mut self, update: Update, daemon: &Daemon) -> Option<Touched> {
        match update {
            Update::Working(name) => {
                self.reachability.working(name);
                None
            }
            Update::Failed(name, failure) => {
                daemon.metrics.count_error(ErrorKind::Watch);
                self.reachability.failed(name, failure);
                None
            }
            Update::Pod(change) => {
                let touched = match change {
                    Change::Apply(pod) => self.view.apply_pod(pod),
                    Change::Delete(pod) => self.view.delete_pod(&pod.uid),
                    Change::Replace(all) => self.view.replace_pods(all),
                    Change::Nothing => return None,
                };
                self.pods.replace(self.view.names());
                Some(touched)
            }
            Update::Namespace(change) => Some(match change {
                Change::Apply((name, labels)) => self.view.apply_namespace(name, labels),
                Change::Delete((name, _)) => self.view.delete_namespace(&name),
                Change::Replace(all) => self.view.replace_namespaces(all),
                Change::Nothing => return None,
            }),
        }
    }

    /// Starts the probe if reachability wants one now.
    fn start_probe(&mut self, node: &str) {
        let due = self
            .reachability
            .probe_at()
            .is_some_and(|at| at <= Instant::now());
        if due && self.probe.is_none() {
            let nodes = Api::<Node>::all(self.client.clone());
            let node = node.to_owned();
            self.probe = Some(
                async move {
                    // Any answer will do, a refusal too: the daemon may
                    // not be allowed to read its node.
                    tokio::time::timeout(PROBE_TIMEOUT, nodes.get_metadata(&node))
                        .await
                        .is_ok_and(|answer| matches!(answer, Ok(_) | Err(kube::Error::Api(_))))
                }
                .boxed(),
            );
        }
    }

    /// Starts the taint removal if it is due.
    fn start_taint_removal(&mut self, settings: &Kubernetes) {
        let due = self.taint_due.is_some_and(|at| at <= Instant::now());
        if let (true, Some(key)) = (due, &settings.startup_taint) {
            let (client, node, key) =
                (self.client.clone(), settings.node_name.clone(), key.clone());
            self.taint_due = None;
            self.taint_removal =
                Some(async move { taint::remove(client, &node, &key).await }.boxed());
        }
    }
}

impl KubernetesMode {
    /// What the policy made of a pod on this node, and where its cgroup is.
    fn explain(&self, query: &PodQuery, settings: &Settings<Kubernetes>) -> Option<PodFacts> {
        let pod = match query {
            PodQuery::Uid(uid) => self.view.pod(uid),
            PodQuery::Name { namespace, name } => self.view.pod_named(namespace, name),
        }?;
        let policy = &settings.mode.policy;
        let namespace_labels = self.view.namespace_labels(&pod.namespace);
        let pod_label = pod.labels.get(&policy.label_key).cloned();
        let outcome = match self.view.decide(pod, policy).access {
            Some(Access::Allow) => Outcome::Allowed,
            Some(Access::Audit) => Outcome::Audited,
            None if pod_label.as_ref() == Some(&policy.pod_allow_value) => Outcome::LabelIgnored,
            None => Outcome::Blocked,
        };
        Some(PodFacts {
            node: settings.mode.node_name.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            policy: PolicyTerms {
                label_key: policy.label_key.clone(),
                pod_allow_value: policy.pod_allow_value.clone(),
                namespace_allow_value: policy.namespace_allow_value.clone(),
                mode_label_key: policy.mode_label_key.clone(),
            },
            pod_label,
            permission: policy.permission(&pod.namespace, namespace_labels),
            audit_namespace: policy.audits(namespace_labels),
            outcome,
            pod_subtree: self.reconciler.layout().base.clone(),
            cgroup: self.reconciler.pod_cgroup(pod),
        })
    }
}

/// The API client: from `--kubeconfig`, else as kubectl finds it
/// (`KUBECONFIG`, `~/.kube/config`), else in-cluster.
pub async fn client(path: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match path {
        Some(path) => {
            let kubeconfig_error = |source| KubernetesError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => kube::Config::infer()
            .await
            .map_err(KubernetesError::NoClientConfig)?,
    };
    Client::try_from(config).map_err(KubernetesError::Client)
}

impl DaemonMode for KubernetesMode {
    type Settings = Kubernetes;
    type Change = ClusterChange;
    /// The new label policy is in the settings already.
    type Reload = ();
    type Error = KubernetesError;

    /// Attach first: pods not known yet are blocked from the first instant.
    /// The pinned allow list (if any) stays until the first full list.
    async fn prepare(
        settings: &Settings<Kubernetes>,
        cgroup_root: &Path,
    ) -> Result<(KubernetesMode, Target), KubernetesError> {
        preflight::warn_writable_cgroup_mounts(cgroup_root);
        let layout = match &settings.mode.pod_cgroup {
            Some(base) if base.is_absolute() => PodLayout::at(base.clone()),
            Some(base) => PodLayout::at(cgroup_root.join(base)),
            None => PodLayout::detect(cgroup_root, &RealDirs).ok_or_else(|| {
                KubernetesError::NoPodSubtree {
                    root: cgroup_root.to_path_buf(),
                }
            })?,
        };
        let target = Target {
            cgroup: CgroupDir::open(&layout.base, cgroup_root)?,
            allowed: None,
        };
        let arrivals = CgroupArrivals::watch(&layout)
            .inspect_err(|err| {
                warn!("{err}; late pod cgroups are looked for every second instead");
            })
            .ok();
        // After the node's own checks, before anything is loaded.
        let client = client(settings.mode.kubeconfig.as_deref()).await?;
        let (notices, notice_queue) = mpsc::channel(notify::QUEUE);
        let (explain_sender, explain_requests) = mpsc::channel(EXPLAIN_QUEUE);
        let mode = KubernetesMode {
            reconciler: Reconciler::new(layout, notices.clone()),
            view: ClusterView::default(),
            pods: PodNames::default(),
            notices,
            notice_queue: Some(notice_queue),
            client,
            arrivals,
            watches: None,
            reachability: Reachability::default(),
            probe: None,
            taint_due: None,
            taint_failures: 0,
            taint_removal: None,
            announced_sync: false,
            explain_requests,
            explain_sender,
        };
        Ok((mode, target))
    }

    fn reporting(&self) -> Reporting {
        Reporting {
            pods: Some(self.pods.clone()),
            pod_notices: Some(self.notices.clone()),
            needs_sync: true,
            explain: Some(self.explain_sender.clone()),
        }
    }

    async fn start(
        &mut self,
        settings: &Settings<Kubernetes>,
        daemon: &mut Daemon,
    ) -> Result<(), KubernetesError> {
        let node = &settings.mode.node_name;
        info!(%node, driver = ?self.reconciler.layout().driver, "watching this node's pods");
        if let Some(queue) = self.notice_queue.take() {
            daemon.spawn(
                "Kubernetes Event publisher",
                notify::publish(self.client.clone(), node.clone(), queue),
            );
        }
        self.watches = Some(Watches::open(self.client.clone(), node));
        Ok(())
    }

    async fn next_change(&mut self) -> Result<ClusterChange, KubernetesError> {
        let Some(watches) = self.watches.as_mut() else {
            // Not started: nothing comes.
            return std::future::pending().await;
        };
        let probe_at = self
            .reachability
            .probe_at()
            .filter(|_| self.probe.is_none());
        let deadline = [
            self.reconciler.retry_at().map(Instant::from_std),
            probe_at,
            self.taint_due,
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            updates = watches.next() => Ok(ClusterChange::Watch(updates?)),
            appeared = next_arrival(self.arrivals.as_mut()) => Ok(ClusterChange::CgroupsAppeared(appeared)),
            () = sleep_until(deadline) => Ok(ClusterChange::Due),
            reachable = finish(&mut self.probe) => Ok(ClusterChange::Probed(reachable)),
            removed = finish(&mut self.taint_removal) => Ok(ClusterChange::TaintRemoved(removed)),
            Some(request) = self.explain_requests.recv() => Ok(ClusterChange::Explain(request)),
        }
    }

    async fn apply(
        &mut self,
        change: ClusterChange,
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<(), KubernetesError> {
        match change {
            ClusterChange::Explain(request) => {
                // The asker may have given up already.
                let _ = request.reply.send(self.explain(&request.pod, settings));
                return Ok(());
            }
            ClusterChange::Watch(updates) => {
                let mut touched = Vec::new();
                for update in updates {
                    touched.extend(self.apply_update(update, daemon));
                }
                for touched in touched {
                    self.reconcile(&touched, settings, daemon).await?;
                }
            }
            ClusterChange::CgroupsAppeared(result) => {
                if let Err(err) = result {
                    warn!("the pod cgroup watch failed, looking every second instead: {err}");
                    self.arrivals = None;
                }
                self.reconciler.retry(daemon).await?;
                self.announce_sync(settings, daemon);
            }
            ClusterChange::Due => {
                let due = self
                    .reconciler
                    .retry_at()
                    .is_some_and(|at| at <= std::time::Instant::now());
                if due {
                    self.reconciler.retry(daemon).await?;
                    self.announce_sync(settings, daemon);
                }
            }
            ClusterChange::Probed(reachable) => self.reachability.probed(reachable),
            ClusterChange::TaintRemoved(result) => {
                let key = settings.mode.startup_taint.as_deref().unwrap_or_default();
                match result {
                    Ok(removed) => info!(
                        taint = key,
                        removed, "startup taint handled: pods may be scheduled here"
                    ),
                    Err(err) => {
                        daemon.metrics.count_error(ErrorKind::Taint);
                        self.taint_failures += 1;
                        if let Some(pause) = taint::retry_after(&err, self.taint_failures) {
                            warn!(
                                taint = key,
                                retry_in_s = pause.as_secs(),
                                "cannot remove the startup taint, retrying: {err}"
                            );
                            self.taint_due = Some(Instant::now() + pause);
                        } else {
                            warn!(
                                taint = key,
                                "cannot remove the startup taint, and retrying would not help \
                                 (see README, \"Closed from node boot\"): {err}"
                            );
                        }
                    }
                }
            }
        }
        self.start_probe(&settings.mode.node_name);
        self.start_taint_removal(&settings.mode);
        daemon
            .health
            .api_reachable
            .store(self.reachability.reachable(), Ordering::Relaxed);
        Ok(())
    }

    fn plan_reload(&self, _: &Kubernetes) -> Result<(), KubernetesError> {
        Ok(())
    }

    /// The label policy applies at once, to every pod.
    async fn apply_reload(
        &mut self,
        (): (),
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<Option<usize>, KubernetesError> {
        self.reconcile(&Touched::All, settings, daemon).await?;
        Ok(None)
    }
}
