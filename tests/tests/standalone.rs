//! The real `imds-guard standalone` daemon, real sockets, real kernel:
//! clients in cgroups of ours, inside a sandbox namespace with no route out,
//! try to reach our own fake metadata server.
// Metrics are f64 in the exposition format; the counters compared here
// hold whole numbers, which compare exactly.
#![allow(clippy::float_cmp)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use imds_guard_tests::{
    Daemon, Outcome, ProbeResult, TempFile, TestCgroup, addrs,
    daemon::run_to_end,
    probe::spawn_in,
    stage::{Case, DNS, HTTP, Stage, World, case, eperm},
};
use nix::sys::signal::Signal;

/// Every way to the metadata server we know of, with what a blocked cgroup
/// must see. An allowlisted cgroup reaches the server on each of them, which
/// proves the sandbox itself works.
fn metadata_paths() -> Vec<(Case, Outcome)> {
    let v4 = addrs::METADATA_V4;
    let v6 = addrs::METADATA_V6;
    let mapped = addrs::metadata_v4_mapped();
    vec![
        (case("tcp", v4, HTTP), eperm()),
        (case("udp", v4, HTTP), eperm()),
        (case("udp-connected", v4, HTTP), eperm()),
        (case("ping", v4, 0), eperm()),
        (case("tcp", v6, HTTP), eperm()),
        (case("udp", v6, HTTP), eperm()),
        // The IPv6 ping path drops silently: no error, no echo.
        (case("ping", v6, 0), Outcome::TimedOut),
        (case("tcp", mapped, HTTP), eperm()),
        (case("udp", mapped, HTTP), eperm()),
        (case("udp-connected", mapped, HTTP), eperm()),
        // Raw sends report no error to the sender here: the drop is silent,
        // so the proof is that no echo ever comes back.
        (case("raw-udp", v4, HTTP), Outcome::TimedOut),
        (case("fragments", v4, HTTP), Outcome::TimedOut),
        (case("fragments", v4, DNS), Outcome::TimedOut),
    ]
}

#[test]
fn blocked_cgroup_is_refused_on_every_path_and_allowed_cgroup_is_not() {
    let world = World::default_allow();
    for (case, want) in metadata_paths() {
        let blocked = world.attempt(&world.blocked, &case);
        assert_eq!(
            blocked.outcome, want,
            "blocked cgroup, {case:?}: {blocked:?}"
        );
        let allowed = world.attempt(&world.allowed, &case);
        assert_eq!(
            allowed.outcome,
            Outcome::Reached,
            "allowed cgroup, {case:?}: {allowed:?}"
        );
    }
}

#[test]
fn refusal_is_immediate_not_a_hang() {
    let world = World::default_allow();
    let result = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, HTTP));
    assert_eq!(result.outcome, eperm());
    assert!(
        result.elapsed < Duration::from_millis(100),
        "connect took {:?}",
        result.elapsed
    );
}

#[test]
fn raw_packets_are_judged_by_the_header_they_carry() {
    let world = World::default_allow();
    // A first fragment to the exempt DNS port may pass, the rest may not:
    // without ports, a non-first fragment is refused (fail closed).
    let result = world.attempt(&world.blocked, &case("fragments", addrs::METADATA_V4, DNS));
    assert_eq!(result.outcome, Outcome::TimedOut, "{result:?}");
    assert_eq!(
        result.fields.get("sends").map(String::as_str),
        Some("ok,EPERM"),
        "{result:?}"
    );
    let result = world.attempt(&world.blocked, &case("fragments", addrs::METADATA_V4, HTTP));
    assert_eq!(
        result.fields.get("sends").map(String::as_str),
        Some("EPERM,EPERM"),
        "{result:?}"
    );
    let result = world.attempt(&world.blocked, &case("raw-udp", addrs::METADATA_V4, HTTP));
    assert_eq!(
        result.fields.get("sends").map(String::as_str),
        Some("EPERM"),
        "{result:?}"
    );
}

#[test]
fn dns_on_the_metadata_address_stays_open() {
    let world = World::default_allow();
    for action in ["tcp", "udp", "raw-udp"] {
        let result = world.attempt(&world.blocked, &case(action, addrs::METADATA_V4, DNS));
        assert_eq!(result.outcome, Outcome::Reached, "{action}: {result:?}");
    }
}

