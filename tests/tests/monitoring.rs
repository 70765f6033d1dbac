//! The monitoring bundle against the real thing: a Prometheus server
//! (Debian's `prometheus`, on loopback) scrapes a daemon in Kubernetes mode
//! and evaluates deploy/monitoring's alert rules. Each alert fires on a
//! condition this test causes and resolves when the condition ends, as
//! Prometheus's `/api/v1/alerts` lists them; every metric the rules and the
//! dashboard query is on the daemon's `/metrics`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use enforcer_user::k8s::{reachability::PROBE_INTERVAL, watch::FIRST_PAUSE_SPREAD};
use imds_guard_test_apiserver::FakeApiServer;
use imds_guard_tests::{
    Daemon, LoopProbe, PinDir, Probe, Sandbox, Server, TestCgroup, addrs,
    monitoring::{self, Alert, Prometheus},
    pods::{self, Driver, TestPod},
    require_root,
    stage::HTTP,
};

const NODE: &str = "node-1";

/// What the rules' `for:` and range windows become for this run (see
/// `monitoring::quickened`): seconds instead of minutes, with a scrape and
/// an evaluation every second.
const HOLD: &str = "2s";
const WINDOW: &str = "10s";

/// How long an alert may take to fire once its condition holds: a few
/// scrapes and evaluations, the hold, and a loaded machine.
const TO_FIRE: Duration = Duration::from_secs(20);
/// And to resolve once it ends: the window must empty as well.
const TO_RESOLVE: Duration = Duration::from_secs(30);

/// Prometheus, and the alerts seen firing so far.
struct Watch {
    prometheus: Prometheus,
    fired: BTreeSet<String>,
}

impl Watch {
    /// Waits until every alert in `names` fires; returns the alerts then.
    fn fire(&mut self, names: &[&str]) -> Vec<Alert> {
        let alerts = self
            .prometheus
            .wait_for_alerts(&names.join(" and "), TO_FIRE, |alerts| {
                names.iter().all(|name| !firing(alerts, name).is_empty())
            })
            .expect("the alerts fire");
        self.fired.extend(names.iter().map(|n| (*n).to_owned()));
        alerts
    }

    /// Waits until no alert is pending or firing.
    fn resolve(&self, what: &str, within: Duration) {
        self.prometheus
            .wait_for_alerts(what, within, <[Alert]>::is_empty)
            .expect("the alerts resolve");
    }
}

fn firing<'a>(alerts: &'a [Alert], name: &str) -> Vec<&'a Alert> {
    alerts
        .iter()
        .filter(|a| a.name == name && a.state == "firing")
        .collect()
}

fn listed(alerts: &[Alert], name: &str) -> bool {
    alerts.iter().any(|a| a.name == name)
}

struct Cluster {
    api: FakeApiServer,
    root: TestCgroup,
    pins: PinDir,
    kubeconfig: PathBuf,
    http: SocketAddr,
    sandbox: Sandbox,
    _metadata: Server,
    web: TestPod,
}

impl Cluster {
    /// A node with one pod, team/web, that may not reach the metadata API.
    fn set_up() -> Cluster {
        require_root();
        let sandbox = Sandbox::new().expect("sandbox");
        let metadata = Server::start(&sandbox.server, &[HTTP]).expect("fake metadata server");
        let mut root = TestCgroup::new("node").expect("cgroup root");
        root.child(Driver::Systemd.base()).expect("pod base");
        let api = FakeApiServer::start().expect("API server");
        let web = TestPod::on(NODE, 1, "web", "team");
        pods::populate(
            &api,
            &mut root,
            NODE,
            Driver::Systemd,
            &[(&web, false)],
            true,
        );
        let kubeconfig = std::env::temp_dir().join(imds_guard_tests::unique_name("kubeconfig"));
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        Cluster {
            api,
            root,
            pins: PinDir::new("monitoring"),
            kubeconfig,
            http: SocketAddr::from(([127, 0, 0, 1], monitoring::free_port())),
            sandbox,
            _metadata: metadata,
            web,
        }
    }

    /// The daemon, on a fixed loopback port so Prometheus finds it again
    /// after a restart.
    fn launch(&self) -> Daemon {
        let http = self.http.to_string();
        let mut daemon =
            Daemon::kubernetes(NODE, self.root.path(), self.pins.path(), &self.kubeconfig)
                .args(["--http-listen", &http])
                .start()
                .expect("imds-guard run starts");
        daemon
            .wait_for_log("synced with the API server", Duration::from_secs(10))
            .expect("first sync");
        daemon
    }

