//! `cargo xtask bench`: what imds-guard costs. Each cost is a ratio
//! against the same traffic without imds-guard, measured side by side in
//! the same run, round after round, between the sandbox's network
//! namespaces over the veth pair. The traffic comes from a cgroup under the
//! protected one that is not allowlisted, so it runs under enforcement.
//! Only the blocked-connect figure targets the metadata address: our own
//! fake one, inside the sandbox.

mod kubernetes;

use std::{
    collections::BTreeMap,
    fmt,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use imds_guard_tests::{
    Daemon, PinDir, Sandbox, TestCgroup, addrs,
    daemon::{ENFORCING, run_to_end},
    netns::Netns,
    probe::{binary, spawn_in},
};

use crate::{
    build_release,
    interrupt::{catch_interrupts, interrupted},
    is_root, setup, target_dir,
};

/// Rounds of "without" and "with" per ratio figure: many short ones, since
/// other work on a small machine comes in bursts, and a burst then spoils
/// one round's ratio instead of moving the median.
const ROUNDS: usize = 10;
const BULK_SECONDS: &str = "1.5";
const RATE_SECONDS: &str = "1";
/// A pause before each measurement, so "with" is measured on a daemon that
/// has finished starting, and "without" on one that has finished stopping.
const SETTLE: Duration = Duration::from_millis(100);
/// Each step of the traffic behind the program-cost figures.
const MIX_SECONDS: &str = "1";
/// The sink reads and discards TCP and UDP on this port...
const SINK_PORT: &str = "5001";
/// ...and accepts and closes TCP connections on this one.
const ACCEPT_PORT: &str = "5002";
/// Longer than any run: the sink is killed when the benchmark ends, and
/// this only bounds it should that fail.
const SINK_LIFETIME_SECONDS: &str = "1800";
/// What a metadata client would connect to.
const HTTP_PORT: &str = "80";
const BLOCKED_CONNECTS: &str = "1000";
/// Bounds the blocked connects, which take microseconds each.
const BLOCKED_CONNECTS_MAX_SECONDS: &str = "60";
const SCALE_DENY_RULES: usize = 1000;
const SCALE_ALLOW_ENTRIES: usize = 10_000;
const SCALE: &str = "1,000 deny rules + 10,000 allow entries";
/// Daemon starts per start-time figure.
const STARTS: usize = 7;
/// How long the daemon may take to start enforcing.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon idles before its memory is read.
const IDLE: Duration = Duration::from_secs(1);
/// An address on the veth's subnet that the client's neighbour table maps
/// to a MAC address nobody has: frames to it leave and vanish, as behind a
/// firewall that drops.
const DROPPING_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const NOWHERE_MAC: &str = "02:00:00:00:00:99";
const PLAIN_DROP_TIMEOUT_MS: &str = "3000";
/// The eBPF programs' names share this prefix.
const PROGRAM_PREFIX: &str = "imds_guard_";
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub fn run(root: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root: it creates network namespaces, cgroups and BPF programs \
             (run `sudo cargo xtask bench`)"
        );
    }
    setup::run(root)?;
    let bin_dir = build_release(root)?;
    // SAFETY: still single-threaded; the harness reads this to find the binaries.
    unsafe { std::env::set_var("IMDS_GUARD_BIN_DIR", &bin_dir) };
    // The daemons run as root here, not with the DaemonSet's grant: the
    // per-program rows find the programs by name, and without CAP_PERFMON
    // aya loads them nameless (its name probe is a tracepoint program).
    if std::env::var_os("IMDS_GUARD_TEST_CAPS").is_none() {
        // SAFETY: still single-threaded.
        unsafe { std::env::set_var("IMDS_GUARD_TEST_CAPS", "all") };
    }
    catch_interrupts()?;

    let started = Instant::now();
    let machine = Machine::now()?;
    let stage = Stage::new()?;
    let rows = measure(&stage)?;
    drop(stage);
    let wall = started.elapsed();
    let load_after = load_average();

    println!();
    println!(
        "imds-guard benchmark, {}: {} cores, kernel {}, load average {} before, {load_after} after; \
         {ROUNDS} rounds; {:.0} s",
        machine.date,
        machine.cores,
        machine.kernel,
        machine.load_before,
        wall.as_secs_f64()
    );
    println!();
    print!("{}", table(&rows));
    let missed = rows.iter().filter(|r| r.met == Some(false)).count();
    println!();
    println!("targets missed: {missed}");

    let out_dir = target_dir(root)?.join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join("bench.json");
    let report = Json::object([
        ("date", Json::Text(machine.date)),
        ("cores", Json::Number(machine.cores as f64)),
        ("kernel", Json::Text(machine.kernel)),
        ("load_average_before", Json::Text(machine.load_before)),
        ("load_average_after", Json::Text(load_after)),
        ("rounds", Json::Number(ROUNDS as f64)),
        ("wall_seconds", Json::Number(wall.as_secs_f64())),
        ("rows", Json::List(rows.iter().map(Row::to_json).collect())),
    ]);
    std::fs::write(&json_path, format!("{report}\n"))
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("raw numbers: {}", json_path.display());
    Ok(())
}

