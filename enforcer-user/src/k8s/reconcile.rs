//! Keeping the allow map equal to the cgroups of the pods the label policy
//! allows, as the watches last reported them.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    bpf::owner::{EnforcerError, EnforcerHandle},
    config::labels::LabelPolicy,
    k8s::{
        layout::{PodLayout, RealDirs},
        view::{ClusterView, PodEntry},
    },
    report::{
        events::{PodNotice, PodRef},
        metrics::Metrics,
    },
};

/// Pause before looking again for pod cgroups that do not exist yet: short
/// at first (the kubelet creates them within milliseconds of the pod
/// event), doubling to at most a second, so waiting is never busy.
const FIRST_RETRY: Duration = Duration::from_millis(20);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Makes the allow map hold the cgroups of the pods the policy allows.
pub struct Reconciler {
    layout: PodLayout,
    applied: Option<BTreeSet<u64>>,
    /// Pods told about once: a label their namespace does not permit.
    warned: BTreeSet<String>,
    /// Allowed pods whose cgroup did not exist at the last pass.
    waiting: usize,
    retry: Duration,
    notices: mpsc::Sender<PodNotice>,
}

impl Reconciler {
    /// A reconciler for the pods under `layout`, telling pods through `notices`.
    pub fn new(layout: PodLayout, notices: mpsc::Sender<PodNotice>) -> Reconciler {
        Reconciler {
            layout,
            applied: None,
            warned: BTreeSet::new(),
            waiting: 0,
            retry: FIRST_RETRY,
            notices,
        }
    }

    pub fn layout(&self) -> &PodLayout {
        &self.layout
    }

    /// How long to wait before looking again for the cgroups of allowed
    /// pods that have none yet; `None` when no pod waits.
    pub fn retry_after(&self) -> Option<Duration> {
        (self.waiting > 0).then_some(self.retry)
    }

    /// Makes the allow map hold the cgroups of the pods `policy` allows in
    /// `view`, telling pods whose label their namespace does not permit.
    pub async fn reconcile(
        &mut self,
        view: &ClusterView,
        policy: &LabelPolicy,
        handle: &EnforcerHandle,
        metrics: &Metrics,
    ) -> Result<(), EnforcerError> {
        let started = Instant::now();
        let (allowed, ignored) = view.judge(policy);
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
            let map_update = Instant::now();
            handle.set_allowed(ids.clone()).await?;
            metrics
                .map_update_seconds
                .observe(map_update.elapsed().as_secs_f64());
            self.applied = Some(ids);
            info!(
                allowed = count,
                waiting_for_cgroup = waiting,
                took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "allow list updated"
            );
        }
        metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn pod_cgroup_id(&self, pod: &PodEntry) -> Option<u64> {
        let dir = self.layout.find_pod_dir(&pod.uid, pod.qos, &RealDirs)?;
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    /// Doubles the retry pause, up to the maximum.
    pub fn back_off(&mut self) {
        self.retry = (self.retry * 2).min(MAX_RETRY);
    }
}
