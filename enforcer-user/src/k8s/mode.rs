//! `imds-guard run`: attach to this node's pod cgroup subtree at once (fail
//! closed), then keep the allow map equal to the pods the policy allows, as
//! the API server reports them.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use kube::Client;
use tokio::sync::mpsc;
use tracing::info;

use crate::{
    app::{Daemon, DaemonMode, Reporting, Target},
    bpf::owner::EnforcerError,
    config::{Kubernetes, Settings},
    host::{
        cgroup::{CgroupDir, CgroupError},
        preflight,
    },
    k8s::{
        layout::{PodLayout, RealDirs},
        notify,
        reconcile::Reconciler,
        view::ClusterView,
        watch::{self, Change, Update, WatchEnded, Watches},
    },
    report::events::{PodNames, PodNotice},
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
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    WatchEnded(#[from] WatchEnded),
}

/// What comes from outside in Kubernetes mode.
pub enum ClusterChange {
    /// An event of the pod or namespace watch.
    Watch(Update),
    /// Time to look again for the cgroups of allowed pods that had none.
    RetryCgroups,
}

/// This node's pods, watched, and the allow list kept to the policy.
pub struct KubernetesMode {
    reconciler: Reconciler,
    view: ClusterView,
    /// Filled from the view, read by the reporter and `/pods`.
    pods: PodNames,
    notices: mpsc::Sender<PodNotice>,
    /// Handed to the Event publisher at start.
    notice_queue: Option<mpsc::Receiver<PodNotice>>,
    /// Opened at start.
    watches: Option<Watches>,
    announced_sync: bool,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl KubernetesMode {
    /// Reconciles once both watches have listed everything (before, the
    /// pinned allow list stays as it was).
    async fn reconcile_when_synced(
        &mut self,
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<(), KubernetesError> {
        if !self.watches.as_ref().is_some_and(Watches::synced) {
            return Ok(());
        }
        self.reconciler
            .reconcile(
                &self.view,
                &settings.mode.policy,
                &daemon.handle,
                &daemon.metrics,
            )
            .await?;
        daemon.metrics.last_sync_timestamp.set(unix_now());
        if !self.announced_sync {
            self.announced_sync = true;
            daemon.health.synced.store(true, Ordering::Relaxed);
            info!(pods = self.view.pod_count(), "synced with the API server");
        }
        Ok(())
    }
}

impl DaemonMode for KubernetesMode {
    type Settings = Kubernetes;
    type Change = ClusterChange;
    /// The new label policy is in the settings already.
    type Reload = ();
    type Error = KubernetesError;

    /// Attach first: pods not known yet are blocked from the first instant.
    /// The pinned allow list (if any) stays until the first full list.
    fn prepare(
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
        let (notices, notice_queue) = mpsc::channel(notify::QUEUE);
        let mode = KubernetesMode {
            reconciler: Reconciler::new(layout, notices.clone()),
            view: ClusterView::default(),
            pods: PodNames::default(),
            notices,
            notice_queue: Some(notice_queue),
            watches: None,
            announced_sync: false,
        };
        Ok((mode, target))
    }

    fn reporting(&self) -> Reporting {
        Reporting {
            pods: Some(self.pods.clone()),
            pod_notices: Some(self.notices.clone()),
            needs_sync: true,
        }
    }

    async fn start(
        &mut self,
        settings: &Settings<Kubernetes>,
        daemon: &mut Daemon,
    ) -> Result<(), KubernetesError> {
        let node = &settings.mode.node_name;
        info!(%node, driver = ?self.reconciler.layout().driver, "watching this node's pods");
        let client = Client::try_default()
            .await
            .map_err(KubernetesError::Client)?;
        if let Some(queue) = self.notice_queue.take() {
            daemon.spawn(
                "Kubernetes Event publisher",
                notify::publish(client.clone(), node.clone(), queue),
            );
        }
        daemon.spawn(
            "API server probe",
            watch::probe_api(client.clone(), std::sync::Arc::clone(&daemon.health)),
        );
        self.watches = Some(Watches::open(client, node));
        Ok(())
    }

    async fn next_change(&mut self) -> Result<ClusterChange, KubernetesError> {
        let Some(watches) = self.watches.as_mut() else {
            // Not started: nothing comes.
            return std::future::pending().await;
        };
        let retry = self.reconciler.retry_after();
        tokio::select! {
            update = watches.next() => Ok(ClusterChange::Watch(update?)),
            () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {
                Ok(ClusterChange::RetryCgroups)
            }
        }
    }

    async fn apply(
        &mut self,
        change: ClusterChange,
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<(), KubernetesError> {
        match change {
            ClusterChange::Watch(update) => {
                let reachable = !matches!(update, Update::Failed);
                daemon
                    .health
                    .api_reachable
                    .store(reachable, Ordering::Relaxed);
                match update {
                    Update::Pod(change) => {
                        match change {
                            Change::Apply(pod) => self.view.apply_pod(pod),
                            Change::Delete(pod) => self.view.delete_pod(&pod.uid),
                            Change::Replace(all) => self.view.replace_pods(all),
                            Change::Nothing => {}
                        }
                        self.pods.replace(self.view.names());
                    }
                    Update::Namespace(change) => match change {
                        Change::Apply((name, labels)) => self.view.apply_namespace(name, labels),
                        Change::Delete((name, _)) => self.view.delete_namespace(&name),
                        Change::Replace(all) => self.view.replace_namespaces(all),
                        Change::Nothing => {}
                    },
                    Update::Failed => {}
                }
            }
            ClusterChange::RetryCgroups => self.reconciler.back_off(),
        }
        self.reconcile_when_synced(settings, daemon).await
    }

    fn plan_reload(&self, _: &Kubernetes) -> Result<(), KubernetesError> {
        Ok(())
    }

    /// The label policy applies at once.
    async fn apply_reload(
        &mut self,
        (): (),
        settings: &Settings<Kubernetes>,
        daemon: &Daemon,
    ) -> Result<Option<usize>, KubernetesError> {
        self.reconcile_when_synced(settings, daemon).await?;
        Ok(None)
    }
}
