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
    Daemon, Outcome, TempFile, TestCgroup, addrs,
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
    let blocked = world.blocked.clone();
    let report = report_of(&mut world.daemon, &blocked);
    assert_eq!(attempts(&mut world.daemon, "refused", 5.0), 5.0);
    for field in [
        "destination=169.254.169.254:80",
        "protocol=\"tcp\"",
        "hook=\"connect\"",
        "verdict=\"refused\"",
    ] {
        assert!(report.contains(field), "{field}: {report}");
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
fn a_long_allow_file_allows_every_entry_and_a_bad_entry_names_its_line() {
    let mut stage = Stage::set_up();
    // Siblings enough for the daemon to name them from one listing of
    // their parent: a name missing from it must still be refused.
    let jobs: Vec<PathBuf> = (0..200)
        .map(|n| {
            stage
                .guarded_child(&format!("jobs/{n:03}"))
                .expect("cgroup")
        })
        .collect();
    let listing: String = jobs
        .iter()
        .map(|dir| dir.display().to_string() + "\n")
        .collect();
    let missing = stage.guarded.join("jobs/no-such-job");
    let bad = format!(
        "{listing}# and one that is not there:\n{}\n",
        missing.display()
    );
    let allow_file = TempFile::new("allow", &bad).expect("allow file");
    let mut refused = stage
        .daemon(&["--allow-file", &allow_file.arg()])
        .spawn()
        .expect("spawn");
    let status = refused.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success(), "a bad entry refuses the start");
    let log = refused.log();
    let want = format!(
        "allow file {}, line 202: cannot read {}",
        allow_file.arg(),
        missing.display()
    );
    assert!(log.contains(&want), "log lacks {want:?}:\n{log}");
    let tcp = case("tcp", addrs::METADATA_V4, HTTP);
    let result = stage.attempt(&jobs[199], &tcp);
    assert_eq!(
        result.outcome,
        Outcome::Reached,
        "nothing attached: {result:?}"
    );

    allow_file.write(&listing).expect("write");
    let _daemon = stage
        .daemon(&["--allow-file", &allow_file.arg()])
        .start()
        .expect("imds-guard starts");
    for job in [&jobs[0], &jobs[117], &jobs[199]] {
        let result = stage.attempt(job, &tcp);
        assert_eq!(result.outcome, Outcome::Reached, "{job:?}: {result:?}");
    }
    let result = stage.attempt(&stage.blocked, &tcp);
    assert_eq!(result.outcome, eperm(), "{result:?}");
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
    let blocked = world.blocked.clone();
    let report = report_of(&mut world.daemon, &blocked);
    assert!(report.contains("verdict=\"audited\""), "{report}");
    // The connect and the connection's packets are all counted.
    let audited = attempts(&mut world.daemon, "audited", 2.0);
    assert!(audited >= 2.0, "{audited}");
}

#[test]
fn an_audited_cgroup_reaches_the_server_and_is_reported_until_its_entry_is_removed() {
    let stage = Stage::set_up();
    let mut tree = TestCgroup::new("audit").expect("test cgroup");
    let mut make = |p: &str| tree.child(p).expect("cgroup");
    let (allowed, audited, audited_job, plain) = (
        make("allowed"),
        make("audited"),
        make("audited/job"),
        make("plain"),
    );
    // Audit entries come from the file, so that a reload can take them away.
    let audit_config =
        |dirs: &[&PathBuf]| serde_json::json!({ "standalone": { "audit": dirs } }).to_string();
    let config = TempFile::new("config", &audit_config(&[&audited])).expect("config file");
    let allowed_arg = allowed.display().to_string();
    let mut daemon = Daemon::standalone(tree.path(), stage.pins.path())
        .args(["--config", &config.arg(), "--allow", &allowed_arg])
        .args(["--http-listen", "127.0.0.1:0"])
        .start()
        .expect("imds-guard starts");

    // The allowed cgroup goes first: a report of it would precede the others.
    expect_tcp(&stage, &allowed, &Outcome::Reached);
    // The grandchild's nearest listed ancestor is the audited cgroup.
    expect_tcp(&stage, &audited, &Outcome::Reached);
    expect_tcp(&stage, &audited_job, &Outcome::Reached);
    expect_tcp(&stage, &plain, &eperm());
    for (cgroup, verdict) in [
        (&audited, "audited"),
        (&audited_job, "audited"),
        (&plain, "refused"),
    ] {
        let report = report_of(&mut daemon, cgroup);
        assert!(
            report.contains(&format!("verdict=\"{verdict}\"")),
            "{verdict}: {report}"
        );
    }
    assert_eq!(
        daemon.count_log(&report_needle(&allowed)),
        0,
        "{}",
        daemon.log()
    );
    // One connect each from the audited two, and their packets.
    let audited_count = attempts(&mut daemon, "audited", 2.0);
    assert!(audited_count >= 2.0, "{audited_count}");
    assert_eq!(attempts(&mut daemon, "refused", 1.0), 1.0);
    assert_listed(&stage, &allowed, &audited);

    config.write(&audit_config(&[])).expect("write");
    daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(5))
        .expect("reload");
    for cgroup in [&audited, &audited_job, &plain] {
        expect_tcp(&stage, cgroup, &eperm());
    }
    expect_tcp(&stage, &allowed, &Outcome::Reached);
    // The plain cgroup's first refusal and these three.
    assert_eq!(attempts(&mut daemon, "refused", 4.0), 4.0);
    let status = status_text(&stage);
    assert!(!status.contains("audited "), "{status}");
}