    /// Attempts from team/web to the metadata address.
    fn web_probe(&self, make: impl FnOnce(&Probe) -> LoopProbe) -> LoopProbe {
        let cgroup = self
            .root
            .path()
            .join(self.web.container_dir(Driver::Systemd));
        make(&Probe {
            netns: &self.sandbox.client,
            cgroup: Some(&cgroup),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Every metric the rules and the dashboard read is one `exposition` has.
fn assert_queries_find_their_metrics(rule_file: &serde_json::Value, exposition: &str) {
    let exposed = monitoring::exposed_names(exposition);
    let queries = monitoring::alerts(rule_file)
        .into_iter()
        .map(|(_, expr)| expr)
        .chain(monitoring::dashboard_queries(&monitoring::dashboard()));
    for query in queries {
        let names = monitoring::metric_names(&query);
        assert!(!names.is_empty() || query.contains("up{"), "{query}");
        for name in names {
            assert!(
                exposed.contains(&name),
                "{name} (in {query}) is not on /metrics:\n{exposition}"
            );
        }
    }
}

/// A pod refused repeatedly, then a flood the kernel drops events of.
fn refusals(
    cluster: &Cluster,
    watch: &mut Watch,
    daemon: &mut Daemon,
    rule_file: &serde_json::Value,
) {
    let metadata = IpAddr::V4(addrs::METADATA_V4);
    // Five attempts a second: refused each time, each one sent (the
    // kernel's limit is 20 a second per cgroup).
    let asking = cluster.web_probe(|probe| {
        probe
            .spawn_loop(
                metadata,
                HTTP,
                Duration::from_millis(200),
                Duration::from_secs(12),
            )
            .expect("loop probe")
    });
    let alerts = watch.fire(&["ImdsGuardPodRefusedRepeatedly"]);
    let refused = firing(&alerts, "ImdsGuardPodRefusedRepeatedly");
    assert_eq!(refused.len(), 1, "{alerts:?}");
    assert_eq!(refused[0].labels["namespace"], "team");
    assert_eq!(refused[0].labels["pod"], "web");
    assert!(!listed(&alerts, "ImdsGuardEventsDropped"), "{alerts:?}");
    let tally = asking.finish().expect("tally");
    assert_eq!(tally.refused, tally.attempts(), "{tally:?}");
    // The attempts series exists now: every metric queried is exported.
    let (_, exposition) = daemon.http_get("/metrics").expect("/metrics");
    assert_queries_find_their_metrics(rule_file, &exposition);
    watch.resolve("the refused pod's alert to resolve", TO_RESOLVE);

    // A flood: the kernel sends 20 events a second for the cgroup and
    // counts the rest as dropped.
    let flood = cluster.web_probe(|probe| {
        probe
            .spawn_flood(metadata, HTTP, 20_000, Duration::from_secs(20))
            .expect("flood")
    });
    let tally = flood.finish().expect("tally");
    assert_eq!(tally.refused, 20_000, "{tally:?}");
    watch.fire(&["ImdsGuardEventsDropped"]);
    watch.resolve("the flood's alerts to resolve", TO_RESOLVE);
}

#[test]
fn every_alert_fires_on_its_condition_and_resolves() {
    let mut cluster = Cluster::set_up();
    let mut daemon = cluster.launch();
    let rule_file = monitoring::rule_file();
    let prometheus = Prometheus::start(
        &monitoring::quickened(&rule_file, HOLD, WINDOW),
        cluster.http,
    )
    .expect("prometheus");
    // A healthy node: scraped, ready, nothing pending or firing.
    let deadline = std::time::Instant::now() + TO_FIRE;
    while prometheus.query("imds_guard_ready").expect("query") != [1.0] {
        assert!(std::time::Instant::now() < deadline, "never scraped ready");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(prometheus.alerts().expect("alerts"), []);
    let mut watch = Watch {
        prometheus,
        fired: BTreeSet::new(),
    };

    refusals(&cluster, &mut watch, &mut daemon, &rule_file);

    // The API server goes away: the watches fail, the daemon is not ready.
    cluster.api.stop().expect("stop API server");
    let alerts = watch.fire(&["ImdsGuardApiServerUnreachable", "ImdsGuardNotReady"]);
    assert_eq!(daemon.http_get("/readyz").expect("readyz").0, 503);
    assert!(!listed(&alerts, "ImdsGuardProgramsDetached"), "{alerts:?}");
    cluster.api.restart().expect("restart API server");
    // The daemon notices after its watches' pause or its probe (see
    // tests/tests/kubernetes.rs); then the alerts resolve.
    watch.resolve(
        "the API server's alerts to resolve",
        FIRST_PAUSE_SPREAD.max(PROBE_INTERVAL) + TO_RESOLVE,
    );

    // Someone removes a program's pinned link: the program is detached.
    let generation = cluster.pins.generations().pop().expect("generation");
    std::fs::remove_file(
        cluster
            .pins
            .path()
            .join(&generation)
            .join("link-imds_guard_connect4"),
    )
    .expect("unpin");
    watch.fire(&["ImdsGuardProgramsDetached", "ImdsGuardNotReady"]);
    // What the kubelet would do (the liveness probe fails): a restart,
    // which attaches a whole generation again.
    daemon.stop().expect("stop");
    daemon = cluster.launch();
    watch.resolve("the detached program's alerts to resolve", TO_RESOLVE);

    // The daemon is gone: its scrape fails, which counts as not ready.
    daemon.stop().expect("stop");
    watch.fire(&["ImdsGuardNotReady"]);

    // Every alert fired here but the allow-map one, which needs a failed
    // write to the kernel's map (promtool's tests cover it,
    // tests/tests/manifests.rs).
    let alert_names: BTreeSet<String> = monitoring::alerts(&rule_file)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "ImdsGuardAllowListUpdateFailing")
        .collect();
    assert_eq!(
        watch.fired, alert_names,
        "an alert this test does not cause"
    );
}
