//! Keeping the allow map equal to the cgroups of the pods the policy lists
//! (allowed, or audited), as the watches last reported them. Each change
//! re-decides only the pods it touched; a pod's cgroup id, once found, is
//! kept until the pod goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    app::Daemon,
    bpf::{
        maps::{Access, CgroupAccess},
        owner::EnforcerError,
    },
    config::labels::LabelPolicy,
    edge::PodAddresses,
    k8s::{
        layout::{PodLayout, Qos, RealDirs},
        view::{ClusterView, PodEntry, Touched},
    },
    report::{
        events::{PodNotice, PodRef},
        explain::FoundCgroup,
        metrics::ErrorKind,
    },
};

/// Look again for missing pod cgroups at least this often: the cgroup
/// watch wakes the reconciler as soon as one appears, this only covers a
/// missed notification.
const CGROUP_RECHECK: Duration = Duration::from_secs(1);

/// Pause after a failed map write, doubling up to the maximum.
const FIRST_WRITE_RETRY: Duration = Duration::from_millis(100);
const MAX_WRITE_RETRY: Duration = Duration::from_secs(5);
/// How long map writes may keep failing before the daemon gives up (and
/// the kubelet restarts it; enforcement stays pinned meanwhile).
const FATAL_WRITE_FAILING: Duration = Duration::from_mins(1);

/// A listed pod: what the map should hold for it, and its cgroup once found.
struct Listed {
    access: Access,
    cgroup_uid: String,
    qos: Option<Qos>,
    cgroup: Option<u64>,
    pod_ips: Vec<IpAddr>,
}

/// The cgroup of the pod with cgroup UID `uid`, if it exists.
fn find_cgroup(layout: &PodLayout, uid: &str, qos: Option<Qos>) -> Option<FoundCgroup> {
    let path = layout.find_pod_dir(uid, qos, &RealDirs)?;
    let id = std::fs::metadata(&path).ok()?.ino();
    Some(FoundCgroup { id, path })
}

/// Makes the allow map hold the cgroups of the pods the policy lists.
pub struct Reconciler {
    layout: PodLayout,
    listed: BTreeMap<String, Listed>,
    applied: Option<CgroupAccess>,
    /// Pods told about once: a label their namespace does not permit.
    warned: BTreeSet<String>,
    /// When to look again (missing cgroups, a failed write); a deadline, so
    /// other wake-ups of the loop do not push it back.
    retry_at: Option<Instant>,
    write_failures: u32,
    /// When the current run of failed writes began.
    failing_since: Option<Instant>,
    notices: mpsc::Sender<PodNotice>,
}

impl Reconciler {
    /// A reconciler for the pods under `layout`, telling pods through `notices`.
    pub fn new(layout: PodLayout, notices: mpsc::Sender<PodNotice>) -> Reconciler {
        Reconciler {
            layout,
            listed: BTreeMap::new(),
            applied: None,
            warned: BTreeSet::new(),
            retry_at: None,
            write_failures: 0,
            failing_since: None,
            notices,
        }
    }

    /// Whether the map holds what a reconcile computed (a first write may
    /// still wait for its retry).
    pub fn in_force(&self) -> bool {
        self.applied.is_some()
    }

    pub fn layout(&self) -> &PodLayout {
        &self.layout
    }

    /// When to call [`Reconciler::retry`]; `None` when nothing waits.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether a listed pod still has no cgroup.
    fn waiting(&self) -> usize {
        self.listed.values().filter(|l| l.cgroup.is_none()).count()
    }