/// Every figure, in order.
fn measure(stage: &Stage) -> anyhow::Result<Vec<Row>> {
    let default = stage.default_rules();
    let scale = stage.scale_rules();
    let server = addrs::SERVER_V4.to_string();
    let bulk = ["bulk", &server, SINK_PORT, "--seconds", BULK_SECONDS];
    let connects = [
        "connect-rate",
        &server,
        ACCEPT_PORT,
        "--seconds",
        RATE_SECONDS,
    ];
    let datagrams = ["udp-rate", &server, SINK_PORT, "--seconds", RATE_SECONDS];
    let connects_name = "TCP connect-and-close rate";
    let datagrams_name = "UDP sendto rate, 16-byte datagrams";

    let mut rows = vec![
        ratio_figure(
            stage,
            &default,
            "1 TCP bulk throughput, client to server",
            Unit::Bytes,
            &bulk,
            0.99,
        )?,
        ratio_figure(
            stage,
            &default,
            &format!("2 {connects_name}"),
            Unit::Calls,
            &connects,
            0.97,
        )?,
        ratio_figure(
            stage,
            &default,
            &format!("3 {datagrams_name}"),
            Unit::Calls,
            &datagrams,
            0.97,
        )?,
    ];
    rows.extend(program_figures(stage, &default, "4")?);
    rows.extend(blocked_connect_figures(stage, &default)?);
    rows.push(ratio_figure(
        stage,
        &scale,
        &format!("6 {connects_name}, {SCALE}"),
        Unit::Calls,
        &connects,
        0.97,
    )?);
    rows.push(ratio_figure(
        stage,
        &scale,
        &format!("6 {datagrams_name}, {SCALE}"),
        Unit::Calls,
        &datagrams,
        0.97,
    )?);
    rows.extend(program_figures(stage, &scale, "6 at scale:")?);
    for rules in [&default, &scale] {
        rows.push(memory_figure(stage, rules)?);
    }
    rows.extend(kubernetes::figures()?);
    for rules in [&default, &scale] {
        rows.push(start_figure(stage, rules)?);
    }
    Ok(rows)
}

fn progress(what: &str) {
    println!("bench: {what}");
}

/// The sandbox, our traffic sink, the cgroups and a pin directory of our
/// own: the traffic runs in `app`, under the protected `guarded` and not
/// allowlisted.
struct Stage {
    /// Removed first, which detaches whatever a failed run left pinned.
    pins: PinDir,
    _sink: Sink,
    allow_file: AllowFile,
    _cgroups: TestCgroup,
    sandbox: Sandbox,
    guarded: PathBuf,
    app: PathBuf,
    /// Allowlisted, as a metadata agent would be.
    agent: PathBuf,
}