#[test]
fn allowlist_covers_children_not_siblings_and_outside_is_untouched() {
    let world = World::default_allow();
    let tcp = case("tcp", addrs::METADATA_V4, HTTP);
    let cases = [
        (&world.allowed_child, Outcome::Reached),
        (&world.blocked, eperm()),
        (&world.guarded, eperm()),
        (&world.outside, Outcome::Reached),
    ];
    for (cgroup, want) in cases {
        let result = world.attempt(cgroup, &tcp);
        assert_eq!(result.outcome, want, "{}: {result:?}", cgroup.display());
    }
}

#[test]
fn ordinary_destinations_work_from_a_blocked_cgroup() {
    let world = World::default_allow();
    for addr in [IpAddr::V4(addrs::SERVER_V4), IpAddr::V6(addrs::SERVER_V6)] {
        for action in ["tcp", "udp", "udp-connected", "ping"] {
            let result = world.attempt(&world.blocked, &case(action, addr, HTTP));
            assert_eq!(
                result.outcome,
                Outcome::Reached,
                "{action} {addr}: {result:?}"
            );
        }
    }
}

#[test]
fn blocked_attempts_are_logged_once_and_counted() {
    let mut world = World::new(&["--allow", "{allowed}", "--http-listen", "127.0.0.1:0"]);
    for _ in 0..5 {
        let result = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, HTTP));
        assert_eq!(result.outcome, eperm());
    }
    let needle = format!("cgroup={}", world.blocked.display());
    world
        .daemon
        .wait_for_log(&needle, Duration::from_secs(5))
        .expect("report of the blocked cgroup");
    let series = "imds_guard_attempts_total{namespace=\"\",pod=\"\",destination=\"169.254.169.254:80\",verdict=\"refused\"}";
    assert_eq!(
        world.daemon.metric_reaching(series, 5.0).expect("metrics"),
        5.0
    );
    let log = world.daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
    assert_eq!(lines.len(), 1, "five attempts, one log record:\n{log}");
    for field in [
        "destination=169.254.169.254:80",
        "protocol=\"tcp\"",
        "hook=\"connect\"",
        "verdict=\"refused\"",
    ] {
        assert!(lines[0].contains(field), "{field}: {}", lines[0]);
    }
}

#[test]
fn removing_an_allow_entry_cuts_an_open_connection() {
    let allow_file = TempFile::new("allow", "").expect("allow file");
    let mut world = World::new(&["--allow-file", &allow_file.arg()]);
    allow_file
        .write(&format!("{}\n", world.allowed.display()))
        .expect("write");
    world.daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    world
        .daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(5))
        .expect("reload");

    let stream = world
        .probe(&world.allowed)
        .stream(IpAddr::V4(addrs::METADATA_V4), HTTP, 400)
        .expect("stream probe");
    let next = || {
        stream
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("a line from the stream probe")
    };
    assert_eq!(next(), "connect outcome=reached");
    for _ in 0..5 {
        assert_eq!(next(), "exchange ok");
    }

    allow_file
        .write("# nothing allowed any more\n")
        .expect("write");
    world.daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    world
        .daemon
        .wait_for_log_count("configuration reloaded", 2, Duration::from_secs(5))
        .expect("second reload");
    // At most one exchange can have been in flight across the reload.
    let mut ok_after = 0;
    let verdict = loop {
        let line = next();
        if line == "exchange ok" {
            ok_after += 1;
            assert!(
                ok_after <= 1,
                "data still flows after the allow entry was removed"
            );
            continue;
        }
        break line;
    };
    assert_eq!(verdict, "exchange outcome=timeout");
}

#[test]
fn audit_mode_lets_traffic_through_and_counts_it() {
    let mut world = World::new(&[
        "--allow",
        "{allowed}",
        "--mode",
        "audit",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let result = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, HTTP));
    assert_eq!(result.outcome, Outcome::Reached, "{result:?}");
    let needle = format!("cgroup={}", world.blocked.display());
    world
        .daemon
        .wait_for_log(&needle, Duration::from_secs(5))
        .expect("audit report");
    let log = world.daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("verdict=\"audited\""), "{}", lines[0]);
    // The connect and the connection's packets are all counted.
    let series = "imds_guard_attempts_total{namespace=\"\",pod=\"\",destination=\"169.254.169.254:80\",verdict=\"audited\"}";
    let audited = world.daemon.metric_reaching(series, 2.0).expect("metrics");
    assert!(audited >= 2.0, "{audited}");
}