    /// Re-decides the `touched` pods of `view`, then brings the map in line.
    pub async fn reconcile(
        &mut self,
        view: &ClusterView,
        touched: &Touched,
        policy: &LabelPolicy,
        daemon: &Daemon,
    ) -> Result<(), EnforcerError> {
        let started = Instant::now();
        let uids: Vec<String> = match touched {
            Touched::All => view
                .uids()
                .chain(self.listed.keys().map(String::as_str))
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            Touched::Pods(uids) => uids.iter().cloned().collect(),
        };
        for uid in uids {
            if let Some(pod) = view.pod(&uid) {
                self.decide(pod, view, policy);
            } else {
                self.listed.remove(&uid);
                self.warned.remove(&uid);
            }
        }
        self.sync(daemon).await?;
        daemon
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Looks again for missing cgroups, or retries a failed write.
    pub async fn retry(&mut self, daemon: &Daemon) -> Result<(), EnforcerError> {
        self.sync(daemon).await
    }

    fn decide(&mut self, pod: &PodEntry, view: &ClusterView, policy: &LabelPolicy) {
        let decision = view.decide(pod, policy);
        if !decision.label_ignored {
            self.warned.remove(&pod.uid);
        } else if self.warned.insert(pod.uid.clone()) {
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
        match decision.access {
            Some(access) => {
                let cgroup = self.listed.get(&pod.uid).and_then(|l| l.cgroup);
                let listed = Listed {
                    access,
                    cgroup_uid: pod.cgroup_uid.clone(),
                    qos: pod.qos,
                    cgroup,
                    pod_ips: pod.pod_ips.clone(),
                };
                self.listed.insert(pod.uid.clone(), listed);
            }
            None => {
                self.listed.remove(&pod.uid);
            }
        }
    }

    fn find_missing_cgroups(&mut self) {
        for listed in self.listed.values_mut() {
            if listed.cgroup.is_none() {
                listed.cgroup =
                    find_cgroup(&self.layout, &listed.cgroup_uid, listed.qos).map(|found| found.id);
            }
        }
    }

    /// The pod's cgroup as it is now, for `explain`.
    pub fn pod_cgroup(&self, pod: &PodEntry) -> Option<FoundCgroup> {
        find_cgroup(&self.layout, &pod.cgroup_uid, pod.qos)
    }

    /// Writes the map if what it should hold changed. A failed write is
    /// counted and retried with back-off; only a persistent failure is
    /// returned.
    async fn sync(&mut self, daemon: &Daemon) -> Result<(), EnforcerError> {
        let (handle, metrics) = (&daemon.handle, &*daemon.metrics);
        // The node edge guard lets listed pods' interfaces through, found by
        // their addresses; it needs no cgroup for that.
        let addresses: PodAddresses = self
            .listed
            .values()
            .flat_map(|l| l.pod_ips.iter().map(|ip| (*ip, l.access)))
            .collect();
        daemon.publish_pod_addresses(addresses);
        self.find_missing_cgroups();
        let wanted: CgroupAccess = self
            .listed
            .values()
            .filter_map(|l| l.cgroup.map(|id| (id, l.access)))
            .collect();
        let waiting = self.waiting();
        // A deadline already set stays: a stream of other events must not
        // keep pushing the recheck back.
        let now = Instant::now();
        self.retry_at = match self.retry_at {
            _ if waiting == 0 => None,
            Some(at) if at > now => Some(at),
            _ => Some(now + CGROUP_RECHECK),
        };
        if self.applied.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let map_update = Instant::now();
        match handle.set_allowed(wanted.clone()).await {
            Ok(()) => {
                metrics
                    .map_update_seconds
                    .observe(map_update.elapsed().as_secs_f64());
                self.write_failures = 0;
                self.failing_since = None;
                let audited = wanted.values().filter(|a| **a == Access::Audit).count();
                info!(
                    allowed = wanted.len() - audited,
                    audited,
                    waiting_for_cgroup = waiting,
                    took_us = u64::try_from(map_update.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "allow list updated"
                );
                self.applied = Some(wanted);
                Ok(())
            }
            Err(err) => {
                metrics.count_error(ErrorKind::MapWrite);
                self.write_failures += 1;
                let since = *self.failing_since.get_or_insert(now);
                if now.duration_since(since) >= FATAL_WRITE_FAILING {
                    return Err(err);
                }
                let pause = FIRST_WRITE_RETRY
                    .saturating_mul(1 << (self.write_failures - 1).min(8))
                    .min(MAX_WRITE_RETRY);
                warn!(
                    failures = self.write_failures,
                    retry_in_ms = pause.as_millis(),
                    "cannot write the allow list, retrying: {err}"
                );
                self.retry_at = Some(Instant::now() + pause);
                Ok(())
            }
        }
    }
}
