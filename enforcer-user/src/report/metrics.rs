//! Prometheus metrics (`prometheus-client`), served on `/metrics`.

use crate::report::http::Assessment;

use std::{
    collections::HashSet,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use enforcer_common::names::PROGRAMS;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Label sets of the attempts counter kept at most; beyond, new workloads
/// are counted under `pod="_other"` so a flood of pods cannot blow up the
/// scrape.
pub const MAX_ATTEMPT_SERIES: usize = 1000;

/// Label value for workloads past the cardinality bound.
pub const OTHER: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub namespace: String,
    pub pod: String,
    pub destination: String,
    /// `refused` or `audited`.
    pub verdict: String,
}

/// What failed, for `imds_guard_errors_total{kind}`: failures the daemon
/// retries rather than stops at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Writing the allow map.
    MapWrite,
    /// A watch request to the API server.
    Watch,
    /// Removing the startup taint from this node.
    Taint,
    /// Reading the node's links and routes, or attaching the edge guard.
    Edge,
}

impl ErrorKind {
    const ALL: [ErrorKind; 4] = [
        ErrorKind::MapWrite,
        ErrorKind::Watch,
        ErrorKind::Taint,
        ErrorKind::Edge,
    ];

    fn label(self) -> &'static str {
        match self {
            ErrorKind::MapWrite => "map_write",
            ErrorKind::Watch => "watch",
            ErrorKind::Taint => "taint",
            ErrorKind::Edge => "edge",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    attempts: Family<AttemptLabels, Counter>,
    /// The label sets `attempts` holds, to bound them.
    attempt_series: Mutex<HashSet<AttemptLabels>>,
    pub allowlisted: Gauge,
    pub audited: Gauge,
    pub rules: Gauge,
    programs_attached: Gauge,
    programs_expected: Gauge,
    ready: Gauge,
    api_reachable: Gauge,
    events_dropped: Counter,
    events_dropped_seen: AtomicU64,
    pub reconcile_seconds: Histogram,
    pub map_update_seconds: Histogram,
    pub last_sync_timestamp: Gauge,
    errors: Family<ErrorLabels, Counter>,
    routes: Family<RouteLabels, Gauge>,
    edge_interfaces: Family<RoleLabels, Gauge>,
}

/// A route to denied destinations the node offers besides pod sockets.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

/// A count as a gauge value (gauges are signed).
pub fn gauge_count(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Buckets from 100 µs to about 1.6 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imds_guard");
        let metrics = Metrics {
            registry: Registry::default(),
            attempts: Family::default(),
            attempt_series: Mutex::new(HashSet::new()),
            allowlisted: Gauge::default(),
            audited: Gauge::default(),
            rules: Gauge::default(),
            programs_attached: Gauge::default(),
            programs_expected: Gauge::default(),
            ready: Gauge::default(),
            api_reachable: Gauge::default(),
            events_dropped: Counter::default(),
            events_dropped_seen: AtomicU64::new(0),
            reconcile_seconds: Histogram::new(latency_buckets()),
            map_update_seconds: Histogram::new(latency_buckets()),
            last_sync_timestamp: Gauge::default(),
            errors: Family::default(),
            routes: Family::default(),
            edge_interfaces: Family::default(),
        };
        registry.register(
            "route_guarded",
            "Whether a route to denied destinations besides pod sockets is guarded on this node (1) or open (0)",
            metrics.routes.clone(),
        );
        registry.register(
            "edge_interfaces",
            "Interfaces the node edge guard is attached to, by role (uplink, bridge_port)",
            metrics.edge_interfaces.clone(),
        );
        registry.register(
            "attempts",
            "Attempts to reach a denied destination, by workload, destination and verdict",
            metrics.attempts.clone(),
        );
        registry.register(
            "allowlisted_cgroups",
            "Cgroups in the allow map that reach denied destinations",
            metrics.allowlisted.clone(),
        );
        registry.register(
            "audited_cgroups",
            "Cgroups in the allow map whose attempts are audited (namespaces in audit mode)",
            metrics.audited.clone(),
        );
        registry.register(
            "errors",
            "Failures the daemon retries, by kind (map_write, watch, taint, edge)",
            metrics.errors.clone(),
        );
        registry.register("rules", "Destination rules loaded", metrics.rules.clone());
        metrics.register_health(&mut registry);
        registry.register(
            "events_dropped",
            "Events the kernel did not send (per-cgroup rate limit or full ring)",
            metrics.events_dropped.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to compute and apply the allow list after a change",
            metrics.reconcile_seconds.clone(),
        );
        registry.register(
            "map_update_duration_seconds",
            "Time to write a change to the allow map",
            metrics.map_update_seconds.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last reconcile put in force; it stays old on an idle node (imds_guard_api_reachable says whether the watches work)",
            metrics.last_sync_timestamp.clone(),
        );
        // Every kind is exported from the start: an error counter that
        // first appears at 1 shows no increase to an alert rule.
        for kind in ErrorKind::ALL {
            drop(
                metrics
                    .errors
                    .get_or_create(&ErrorLabels { kind: kind.label() }),
            );
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The gauges [`Metrics::set_health`] sets at each scrape.
    fn register_health(&self, registry: &mut Registry) {
        registry.register(
            "programs_attached",
            "eBPF programs attached (pinned links of the generation in force)",
            self.programs_attached.clone(),
        );
        self.programs_expected.set(gauge_count(PROGRAMS.len()));
        registry.register(
            "programs_expected",
            "eBPF programs a fully enforced node has attached",
            self.programs_expected.clone(),
        );
        registry.register(
            "ready",
            "Whether the daemon is ready (1), as /readyz answers: programs attached, responsive, synced and the API server reachable",
            self.ready.clone(),
        );
        registry.register(
            "api_reachable",
            "Whether the last watch request to the API server succeeded (1); always 1 outside Kubernetes mode",
            self.api_reachable.clone(),
        );
    }

    /// Counts one attempt; past the cardinality bound the workload becomes `_other`.
    pub fn count_attempt(&self, mut labels: AttemptLabels) {
        {
            let mut series = self
                .attempt_series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !series.contains(&labels) && series.len() >= MAX_ATTEMPT_SERIES {
                OTHER.clone_into(&mut labels.namespace);
                OTHER.clone_into(&mut labels.pod);
            }
            series.insert(labels.clone());
        }
        self.attempts.get_or_create(&labels).inc();
    }

    pub fn count_error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels { kind: kind.label() })
            .inc();
    }