#[test]
fn pass_rules_carve_out_of_a_broad_deny() {
    let world = World::new(&[
        "--allow",
        "{allowed}",
        "--deny",
        "169.254.0.0/16",
        "--pass",
        "169.254.170.23",
    ]);
    let to_pod_identity = world.attempt(&world.blocked, &case("tcp", addrs::POD_IDENTITY_V4, HTTP));
    assert_eq!(
        to_pod_identity.outcome,
        Outcome::Reached,
        "{to_pod_identity:?}"
    );
    let to_metadata = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V4, DNS));
    assert_eq!(
        to_metadata.outcome,
        eperm(),
        "the /16 has no DNS exemption: {to_metadata:?}"
    );
    // Only the rules given apply: the IPv6 default is gone.
    let v6 = world.attempt(&world.blocked, &case("tcp", addrs::METADATA_V6, HTTP));
    assert_eq!(v6.outcome, Outcome::Reached, "{v6:?}");
}

#[test]
fn bad_input_is_a_clear_error_before_anything_is_attached() {
    let stage = Stage::set_up();
    let guarded = stage.guarded.to_str().expect("utf-8");
    let bad_config = TempFile::new(
        "config",
        "mode: enforce\ndeny:\n  - \"169.254.169.254/32 ports=99999\"\n",
    )
    .expect("config file");
    let bad_config = bad_config.arg();
    let pins = stage.pins.path().display().to_string();
    let cases: [(&[&str], &str); 8] = [
        (
            &["--cgroup", guarded, "--config", &bad_config],
            "deny[0]: rule \"169.254.169.254/32 ports=99999\"",
        ),
        (
            &["--cgroup", guarded, "--config", "/nonexistent.yaml"],
            "/nonexistent.yaml",
        ),
        (
            &["--cgroup", guarded, "--preset", "aws", "--preset", "gcp"],
            "disagree",
        ),
        (
            &["--cgroup", "/tmp"],
            "/tmp is not under the cgroup v2 mount",
        ),
        (&["--cgroup", "no-such-cgroup-here"], "no-such-cgroup-here"),
        (
            &["--cgroup", guarded, "--deny", "169.254.169.254/33"],
            "is not an IP prefix",
        ),
        (
            &["--cgroup", guarded, "--deny", "0.0.0.0/0"],
            "broader than the allowed /16",
        ),
        (
            &["--cgroup", guarded, "--allow", "/nonexistent/cgroup"],
            "/nonexistent/cgroup",
        ),
    ];
    for (args, want) in cases {
        let mut daemon = Daemon::command(["standalone", "--bpffs-dir", &pins])
            .args(args)
            .spawn()
            .expect("spawn");
        let status = daemon.wait_exit(Duration::from_secs(10)).expect("exits");
        assert!(!status.success(), "{args:?} should fail");
        let log = daemon.log();
        assert!(log.contains(want), "{args:?}: log lacks {want:?}:\n{log}");
        assert!(!log.contains("imds-guard is enforcing"), "{args:?}:\n{log}");
    }
    // Checked by traffic: nothing was left attached by any of the attempts.
    let result = stage.attempt(&stage.blocked, &case("tcp", addrs::METADATA_V4, HTTP));
    assert_eq!(result.outcome, Outcome::Reached, "{result:?}");
}

#[test]
fn sigterm_leaves_enforcement_pinned_and_uninstall_removes_it() {
    let mut world = World::default_allow();
    let status = world.daemon.stop().expect("stops");
    assert!(status.success(), "{status}");
    // With the daemon gone, the pinned programs still refuse and allow.
    let tcp = case("tcp", addrs::METADATA_V4, HTTP);
    assert_eq!(world.attempt(&world.blocked, &tcp).outcome, eperm());
    assert_eq!(
        world.attempt(&world.allowed, &tcp).outcome,
        Outcome::Reached
    );
    assert_eq!(world.pins.generations().len(), 1);

    let pins = world.pins.path().display().to_string();
    let mut uninstall = Daemon::spawn(&["uninstall", "--bpffs-dir", &pins]).expect("uninstall");
    let status = uninstall.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{}", uninstall.log());
    assert!(!world.pins.path().exists(), "pins left behind");
    assert_eq!(
        world.attempt(&world.blocked, &tcp).outcome,
        Outcome::Reached
    );
}
