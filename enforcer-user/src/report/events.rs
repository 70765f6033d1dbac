//! What the kernel reports about refused (and audited) attempts, turned
//! into log records, metrics and, in Kubernetes mode, Events on the pod.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime},
};

use enforcer_common::{
    BlockEvent, FORWARDED_KEY, HOOK_CONNECT, HOOK_EGRESS, HOOK_FORWARD, HOOK_PACKET_SOCKET,
    HOOK_SENDMSG, HOOK_SOCKET_CREATE, VERDICT_AUDITED,
    rule::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::warn;

use crate::{
    bpf::maps::EventRing,
    host::{cgroup, identity::identify},
    report::{
        explain::{Attempt, RecentAttempts, unix_seconds},
        metrics::{AttemptLabels, Metrics},
    },
};

/// Who made an attempt, as far as we can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The cgroup's path, or `cgroup id N` when it is gone.
    pub cgroup: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

/// Pods by UID: (namespace, name).
pub type PodIndex = BTreeMap<String, (String, String)>;

/// This node's pods, as Kubernetes mode last saw them: it fills them in,
/// and the reporter and `/pods` read them. Reporting owns the type so it
/// needs nothing of Kubernetes mode.
#[derive(Clone, Debug, Default)]
pub struct PodNames(Arc<RwLock<PodIndex>>);

impl PodNames {
    /// Replaces every entry.
    pub fn replace(&self, pods: PodIndex) {
        // A writer that panicked left whole entries: the index stays usable.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = pods;
    }

    /// The namespace and name of the pod with `uid`.
    pub fn get(&self, uid: &str) -> Option<(String, String)> {
        let pods = self.0.read().unwrap_or_else(PoisonError::into_inner);
        pods.get(uid).cloned()
    }

    /// Every entry.
    pub fn all(&self) -> PodIndex {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Turns cgroup ids into workloads: the cgroup path (found under the
/// protected subtree, cached), and in Kubernetes mode the pod it belongs to.
pub struct Namer {
    subtree: PathBuf,
    paths: Mutex<HashMap<u64, Option<PathBuf>>>,
    pods: Option<PodNames>,
}

/// Cgroup paths cached at most; the cache starts over when full.
const MAX_CACHED_PATHS: usize = 4096;

impl Namer {
    pub fn new(subtree: PathBuf, pods: Option<PodNames>) -> Namer {
        Namer {
            subtree,
            paths: Mutex::new(HashMap::new()),
            pods,
        }
    }

    pub fn workload(&self, cgroup_id: u64) -> Workload {
        // The node edge guard's forwarded packets are keyed by the
        // interface they entered the node on, not by a cgroup.
        if cgroup_id & FORWARDED_KEY != 0 {
            return Workload {
                cgroup: format!(
                    "forwarded, entered the node on interface {}",
                    cgroup_id & u64::from(u32::MAX)
                ),
                ..Workload::default()
            };
        }
        let path = {
            let mut paths = self
                .paths
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if paths.len() >= MAX_CACHED_PATHS {
                paths.clear();
            }
            paths
                .entry(cgroup_id)
                .or_insert_with(|| cgroup::find_by_id(&self.subtree, cgroup_id))
                .clone()
        };
        let Some(path) = path else {
            return Workload {
                cgroup: format!("cgroup id {cgroup_id}"),
                ..Workload::default()
            };
        };
        let identity = identify(&path);
        let pod = identity
            .as_ref()
            .and_then(|id| self.pods.as_ref()?.get(&id.pod_uid));
        Workload {
            cgroup: path.display().to_string(),
            namespace: pod.as_ref().map(|(ns, _)| ns.clone()),
            pod: pod.map(|(_, name)| name),
            pod_uid: identity.as_ref().map(|id| id.pod_uid.clone()),
            container: identity.and_then(|id| id.container_id),
        }
    }
}

/// The destination of an event as people write it.
pub fn destination(event: &BlockEvent) -> String {
    let v6 = Ipv6Addr::from(event.destination);
    let addr = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    match (event.port, addr) {
        (0, addr) => addr.to_string(),
        (port, IpAddr::V4(a)) => format!("{a}:{port}"),
        (port, IpAddr::V6(a)) => format!("[{a}]:{port}"),
    }
}

fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_CONNECT => "connect",
        HOOK_SENDMSG => "sendmsg",
        HOOK_EGRESS => "egress",
        HOOK_FORWARD => "forward",
        HOOK_PACKET_SOCKET => "packet-socket",
        HOOK_SOCKET_CREATE => "socket-create",
        _ => "unknown",
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    match u32::from(protocol) {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        _ => "other",
    }
}

pub fn verdict_name(verdict: u8) -> &'static str {
    if verdict == VERDICT_AUDITED {
        "audited"
    } else {
        "refused"
    }
}

/// A pod, as a Kubernetes Event refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What a pod should be told about, as a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNotice {
    /// An attempt to reach a denied destination (first of its window).
    Attempt {
        pod: PodRef,
        destination: String,
        audited: bool,
    },
    /// The pod asks for access, but its namespace does not permit it.
    LabelIgnored { pod: PodRef },
}

impl PodNotice {
    /// The pod the notice is about.
    pub fn pod(&self) -> &PodRef {
        match self {
            PodNotice::Attempt { pod, .. } | PodNotice::LabelIgnored { pod } => pod,
        }
    }
}

/// How long one (workload, destination, verdict) is logged once.
pub const LOG_WINDOW: Duration = Duration::from_mins(1);
/// Distinct keys tracked at most; past it, windows start over.
const MAX_WINDOWS: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    workload: String,
    destination: String,
    verdict: u8,
}