#[test]
fn the_audit_flag_covers_a_subtree_and_allow_wins_over_it() {
    let stage = Stage::set_up();
    let blocked = stage.blocked.display().to_string();
    let mut daemon = stage
        .daemon(&["--allow", "{allowed}", "--audit", "{allowed}"])
        .args(["--audit", &blocked])
        .start()
        .expect("imds-guard starts");
    expect_tcp(&stage, &stage.allowed, &Outcome::Reached);
    expect_tcp(&stage, &stage.allowed_child, &Outcome::Reached);
    expect_tcp(&stage, &stage.blocked, &Outcome::Reached);
    // The attach point itself is listed in neither.
    expect_tcp(&stage, &stage.guarded, &eperm());
    let report = report_of(&mut daemon, &stage.blocked);
    assert!(report.contains("verdict=\"audited\""), "{report}");
    let report = report_of(&mut daemon, &stage.guarded);
    assert!(report.contains("verdict=\"refused\""), "{report}");
    for cgroup in [&stage.allowed, &stage.allowed_child] {
        let reports = daemon.count_log(&report_needle(cgroup));
        assert_eq!(reports, 0, "{}", daemon.log());
    }
    assert_listed(&stage, &stage.allowed, &stage.blocked);
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

/// `imds_guard_attempts_total` of standalone cgroups' attempts at the
/// metadata server's HTTP port with `verdict`, once it reaches `at_least`
/// (or time runs out).
fn attempts(daemon: &mut Daemon, verdict: &str, at_least: f64) -> f64 {
    let series = format!(
        "imds_guard_attempts_total{{namespace=\"\",pod=\"\",destination=\"169.254.169.254:80\",verdict=\"{verdict}\"}}"
    );
    daemon.metric_reaching(&series, at_least).expect("metrics")
}

/// What log records of `cgroup`'s attempts contain (and no other line).
fn report_needle(cgroup: &Path) -> String {
    format!("cgroup={} destination=", cgroup.display())
}

/// The one log record of `cgroup`'s attempts, waited for: repeats within
/// the window are counted, not logged again.
fn report_of(daemon: &mut Daemon, cgroup: &Path) -> String {
    let needle = report_needle(cgroup);
    daemon
        .wait_for_log(&needle, Duration::from_secs(5))
        .expect("a report of the cgroup");
    let log = daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
    assert_eq!(lines.len(), 1, "one log record of {needle}:\n{log}");
    lines[0].to_owned()
}

/// TCP connections the fake server's namespace has accepted so far (its
/// `Tcp: PassiveOpens`): what got through, counted on the server's side.
fn connections_accepted(stage: &Stage) -> u64 {
    let mut cat = Command::new("cat");
    cat.arg("/proc/net/snmp").stdout(Stdio::piped());
    let output = spawn_in(&mut cat, &stage.sandbox.server, None)
        .expect("cat in the server namespace")
        .wait_with_output()
        .expect("its output");
    let snmp = String::from_utf8_lossy(&output.stdout);
    // A line of names, then a line of values.
    let mut tcp = snmp.lines().filter_map(|l| l.strip_prefix("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "PassiveOpens")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no Tcp PassiveOpens in\n{snmp}"))
}

/// One TCP attempt at the metadata server from `cgroup` ends with `want`,
/// and the server accepted a connection exactly when it was reached.
fn expect_tcp(stage: &Stage, cgroup: &Path, want: &Outcome) {
    let before = connections_accepted(stage);
    let result = stage.attempt(cgroup, &case("tcp", addrs::METADATA_V4, HTTP));
    let accepted = connections_accepted(stage) - before;
    let reached = u64::from(*want == Outcome::Reached);
    assert_eq!(
        (&result.outcome, accepted),
        (want, reached),
        "{}: {result:?}, {accepted} connection(s) accepted",
        cgroup.display()
    );
}

/// `imds-guard status` lists exactly `allowed` as allowed and `audited` as
/// audited.
fn assert_listed(stage: &Stage, allowed: &Path, audited: &Path) {
    let status = status_text(stage);
    for section in [
        format!("allowed     1 cgroup(s)\n  {}\n", allowed.display()),
        format!("audited     1 cgroup(s)\n  {}\n", audited.display()),
    ] {
        assert!(status.contains(&section), "{section:?} not in\n{status}");
    }
}

/// `imds-guard status` of the stage's pins, as text.
fn status_text(stage: &Stage) -> String {
    let pins = stage.pins.path().display().to_string();
    run_to_end(&["status", "--bpffs-dir", &pins]).expect("status")
}