impl Stage {
    fn new() -> anyhow::Result<Stage> {
        progress("building the sandbox and the traffic sink");
        let sandbox = Sandbox::new()?;
        let sink = Sink::start(&sandbox.server)?;
        make_dropping(&sandbox.client)?;
        let mut cgroups = TestCgroup::new("bench")?;
        let guarded = cgroups.child("workloads")?;
        let app = cgroups.child("workloads/app")?;
        let agent = cgroups.child("workloads/agent")?;
        progress(&format!(
            "making {SCALE_ALLOW_ENTRIES} empty cgroups for the large allow list"
        ));
        let mut allow_list = String::new();
        for entry in 0..SCALE_ALLOW_ENTRIES {
            if entry % 1000 == 0 {
                interrupted()?;
            }
            let dir = cgroups.child(&format!("allowlisted/{entry:05}"))?;
            writeln!(allow_list, "{}", dir.display())?;
        }
        let allow_file = AllowFile::write(&allow_list)?;
        Ok(Stage {
            pins: PinDir::new("bench"),
            _sink: sink,
            allow_file,
            _cgroups: cgroups,
            sandbox,
            guarded,
            app,
            agent,
        })
    }

    fn default_rules(&self) -> Rules {
        Rules {
            name: "default rules",
            args: vec!["--allow".to_owned(), self.agent.display().to_string()],
        }
    }

    /// Many deny rules (plus the two defaults, which `--deny` replaces) and
    /// a long allow list.
    fn scale_rules(&self) -> Rules {
        let defaults = ["169.254.169.254/32 except-ports=53", "fd00:ec2::254/128"];
        let many = (0..SCALE_DENY_RULES).map(|n| format!("169.254.{}.{}/32", n / 250, n % 250 + 1));
        let mut args = vec![
            "--allow".to_owned(),
            self.agent.display().to_string(),
            "--allow-file".to_owned(),
            self.allow_file.path.display().to_string(),
        ];
        for rule in defaults.into_iter().map(str::to_owned).chain(many) {
            args.extend(["--deny".to_owned(), rule]);
        }
        Rules { name: SCALE, args }
    }

    fn daemon_args(&self, rules: &Rules) -> Vec<String> {
        let mut args = vec![
            "standalone".to_owned(),
            "--cgroup".to_owned(),
            self.guarded.display().to_string(),
            "--bpffs-dir".to_owned(),
            self.pins.path().display().to_string(),
        ];
        args.extend(rules.args.iter().cloned());
        args
    }