struct Window {
    opened: Instant,
    repeats: u64,
}

/// Logs each distinct (workload, destination, verdict) once per window,
/// with the count of repeats when the window closes, and counts every
/// attempt in the metrics.
pub struct Reporter {
    namer: Namer,
    metrics: Arc<Metrics>,
    recent: RecentAttempts,
    windows: HashMap<Key, Window>,
    pod_events: Option<mpsc::Sender<PodNotice>>,
}

impl Reporter {
    pub fn new(
        namer: Namer,
        metrics: Arc<Metrics>,
        recent: RecentAttempts,
        pod_events: Option<mpsc::Sender<PodNotice>>,
    ) -> Reporter {
        Reporter {
            namer,
            metrics,
            recent,
            windows: HashMap::new(),
            pod_events,
        }
    }

    pub fn record(&mut self, event: &BlockEvent, now: Instant) {
        let workload = self.namer.workload(event.cgroup_id);
        let destination = destination(event);
        let verdict = verdict_name(event.verdict);
        self.recent.record(
            event.cgroup_id,
            Attempt {
                at: unix_seconds(SystemTime::now()),
                destination: destination.clone(),
                hook: hook_name(event.hook).to_owned(),
                verdict: verdict.to_owned(),
            },
        );
        self.metrics.count_attempt(AttemptLabels {
            namespace: workload.namespace.clone().unwrap_or_default(),
            pod: workload.pod.clone().unwrap_or_default(),
            destination: destination.clone(),
            verdict: verdict.to_owned(),
        });
        let key = Key {
            workload: match (&workload.namespace, &workload.pod) {
                (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
                _ => workload.cgroup.clone(),
            },
            destination: destination.clone(),
            verdict: event.verdict,
        };
        if let Some(window) = self.windows.get_mut(&key) {
            window.repeats += 1;
            return;
        }
        if self.windows.len() >= MAX_WINDOWS {
            self.flush(now + LOG_WINDOW);
        }
        self.windows.insert(
            key,
            Window {
                opened: now,
                repeats: 0,
            },
        );
        warn!(
            namespace = workload.namespace.as_deref().unwrap_or(""),
            pod = workload.pod.as_deref().unwrap_or(""),
            container = workload.container.as_deref().unwrap_or(""),
            cgroup = %workload.cgroup,
            %destination,
            protocol = protocol_name(event.protocol),
            hook = hook_name(event.hook),
            verdict,
            "attempt to reach a metadata address"
        );
        if let (Some(sender), Some(namespace), Some(pod), Some(pod_uid)) = (
            &self.pod_events,
            workload.namespace,
            workload.pod,
            workload.pod_uid,
        ) {
            // A full queue means the API is behind: the log and metrics have it.
            let _ = sender.try_send(PodNotice::Attempt {
                pod: PodRef {
                    namespace,
                    name: pod,
                    uid: pod_uid,
                },
                destination,
                audited: event.verdict == VERDICT_AUDITED,
            });
        }
    }

    /// Closes the windows older than [`LOG_WINDOW`], logging their repeats.
    pub fn flush(&mut self, now: Instant) {
        self.windows.retain(|key, window| {
            if now.duration_since(window.opened) < LOG_WINDOW {
                return true;
            }
            if window.repeats > 0 {
                warn!(
                    workload = %key.workload,
                    destination = %key.destination,
                    verdict = verdict_name(key.verdict),
                    repeats = window.repeats,
                    "attempts repeated within the last window"
                );
            }
            false
        });
    }
}

/// Events read per wake-up at most, so one flood cannot starve the rest.
const DRAIN_BATCH: usize = 4096;

/// Reads the ring buffer as it fills; never blocks the kernel side.
pub async fn read_events(ring: EventRing, mut reporter: Reporter) {
    // SAFETY: the ring owns its file descriptor, which stays open (and is
    // not closed or reused) for as long as the AsyncFd holds the ring.
    let mut ring = match unsafe { AsyncFd::register(ring) } {
        Ok(ring) => ring,
        Err(err) => {
            warn!("cannot poll the event ring buffer, events are not reported: {err}");
            return;
        }
    };
    let mut flush = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else {
                    warn!("the event ring buffer stopped being readable");
                    return;
                };
                let events = guard.get_inner_mut().drain(DRAIN_BATCH);
                let now = Instant::now();
                for event in &events {
                    reporter.record(event, now);
                }
                if events.len() < DRAIN_BATCH {
                    guard.clear_ready();
                }
            }
            _ = flush.tick() => reporter.flush(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{ipv4_mapped, rule::PROTO_TCP};

    use super::*;

    fn event(cgroup_id: u64, port: u16, verdict: u8) -> BlockEvent {
        BlockEvent::new(
            cgroup_id,
            0,
            ipv4_mapped([169, 254, 169, 254]),
            port,
            u8::try_from(PROTO_TCP).unwrap(),
            HOOK_CONNECT,
            verdict,
        )
    }

    #[test]
    fn destinations_read_as_people_write_them() {
        assert_eq!(destination(&event(1, 80, 1)), "169.254.169.254:80");
        assert_eq!(destination(&event(1, 0, 1)), "169.254.169.254");
        let mut v6 = event(1, 80, 1);
        v6.destination = "fd00:ec2::254".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(destination(&v6), "[fd00:ec2::254]:80");
    }

    #[test]
    fn repeats_are_counted_not_logged_and_pods_are_told_once_per_window() {
        let (sender, mut receiver) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let namer = Namer::new(PathBuf::from("/nonexistent"), None);
        let mut reporter = Reporter::new(
            namer,
            Arc::clone(&metrics),
            RecentAttempts::default(),
            Some(sender),
        );
        let start = Instant::now();
        for _ in 0..5 {
            reporter.record(&event(7, 80, 1), start);
        }
        reporter.record(&event(7, 80, 2), start);
        reporter.record(&event(8, 80, 1), start);
        assert_eq!(reporter.windows.len(), 3);
        let repeats: Vec<u64> = reporter.windows.values().map(|w| w.repeats).collect();
        assert_eq!(repeats.iter().sum::<u64>(), 4);
        // Unknown cgroups have no pod: no Kubernetes Event.
        assert!(receiver.try_recv().is_err());
        reporter.flush(start + LOG_WINDOW);
        assert!(reporter.windows.is_empty());
        let text = metrics.render();
        assert!(text.contains("verdict=\"refused\"} 6"), "{text}");
        assert!(text.contains("verdict=\"audited\"} 1"), "{text}");
    }
}