    /// Brings the dropped-events counter up to the kernel's total.
    pub fn set_events_dropped(&self, kernel_total: u64) {
        let before = self
            .events_dropped_seen
            .fetch_max(kernel_total, Ordering::Relaxed);
        if kernel_total > before {
            self.events_dropped.inc_by(kernel_total - before);
        }
    }

    /// Sets the health gauges from what the probes found, judged as
    /// `/readyz` judges it.
    pub fn set_health(&self, assessment: &Assessment) {
        self.programs_attached
            .set(gauge_count(assessment.programs_attached));
        self.ready.set(i64::from(assessment.not_ready().is_none()));
        self.api_reachable.set(i64::from(assessment.api_reachable));
    }

    /// Records whether `route` is guarded on this node.
    pub fn set_route_guarded(&self, route: &'static str, guarded: bool) {
        self.routes
            .get_or_create(&RouteLabels { route })
            .set(i64::from(guarded));
    }

    /// Records how many interfaces have the guard in `role`.
    pub fn set_edge_interfaces(&self, role: &'static str, count: usize) {
        self.edge_interfaces
            .get_or_create(&RoleLabels { role })
            .set(gauge_count(count));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pod: &str) -> AttemptLabels {
        AttemptLabels {
            namespace: "team".to_owned(),
            pod: pod.to_owned(),
            destination: "169.254.169.254:80".to_owned(),
            verdict: "refused".to_owned(),
        }
    }

    #[test]
    fn attempts_are_counted_and_bounded() {
        let metrics = Metrics::new();
        metrics.count_attempt(labels("web"));
        metrics.count_attempt(labels("web"));
        for i in 0..MAX_ATTEMPT_SERIES + 10 {
            metrics.count_attempt(labels(&format!("pod-{i}")));
        }
        let text = metrics.render();
        assert!(
            text.contains(
                "imds_guard_attempts_total{namespace=\"team\",pod=\"web\",destination=\"169.254.169.254:80\",verdict=\"refused\"} 2"
            ),
            "{text}"
        );
        // One series fewer than the bound for pods, plus the overflow series.
        assert_eq!(
            text.matches("imds_guard_attempts_total{").count(),
            MAX_ATTEMPT_SERIES + 1
        );
        assert!(text.contains("pod=\"_other\""), "{text}");
    }

    #[test]
    fn dropped_events_follow_the_kernel_total() {
        let metrics = Metrics::new();
        metrics.set_events_dropped(5);
        metrics.set_events_dropped(3);
        metrics.set_events_dropped(12);
        assert!(
            metrics
                .render()
                .contains("imds_guard_events_dropped_total 12")
        );
    }

    #[test]
    fn errors_of_every_kind_start_at_zero() {
        let text = Metrics::new().render();
        for kind in ["map_write", "watch", "taint", "edge"] {
            let series = format!("imds_guard_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} not in\n{text}");
        }
    }

    #[test]
    fn health_gauges_agree_with_readiness() {
        let metrics = Metrics::new();
        let expected = format!("imds_guard_programs_expected {}", PROGRAMS.len());
        assert!(metrics.render().contains(&expected));
        let cases = [
            (Assessment::healthy(), 1, 1),
            (
                Assessment {
                    api_reachable: false,
                    ..Assessment::healthy()
                },
                0,
                0,
            ),
            (
                Assessment {
                    synced: false,
                    ..Assessment::healthy()
                },
                0,
                1,
            ),
            (
                Assessment {
                    programs_attached: PROGRAMS.len() - 2,
                    ..Assessment::healthy()
                },
                0,
                1,
            ),
        ];
        for (assessment, ready, reachable) in cases {
            metrics.set_health(&assessment);
            let text = metrics.render();
            assert_eq!(assessment.not_ready().is_none(), ready == 1);
            for series in [
                format!("imds_guard_ready {ready}"),
                format!("imds_guard_api_reachable {reachable}"),
                format!(
                    "imds_guard_programs_attached {}",
                    assessment.programs_attached
                ),
            ] {
                assert!(text.contains(&series), "{series} not in\n{text}");
            }
        }
    }
}
