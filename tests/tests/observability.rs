//! What operators see: metrics after a known number of attempts, a flood
//! that the kernel rate-limits without hurting the daemon, `status` field
//! by field, and health endpoints that follow the programs.
// Metrics are f64 in the exposition format; the counters compared here
// hold whole numbers, which compare exactly.
#![allow(clippy::float_cmp)]

use std::time::{Duration, Instant};

use imds_guard_tests::{
    Outcome, addrs,
    daemon::run_to_end,
    stage::{HTTP, World, case, eperm},
};

const REFUSED_SERIES: &str = "imds_guard_attempts_total{namespace=\"\",pod=\"\",destination=\"169.254.169.254:80\",verdict=\"refused\"}";

/// A world whose daemon serves HTTP on loopback and the node-local socket.
struct MetricsWorld {
    world: World,
    status_socket: std::path::PathBuf,
}

impl std::ops::Deref for MetricsWorld {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl std::ops::DerefMut for MetricsWorld {
    fn deref_mut(&mut self) -> &mut World {
        &mut self.world
    }
}

impl Drop for MetricsWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.status_socket);
    }
}

fn metrics_world() -> MetricsWorld {
    let status_socket =
        std::env::temp_dir().join(imds_guard_tests::unique_name("status") + ".sock");
    let socket = status_socket.display().to_string();
    MetricsWorld {
        world: World::new(&[
            "--allow",
            "{allowed}",
            "--http-listen",
            "127.0.0.1:0",
            "--status-socket",
            &socket,
        ]),
        status_socket,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("daemon status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_flood_is_rate_limited_in_the_kernel_and_the_daemon_stays_small() {
    const FLOOD: u32 = 100_000;
    let mut world = metrics_world();
    let idle = rss_kib(world.daemon.pid());
    let started = Instant::now();
    let tally = world
        .probe(&world.blocked)
        .spawn_flood(
            addrs::METADATA_V4.into(),
            HTTP,
            FLOOD,
            Duration::from_secs(30),
        )
        .expect("flood")
        .finish()
        .expect("tally");
    let took = started.elapsed();
    eprintln!("flood: {tally:?} in {took:?}");
    assert_eq!(tally.refused, FLOOD, "{tally:?}");
    // The kernel counts every attempt...
    let pins = world.pins.path().display().to_string();
    let status = run_to_end(&["status", "--bpffs-dir", &pins, "--output", "json"]).expect("status");
    let json: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let connects: u64 = json["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter_map(|c| c["connect"].as_u64())
        .sum();
    assert_eq!(connects, u64::from(FLOOD));
    // ...but sends at most 20 events a second for the cgroup: the rest are
    // counted as dropped, and the two add up. The dropped count is read
    // from the kernel every few seconds, so both climb for a while.
    let dropped_series = "imds_guard_events_dropped_total";
    let deadline = Instant::now() + Duration::from_secs(15);
    let (sent, dropped) = loop {
        let dropped = world.daemon.metric(dropped_series).expect("metrics");
        let sent = world.daemon.metric(REFUSED_SERIES).expect("metrics");
        if sent + dropped >= f64::from(FLOOD) || Instant::now() > deadline {
            break (sent, dropped);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sent + dropped,
        f64::from(FLOOD),
        "sent {sent} + dropped {dropped}"
    );
    let limit = 20.0 * (took.as_secs_f64() + 1.0);
    assert!(sent <= limit, "{sent} events sent in {took:?}");
    let peak = rss_kib(world.daemon.pid());
    eprintln!("daemon memory: {idle} KiB idle, {peak} KiB after the flood");
    assert!(peak < idle + 16 * 1024, "{idle} -> {peak} KiB");
}

#[test]
fn status_shows_every_field() {
    let mut world = metrics_world();
    for _ in 0..3 {
        assert_eq!(
            world
                .attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, HTTP))
                .outcome,
            eperm()
        );
    }
    let pins = world.pins.path().display().to_string();
    let daemon = world.status_socket.display().to_string();
    let status = run_to_end(&[
        "status",
        "--bpffs-dir",
        &pins,
        "--daemon",
        &daemon,
        "--output",
        "json",
    ])
    .expect("status");
    let json: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(json["mode"], "enforce");
    assert_eq!(json["bpffs_dir"], pins.as_str());
    assert_eq!(
        json["protected_cgroup"],
        world.guarded.display().to_string()
    );
    assert!(
        json["generation"]
            .as_str()
            .expect("generation")
            .starts_with("g-")
    );
    let programs = json["programs"].as_object().expect("programs");
    assert_eq!(programs.len(), 5);
    assert!(programs.values().all(|v| v == true), "{programs:?}");
    assert_eq!(
        json["rules"],
        serde_json::json!([
            "169.254.169.254/32 except-ports=53",
            "169.254.170.23/32 (pass)",
            "169.254.20.10/32 (pass)",
            "fd00:ec2::23/128 (pass)",
            "fd00:ec2::254/128"
        ])
    );
    let allowed = json["allowed"].as_array().expect("allowed");
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0]["cgroup"], world.allowed.display().to_string());
    let counters = json["counters"].as_array().expect("counters");
    assert_eq!(counters.len(), 1, "{counters:?}");
    assert_eq!(counters[0]["cgroup"], world.blocked.display().to_string());
    assert_eq!(counters[0]["connect"], 3);
    assert_eq!(counters[0]["sendmsg"], 0);
    assert_eq!(counters[0]["egress"], 0);
    assert_eq!(json["events_dropped"], 0);
    assert_eq!(json["daemon_reachable"], true);

    // The text form carries the same facts, and works without the daemon.
    world.daemon.stop().expect("stop");
    let text = run_to_end(&["status", "--bpffs-dir", &pins]).expect("status");
    for line in [
        "mode        enforce".to_owned(),
        format!("protecting  {}", world.guarded.display()),
        "programs    5 of 5 attached".to_owned(),
        "  169.254.169.254/32 except-ports=53".to_owned(),
        "allowed     1 cgroup(s)".to_owned(),
        format!("  {}", world.allowed.display()),
        format!(
            "                3       0       0  {}",
            world.blocked.display()
        ),
        "events dropped  0".to_owned(),
        // The daemon here runs in this machine's namespace, guard off.
        "node edge guard  not attached in this network namespace".to_owned(),
        "  OPEN    forwarded packets".to_owned(),
    ] {
        assert!(text.contains(&line), "{line:?} not in\n{text}");
    }
    // Standalone cgroups are not pods: nothing to name.
    assert!(!text.contains("pods shown by UID"), "{text}");
}

