//! `imds-guard doctor`, run as the daemon runs (the test run's grant: the
//! DaemonSet's unless `IMDS_GUARD_TEST_CAPS` says otherwise), here and in
//! every guest of the kernel matrix: it must predict the start (it passes
//! where the daemon enforces and fails, naming the check, where the start
//! is refused), and name each missing privilege, mount and profile rule
//! with its fix.

use std::{collections::BTreeMap, time::Duration};

use imds_guard_tests::{
    daemon::{Daemon, ENFORCING},
    privileges::{BpfFilter, Privileges},
    stage::Stage,
};

/// Under TCG (the kernel matrix) the verifier alone can take many seconds.
const START_TIMEOUT: Duration = Duration::from_mins(1);

/// Held by each test: doctor's probes create maps and programs, which
/// kernels before 5.11 charge to uid 0's memlock count, so they run one
/// doctor at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every check doctor makes, in its order.
const CHECKS: [&str; 11] = [
    "kernel",
    "cgroup",
    "bpffs",
    "capabilities",
    "seccomp",
    "memlock",
    "bpf features",
    "tc hook",
    "btf",
    "lsm",
    "packet sockets",
];

struct Report {
    passed: bool,
    /// check → (level, detail and fix)
    lines: BTreeMap<String, (String, String)>,
    text: String,
}

impl Report {
    fn level(&self, check: &str) -> &str {
        &self.lines[check].0
    }

    /// Asserts `check` is at `level` and its line says `says`.
    fn expect(&self, check: &str, level: &str, says: &str) {
        let (got, line) = &self.lines[check];
        assert_eq!(got, level, "{check}: {line}\n{}", self.text);
        assert!(line.contains(says), "{check}: {says:?} not in {line:?}");
    }
}

/// Runs `imds-guard doctor ARGS` with `privileges` as JSON, then as text,
/// and checks the two agree.
fn doctor(privileges: &Privileges, args: &[&str]) -> Report {
    let run = |output: &str| {
        Daemon::command(["doctor", "--output", output].iter().chain(args))
            .privileges(privileges)
            .output()
            .expect("run imds-guard doctor")
    };
    let json = run("json");
    let findings: Vec<serde_json::Value> =
        serde_json::from_slice(&json.stdout).expect("doctor --output json");
    let lines: BTreeMap<String, (String, String)> = findings
        .iter()
        .map(|f| {
            let level = f["level"].as_str().expect("level").to_owned();
            if level != "ok" {
                assert!(f["fix"].is_string(), "a {level} without a fix: {f}");
            }
            let line = format!("{} {}", f["detail"], f["fix"]);
            (
                f["check"].as_str().expect("check").to_owned(),
                (level, line),
            )
        })
        .collect();
    let checks: Vec<&str> = findings
        .iter()
        .map(|f| f["check"].as_str().expect("check"))
        .collect();
    assert_eq!(checks, CHECKS, "every check, once, in order");
    let text = run("text");
    let rendered = String::from_utf8_lossy(&text.stdout).into_owned();
    let fails = lines.values().filter(|(level, _)| level == "fail").count();
    assert!(
        rendered.ends_with(&format!(" {fails} fail\n")),
        "text and JSON agree:\n{rendered}"
    );
    assert_eq!(json.status.success(), text.status.success());
    assert_eq!(json.status.success(), fails == 0, "exit non-zero on a fail");
    Report {
        passed: json.status.success(),
        lines,
        text: rendered,
    }
}

/// Doctor's verdict is the start's: where it passes the daemon enforces,
/// and where it fails the start is refused for what it named. In the
/// kernel matrix this runs as root, with the DaemonSet's grant (5.10:
/// refused, for memlock) and with the kernel-5.10 overlay's.
#[test]
fn doctor_predicts_the_start_with_the_runs_privileges() {
    let _one = one_at_a_time();
    let stage = Stage::set_up();
    let privileges = Privileges::from_env().expect("privileges");
    let pins = stage
        .pins
        .path()
        .to_str()
        .expect("utf-8 pins path")
        .to_owned();
    let report = doctor(&privileges, &["--bpffs-dir", &pins]);
    for check in [
        "kernel",
        "cgroup",
        "bpffs",
        "capabilities",
        "seccomp",
        "bpf features",
    ] {
        assert_ne!(report.level(check), "fail", "{}", report.text);
    }
    // Where the memlock limit is too low for a start, it may be for the
    // probes too (5.10 with the base DaemonSet); then they cannot be asked.
    if report.level("memlock") == "ok" {
        report.expect(
            "bpf features",
            "ok",
            "cgroup_skb, cgroup_sock_addr, sched_cls",
        );
    }
    let mut daemon = stage
        .daemon(&["--allow", "{allowed}"])
        .privileges(&privileges)
        .spawn()
        .expect("spawn imds-guard");
    if report.passed {
        if let Err(err) = daemon.wait_for_log(ENFORCING, START_TIMEOUT) {
            panic!("doctor passed, the start did not: {err}\n{}", report.text);
        }
        daemon.stop().expect("stop");
    } else {
        let status = daemon
            .wait_exit(START_TIMEOUT)
            .expect("a refused start ends");
        assert!(
            !status.success(),
            "doctor failed, the start did not:\n{}",
            report.text
        );
        // Before 5.11 without CAP_SYS_RESOURCE: the memlock limit.
        report.expect("memlock", "fail", "deploy/overlays/kernel-5.10");
        assert!(daemon.log().contains("RLIMIT_MEMLOCK"), "{}", daemon.log());
    }
}

/// Each missing piece fails its own line, naming the fix, and the command
/// exits non-zero.
#[test]
fn doctor_fails_naming_a_missing_capability_mount_profile_rule_and_lsm_grant() {
    let _one = one_at_a_time();
    let daemonset = Privileges::daemonset();
    let no_bpf = Privileges::named(&["NET_ADMIN"]).expect("privileges");
    let report = doctor(&no_bpf, &[]);
    assert!(!report.passed);
    report.expect("capabilities", "fail", "missing CAP_BPF");
    report.expect("capabilities", "fail", "securityContext.capabilities.add");

    // A directory that is not on bpffs.
    let not_bpffs = std::env::temp_dir().join("imds-guard-doctor-not-bpffs");
    let report = doctor(&daemonset, &["--bpffs-dir", &not_bpffs.to_string_lossy()]);
    assert!(!report.passed);
    report.expect("bpffs", "fail", "mount -t bpf bpf /sys/fs/bpf");

    // A runtime profile without the bpf rule.
    let filtered = Privileges {
        bpf_filter: BpfFilter::RefuseAll,
        ..Privileges::daemonset()
    };
    let report = doctor(&filtered, &[]);
    assert!(!report.passed);
    report.expect(
        "seccomp",
        "fail",
        "seccomp filter refuses the bpf system call",
    );
    report.expect("seccomp", "fail", "Localhost profile that allows bpf");

    // refusePacketSockets with the base grant: the overlay adds CAP_PERFMON.
    let report = doctor(&daemonset, &["--refuse-packet-sockets"]);
    assert!(!report.passed);
    report.expect("packet sockets", "fail", "CAP_PERFMON");
    report.expect(
        "packet sockets",
        "fail",
        "deploy/overlays/packet-socket-lsm",
    );
}