    /// Runs `imds-bench-traffic ARGS` in the client namespace and the
    /// traffic cgroup, and returns the fields of the line it printed.
    fn traffic(&self, args: &[&str]) -> anyhow::Result<Fields> {
        interrupted()?;
        let mut command = Command::new(binary("imds-bench-traffic")?);
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = spawn_in(&mut command, &self.sandbox.client, Some(&self.app))?
            .wait_with_output()
            .context("waiting for imds-bench-traffic")?;
        interrupted()?;
        ensure!(
            output.status.success(),
            "`imds-bench-traffic {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Fields::parse(&String::from_utf8_lossy(&output.stdout))
    }
}

/// Gives [`DROPPING_V4`] a neighbour entry with a MAC address nobody has,
/// on whichever device the client routes it through.
fn make_dropping(client: &Netns) -> anyhow::Result<()> {
    let dropping = DROPPING_V4.to_string();
    let route = client.ip(&["route", "get", &dropping])?;
    let device = route
        .split_whitespace()
        .skip_while(|token| *token != "dev")
        .nth(1)
        .with_context(|| format!("no device in the route to {dropping}: {route}"))?;
    client.ip(&[
        "neigh",
        "replace",
        &dropping,
        "lladdr",
        NOWHERE_MAC,
        "dev",
        device,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// `imds-bench-traffic sink` in the server namespace, killed on drop.
struct Sink {
    child: Child,
}

impl Sink {
    fn start(server: &Netns) -> anyhow::Result<Sink> {
        let mut command = Command::new(binary("imds-bench-traffic")?);
        command
            .args(["sink", "--port", SINK_PORT, "--accept-port", ACCEPT_PORT])
            .args(["--seconds", SINK_LIFETIME_SECONDS])
            .stdout(Stdio::piped());
        let mut child = spawn_in(&mut command, server, None)?;
        let stdout = child.stdout.take().context("the sink has no stdout")?;
        let sink = Sink { child };
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .context("reading from the sink")?;
        ensure!(
            first.trim() == "ready",
            "the traffic sink did not start: {first:?}"
        );
        Ok(sink)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The large allow list, one cgroup directory a line; removed on drop.
struct AllowFile {
    path: PathBuf,
}

impl AllowFile {
    fn write(text: &str) -> anyhow::Result<AllowFile> {
        let path = std::env::temp_dir().join(imds_guard_tests::unique_name("bench-allow"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(AllowFile { path })
    }
}

impl Drop for AllowFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the daemon enforces: its arguments after `--cgroup DIR`.
struct Rules {
    name: &'static str,
    args: Vec<String>,
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Turns enforcement on for the guarded subtree: a daemon started on an
/// empty pin directory loads and attaches its programs. This and
/// [`enforcement_off`] are the only places that know how.
fn enforcement_on(stage: &Stage, rules: &Rules) -> anyhow::Result<Daemon> {
    Ok(Daemon::start(&as_strs(&stage.daemon_args(rules)))?)
}

/// Turns enforcement off: a stopped daemon leaves its programs pinned and
/// attached, and only `imds-guard uninstall` detaches them. Checked, since
/// a "without" measured with the programs still attached would be a lie;
/// the kernel detaches a link from a work queue once its last pin is gone,
/// so the check waits for that, up to [`DETACH_TIMEOUT`].
fn enforcement_off(stage: &Stage, mut daemon: Daemon) -> anyhow::Result<()> {
    let status = daemon.stop()?;
    ensure!(
        status.success(),
        "imds-guard exited with {status}:\n{}",
        daemon.log()
    );
    let pins = stage.pins.path().display().to_string();
    run_to_end(&["uninstall", "--bpffs-dir", &pins])?;
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let left = attached_programs(&stage.guarded)?;
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "imds-guard programs are still attached to {} {DETACH_TIMEOUT:?} after uninstall: {left:?}",
            stage.guarded.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `key=value` fields of the line a traffic client printed.
struct Fields {
    line: String,
    values: BTreeMap<String, String>,
}

impl Fields {
    fn parse(stdout: &str) -> anyhow::Result<Fields> {
        let line = stdout
            .lines()
            .last()
            .context("imds-bench-traffic printed nothing")?;
        let values = line
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Ok(Fields {
            line: line.to_owned(),
            values,
        })
    }

    fn number(&self, key: &str) -> anyhow::Result<f64> {
        self.values
            .get(key)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no number {key} in {:?}", self.line))
    }

    fn to_json(&self) -> Json {
        Json::Object(
            self.values
                .iter()
                .map(|(key, value)| {
                    let value = value
                        .parse()
                        .map_or_else(|_| Json::Text(value.clone()), Json::Number);
                    (key.clone(), value)
                })
                .collect(),
        )
    }
}

/// The successful calls (or bytes) per second of one client run, which must
/// have had no failed call.
fn per_second(stage: &Stage, args: &[&str]) -> anyhow::Result<f64> {
    let fields = stage.traffic(args)?;
    if let Some(failed) = fields.values.get("failed") {
        ensure!(
            failed == "0",
            "`{}` had failed calls: {}",
            args.join(" "),
            fields.line
        );
    }
    fields.number("per_s")
}

/// One figure's samples without and with enforcement, one pair a round.
#[derive(Default)]
struct Paired {
    without: Vec<f64>,
    with: Vec<f64>,
}

impl Paired {
    fn ratios(&self) -> Vec<f64> {
        self.with
            .iter()
            .zip(&self.without)
            .map(|(with, without)| with / without)
            .collect()
    }
}

/// Measures `args` without and with enforcement, [`ROUNDS`] times. The
/// order flips every round (without-with, then with-without), so a drift in
/// the machine's speed weighs on both sides alike.
fn side_by_side(stage: &Stage, rules: &Rules, args: &[&str]) -> anyhow::Result<Paired> {
    let mut paired = Paired::default();
    for round in 0..ROUNDS {
        let with_first = round % 2 == 1;
        for enforced in [with_first, !with_first] {
            if enforced {
                let daemon = enforcement_on(stage, rules)?;
                std::thread::sleep(SETTLE);
                paired.with.push(per_second(stage, args)?);
                enforcement_off(stage, daemon)?;
            } else {
                std::thread::sleep(SETTLE);
                paired.without.push(per_second(stage, args)?);
            }
        }
    }
    Ok(paired)
}

/// The `q` quantile (0.5 is the median), interpolated between the two
/// nearest values; NaN for no values.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let position = q * last as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(last);
    let fraction = position - below as f64;
    sorted[below] * (1.0 - fraction) + sorted[above] * fraction
}

fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Calls,
}

impl Unit {
    fn show(self, per_second: f64) -> String {
        match self {
            Unit::Bytes => format!("{:.2} Gbit/s", per_second * 8.0 / 1e9),
            Unit::Calls => format!("{per_second:.0}/s"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes/s",
            Unit::Calls => "calls/s",
        }
    }
}

/// A ratio figure: medians of each side, and the median of the rounds'
/// with/without ratios against `min_ratio`, with the middle half of those
/// ratios in brackets to show how much the machine's noise moves them.
fn ratio_figure(
    stage: &Stage,
    rules: &Rules,
    figure: &str,
    unit: Unit,
    args: &[&str],
    min_ratio: f64,
) -> anyhow::Result<Row> {
    progress(&format!("{figure}: {ROUNDS} rounds without and with"));
    let paired = side_by_side(stage, rules, args)?;
    let ratios = paired.ratios();
    let ratio = median(&ratios);
    let (low, high) = (quantile(&ratios, 0.25), quantile(&ratios, 0.75));
    Ok(Row::new(figure, format!("{ratio:.3} [{low:.3}–{high:.3}]"))
        .sides(
            unit.show(median(&paired.without)),
            unit.show(median(&paired.with)),
        )
        .target(Target::AtLeast(min_ratio), ratio)
        .raw(Json::object([
            ("unit", Json::Text(unit.name().to_owned())),
            ("command", Json::Text(args.join(" "))),
            ("without", Json::numbers(&paired.without)),
            ("with", Json::numbers(&paired.with)),
            ("ratios", Json::numbers(&ratios)),
            ("ratio", Json::Number(ratio)),
            ("ratio_quartiles", Json::numbers(&[low, high])),
        ])))
}

/// A program attached to the guarded cgroup.
#[derive(Debug)]
struct AttachedProgram {
    id: u32,
    name: String,
}

/// Our programs attached to `cgroup`, from `bpftool cgroup show` (a line
/// per program: id, attach type, flags, name).
fn attached_programs(cgroup: &Path) -> anyhow::Result<Vec<AttachedProgram>> {
    let listing = imds_guard_tests::run("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let mut tokens = line.split_whitespace();
            let id = tokens.next()?.parse().ok()?;
            let name = tokens.last()?;
            name.starts_with(PROGRAM_PREFIX).then(|| AttachedProgram {
                id,
                name: name.to_owned(),
            })
        })
        .collect())
}

/// A program's total run time and run count so far. `bpftool prog show`
/// prints them on its first line, and leaves them out while they are zero.
fn run_totals(id: u32) -> anyhow::Result<(u64, u64)> {
    let shown = imds_guard_tests::run("bpftool", &["prog", "show", "id", &id.to_string()])?;
    let tokens: Vec<&str> = shown
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let value_of = |key: &str| -> anyhow::Result<u64> {
        match tokens.iter().position(|token| *token == key) {
            None => Ok(0),
            Some(at) => tokens
                .get(at + 1)
                .and_then(|value| value.parse().ok())
                .with_context(|| format!("unreadable {key} for program {id}: {shown}")),
        }
    };
    Ok((value_of("run_time_ns")?, value_of("run_cnt")?))
}

/// One program's runs, and the time they took, during a phase of traffic.
struct ProgramRuns {
    name: String,
    runs: u64,
    run_time_ns: u64,
}

fn runs_during(
    programs: &[AttachedProgram],
    phase: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<ProgramRuns>> {
    let before = programs
        .iter()
        .map(|program| run_totals(program.id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    phase()?;
    programs
        .iter()
        .zip(before)
        .map(|(program, (time_before, runs_before))| {
            let (time_after, runs_after) = run_totals(program.id)?;
            Ok(ProgramRuns {
                name: program.name.clone(),
                runs: runs_after.saturating_sub(runs_before),
                run_time_ns: time_after.saturating_sub(time_before),
            })
        })
        .collect()
}

/// `kernel.bpf_stats_enabled` on while this lives, then back to what it
/// was: the kernel times programs only while it is on, and the timing costs
/// every BPF program on the machine a little, so it stays off for the
/// ratio figures.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = std::fs::write(BPF_STATS, &self.previous) {
            eprintln!("cleanup: restoring {BPF_STATS}: {err}");
        }
    }
}

/// The traffic behind the program-cost figures: TCP connects, unconnected
/// UDP sends and ICMP echoes (which only the packet hook sees), over IPv4
/// and IPv6, so each of the five programs runs. Denied traffic must get
/// nowhere, ordinary traffic must all go through.
fn traffic_mix(stage: &Stage, v4: Ipv4Addr, v6: Ipv6Addr, denied: bool) -> anyhow::Result<()> {
    for addr in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        let addr = addr.to_string();
        let checked = [
            ["connect-rate", &addr, ACCEPT_PORT, "--seconds", MIX_SECONDS],
            ["udp-rate", &addr, SINK_PORT, "--seconds", MIX_SECONDS],
        ];
        for args in checked {
            let fields = stage.traffic(&args)?;
            let (passed, failed) = (fields.number("per_s")?, fields.number("failed")?);
            let expected = if denied { passed == 0.0 } else { failed == 0.0 };
            ensure!(
                expected,
                "`{}` to a{} destination: {}",
                args.join(" "),
                if denied { " denied" } else { "n ordinary" },
                fields.line
            );
        }
        // IPv6 echoes to a denied address are dropped without an error, so
        // their outcome proves nothing either way.
        stage.traffic(&["ping-rate", &addr, "--seconds", MIX_SECONDS])?;
    }
    Ok(())
}

/// Each program's average run time, for ordinary and for denied traffic.
fn program_figures(stage: &Stage, rules: &Rules, prefix: &str) -> anyhow::Result<Vec<Row>> {
    progress(&format!(
        "{prefix} program run times from the kernel's BPF statistics ({})",
        rules.name
    ));
    let _stats = BpfStats::enable()?;
    let daemon = enforcement_on(stage, rules)?;
    let programs = attached_programs(&stage.guarded)?;
    ensure!(
        !programs.is_empty(),
        "no imds-guard program is attached to {}",
        stage.guarded.display()
    );
    let ordinary = runs_during(&programs, || {
        traffic_mix(stage, addrs::SERVER_V4, addrs::SERVER_V6, false)
    })?;
    let denied = runs_during(&programs, || {
        traffic_mix(stage, addrs::METADATA_V4, addrs::METADATA_V6, true)
    })?;
    enforcement_off(stage, daemon)?;
    let phases = [
        ("ordinary", ordinary, Target::Below(50.0, "ns")),
        ("denied", denied, Target::None),
    ];
    let mut rows = Vec::new();
    for (traffic, runs, target) in phases {
        for program in runs {
            let average = program.run_time_ns as f64 / program.runs as f64;
            let figure = format!("{prefix} {} run time, {traffic} traffic", program.name);
            let row = if program.runs == 0 {
                Row::new(figure, "did not run")
            } else {
                Row::new(figure, format!("{average:.1} ns/run")).target(target, average)
            };
            rows.push(
                row.sides("-".to_owned(), format!("{} runs", program.runs))
                    .raw(Json::object([
                        ("program", Json::Text(program.name)),
                        ("traffic", Json::Text(traffic.to_owned())),
                        ("runs", Json::Number(program.runs as f64)),
                        ("run_time_ns", Json::Number(program.run_time_ns as f64)),
                        ("average_ns", Json::Number(average)),
                    ])),
            );
        }
    }
    Ok(rows)
}

/// How long a refused connect to the metadata address takes, and what the
/// same connect does against a destination that silently drops.
fn blocked_connect_figures(stage: &Stage, rules: &Rules) -> anyhow::Result<Vec<Row>> {
    progress("5 blocked TCP connects to the metadata address");
    let metadata = addrs::METADATA_V4.to_string();
    let daemon = enforcement_on(stage, rules)?;
    let blocked = stage.traffic(&[
        "blocked-connect",
        &metadata,
        HTTP_PORT,
        "--count",
        BLOCKED_CONNECTS,
        "--seconds",
        BLOCKED_CONNECTS_MAX_SECONDS,
    ])?;
    enforcement_off(stage, daemon)?;
    let attempts = blocked.number("attempts")?;
    ensure!(
        blocked.number("refused")? == attempts && attempts == BLOCKED_CONNECTS.parse::<f64>()?,
        "not every connect to {metadata} was refused: {}",
        blocked.line
    );
    let micros = |key: &str| -> anyhow::Result<f64> { Ok(blocked.number(key)? / 1000.0) };
    let (p50, p99) = (micros("p50_ns")?, micros("p99_ns")?);
    let to = format!("{metadata}:{HTTP_PORT}");
    let mut rows = vec![
        Row::new(
            format!("5 blocked connect to {to} fails (EPERM), p50"),
            format!("{p50:.1} µs"),
        )
        .raw(blocked.to_json()),
        Row::new(
            format!("5 blocked connect to {to} fails (EPERM), p99"),
            format!("{p99:.1} µs"),
        )
        .target(Target::Below(50.0, "µs"), p99)
        .raw(blocked.to_json()),
    ];

    progress("5 the same connect against a destination that silently drops");
    let dropped = stage.traffic(&[
        "blocked-connect",
        &DROPPING_V4.to_string(),
        HTTP_PORT,
        "--count",
        "1",
        "--timeout-ms",
        PLAIN_DROP_TIMEOUT_MS,
    ])?;
    let seconds = dropped.number("p50_ns")? / 1e9;
    let result = if dropped.number("timeout")? == 1.0 {
        format!("hangs ≥ {seconds:.1} s (timeout)")
    } else {
        format!("ended after {seconds:.3} s: {}", dropped.line)
    };
    rows.push(
        Row::new(
            "5 plain drop instead (no imds-guard): the same connect".to_owned(),
            result,
        )
        .raw(dropped.to_json()),
    );
    Ok(rows)
}

/// The daemon's resident memory once it idles after starting.
fn memory_figure(stage: &Stage, rules: &Rules) -> anyhow::Result<Row> {
    progress(&format!("7 daemon memory, idle ({})", rules.name));
    let daemon = enforcement_on(stage, rules)?;
    std::thread::sleep(IDLE);
    let rss_kib = rss_kib(daemon.pid())?;
    enforcement_off(stage, daemon)?;
    Ok(Row::new(
        format!("7 daemon resident memory, idle, {}", rules.name),
        format!("{:.1} MiB", rss_kib / 1024.0),
    )
    .raw(Json::object([("vm_rss_kib", Json::Number(rss_kib))])))
}

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {status_path}"))
}

/// From spawning the daemon to its log saying it enforces, median of
/// [`STARTS`] starts.
fn start_figure(stage: &Stage, rules: &Rules) -> anyhow::Result<Row> {
    progress(&format!(
        "8 daemon start to enforcing, {STARTS} starts ({})",
        rules.name
    ));
    let args = stage.daemon_args(rules);
    let mut starts_ms = Vec::new();
    for _ in 0..STARTS {
        interrupted()?;
        let started = Instant::now();
        let daemon = Daemon::spawn(&as_strs(&args))?;
        // Polled finely here: `Daemon::start` polls every 10 ms.
        while daemon.count_log(ENFORCING) == 0 {
            ensure!(
                started.elapsed() < START_TIMEOUT,
                "imds-guard did not enforce within {START_TIMEOUT:?}:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        starts_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        enforcement_off(stage, daemon)?;
    }
    let median_ms = median(&starts_ms);
    Ok(Row::new(
        format!("8 daemon start to enforcing, median, {}", rules.name),
        format!("{median_ms:.1} ms"),
    )
    .target(Target::Below(100.0, "ms"), median_ms)
    .raw(Json::object([
        ("starts_ms", Json::numbers(&starts_ms)),
        ("median_ms", Json::Number(median_ms)),
    ])))
}

/// What a figure must reach.
#[derive(Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    Below(f64, &'static str),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::None => write!(f, "-"),
            Target::AtLeast(min) => write!(f, "≥ {min}"),
            Target::Below(max, unit) => write!(f, "< {max} {unit}"),
        }
    }
}

impl Target {
    fn met(self, value: f64) -> Option<bool> {
        match self {
            Target::None => None,
            Target::AtLeast(min) => Some(value >= min),
            Target::Below(max, _) => Some(value < max),
        }
    }
}

/// One line of the report.
struct Row {
    figure: String,
    without: String,
    with: String,
    result: String,
    target: Target,
    met: Option<bool>,
    raw: Json,
}

impl Row {
    fn new(figure: impl Into<String>, result: impl Into<String>) -> Row {
        Row {
            figure: figure.into(),
            without: "-".to_owned(),
            with: "-".to_owned(),
            result: result.into(),
            target: Target::None,
            met: None,
            raw: Json::Null,
        }
    }

    fn sides(self, without: String, with: String) -> Row {
        Row {
            without,
            with,
            ..self
        }
    }

    fn target(self, target: Target, value: f64) -> Row {
        Row {
            target,
            met: target.met(value),
            ..self
        }
    }

    fn raw(self, raw: Json) -> Row {
        Row { raw, ..self }
    }

    fn met_text(&self) -> &'static str {
        match self.met {
            None => "-",
            Some(true) => "yes",
            Some(false) => "NO",
        }
    }

    fn cells(&self) -> [String; 6] {
        [
            self.figure.clone(),
            self.without.clone(),
            self.with.clone(),
            self.result.clone(),
            self.target.to_string(),
            self.met_text().to_owned(),
        ]
    }

    fn to_json(&self) -> Json {
        let met = self.met.map_or(Json::Null, Json::Bool);
        Json::object([
            ("figure", Json::Text(self.figure.clone())),
            ("without", Json::Text(self.without.clone())),
            ("with", Json::Text(self.with.clone())),
            ("result", Json::Text(self.result.clone())),
            ("target", Json::Text(self.target.to_string())),
            ("met", met),
            ("raw", self.raw.clone()),
        ])
    }
}

/// The rows as aligned columns, with a header.
fn table(rows: &[Row]) -> String {
    let header = ["figure", "without", "with", "result", "target", "met"].map(str::to_owned);
    let lines: Vec<[String; 6]> = std::iter::once(header)
        .chain(rows.iter().map(Row::cells))
        .collect();
    let mut widths = [0usize; 6];
    for cells in &lines {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for cells in &lines {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// When and where the run happened.
struct Machine {
    date: String,
    cores: usize,
    kernel: String,
    load_before: String,
}

impl Machine {
    fn now() -> anyhow::Result<Machine> {
        Ok(Machine {
            date: imds_guard_tests::run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?
                .trim()
                .to_owned(),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            load_before: load_average(),
        })
    }
}

/// The 1, 5 and 15 minute load averages: other work on the machine
/// weighs on every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Just enough JSON for the raw numbers, without a dependency.
#[derive(Clone)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    Text(String),
    List(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn object<'a>(fields: impl IntoIterator<Item = (&'a str, Json)>) -> Json {
        Json::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect(),
        )
    }

    fn numbers(values: &[f64]) -> Json {
        Json::List(values.iter().copied().map(Json::Number).collect())
    }
}

fn write_json_text(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in text.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c if u32::from(c) < 0x20 => write!(f, "\\u{:04x}", u32::from(c))?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(value) => write!(f, "{value}"),
            Json::Number(value) if value.is_finite() => write!(f, "{value}"),
            Json::Number(_) => f.write_str("null"),
            Json::Text(text) => write_json_text(f, text),
            Json::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Json::Object(fields) => {
                f.write_str("{")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write_json_text(f, key)?;
                    write!(f, ":{value}")?;
                }
                f.write_str("}")
            }
        }
    }
}