/// `/pods` names the node's workloads: the network listener (every pod on
/// the node reaches it under hostNetwork) does not serve it, the node-local
/// socket does, to its owner only.
#[test]
fn pod_names_are_served_node_local_only() {
    use std::{io::Read as _, io::Write as _, os::unix::fs::PermissionsExt as _};
    let mut world = metrics_world();
    assert_eq!(world.daemon.http_get("/pods").expect("/pods").0, 404);
    assert_eq!(world.daemon.http_get("/metrics").expect("/metrics").0, 200);
    let mode = std::fs::metadata(&world.status_socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let mut stream =
        std::os::unix::net::UnixStream::connect(&world.status_socket).expect("connect");
    stream
        .write_all(b"GET /pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("{}") || response.ends_with("[]"),
        "{response}"
    );
}

#[test]
fn health_follows_the_programs() {
    let mut world = metrics_world();
    assert_eq!(world.daemon.http_get("/healthz").expect("healthz").0, 200);
    assert_eq!(world.daemon.http_get("/readyz").expect("readyz").0, 200);
    assert_eq!(
        world
            .daemon
            .metric("imds_guard_programs_attached")
            .expect("metric"),
        5.0
    );
    // Someone removes one program's pin: that program is detached.
    let generation = world.pins.generations().pop().expect("generation");
    let pin = world
        .pins
        .path()
        .join(&generation)
        .join("link-imds_guard_connect4");
    std::fs::remove_file(&pin).expect("unpin");
    let (status, body) = world.daemon.http_get("/healthz").expect("healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("4 of 5 programs attached"), "{body}");
    assert_eq!(world.daemon.http_get("/readyz").expect("readyz").0, 503);
    // The egress program still drops the packets; only the fast refusal is gone.
    let result = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, HTTP));
    assert_ne!(result.outcome, Outcome::Reached, "{result:?}");
}
