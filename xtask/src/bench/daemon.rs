//! Figures 7 and 8 for standalone mode: the daemon's resident memory once
//! it idles, and the time from spawning it to its programs enforcing, as
//! traffic shows it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use imds_guard_tests::{
    addrs::METADATA_V4,
    daemon::ENFORCING,
    monotonic_ns,
    probe::{binary, spawn_in},
};
use serde::Serialize;

use super::{
    progress,
    report::{Row, Target, median},
    stage::{BenchStage, Fields, Rules},
};
use crate::interrupt::interrupted;

/// Daemon starts per start-time figure.
const STARTS: usize = 7;
/// How long the daemon may take to start enforcing.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon idles before its memory is read.
const IDLE: Duration = Duration::from_secs(1);

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {status_path}"))
}

#[derive(Serialize)]
struct MemoryRaw {
    vm_rss_kib: f64,
}

/// The daemon's resident memory once it idles after starting.
pub fn memory_figure(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Row> {
    progress(&format!("7 daemon memory, idle ({})", rules.name));
    let daemon = stage.enforcement_on(rules)?;
    std::thread::sleep(IDLE);
    let vm_rss_kib = rss_kib(daemon.pid())?;
    stage.enforcement_off(daemon)?;
    Row::new(
        format!("7 daemon resident memory, idle, {}", rules.name),
        format!("{:.1} MiB", vm_rss_kib / 1024.0),
    )
    .raw(MemoryRaw { vm_rss_kib })
}

/// The start probes' connects: bounded (a connect in flight while the
/// egress program is attached but the connect hook not yet loses its SYN,
/// and would hang until this), and paced so that the probes take little of
/// the CPU the daemon starts on (the figure's resolution).
const PROBE_TIMEOUT_MS: &str = "2";
const PROBE_PAUSE_US: &str = "500";

/// From spawning the daemon to the first moment it enforces, median of
/// [`STARTS`] starts: a connect from the stage's blocked cgroup to the fake
/// metadata server is refused (the deny rules are attached), and after that
/// one from the rules' last allowlisted cgroup reaches it (every allow
/// entry is in). Also the time to the log line saying it enforces.
pub fn start_figure(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Row> {
    progress(&format!(
        "8 daemon start to enforcing, {STARTS} starts ({})",
        rules.name
    ));
    let mut starts_ms = Vec::new();
    let mut log_line_ms = Vec::new();
    let mut refused_ms = Vec::new();
    let mut probes = Vec::new();
    for _ in 0..STARTS {
        interrupted()?;
        let start = time_start(stage, rules)?;
        starts_ms.push(start.enforcing_ms);
        log_line_ms.push(start.log_line_ms);
        refused_ms.push(start.refused_ms);
        probes.push(start.probes);
    }
    let median_ms = median(&starts_ms);
    let log_line_median_ms = median(&log_line_ms);
    Row::new(
        format!(
            "8 daemon start to enforcing, by traffic, median, {}",
            rules.name
        ),
        format!("{median_ms:.1} ms (log line {log_line_median_ms:.1} ms)"),
    )
    .target(Target::Below(100.0, "ms"), median_ms)
    .raw(StartRaw {
        starts_ms,
        median_ms,
        log_line_ms,
        log_line_median_ms,
        refused_ms,
        probes,
    })
}

#[derive(Serialize)]
struct StartRaw {
    /// Per start: to enforcing as traffic shows it...
    starts_ms: Vec<f64>,
    median_ms: f64,
    /// ...and to the log line saying so...
    log_line_ms: Vec<f64>,
    log_line_median_ms: f64,
    /// ...and to the blocked cgroup's first refusal; what the probes said.
    refused_ms: Vec<f64>,
    probes: Vec<[String; 2]>,
}

/// One start's times from spawning the daemon, in ms.
struct StartTimes {
    enforcing_ms: f64,
    log_line_ms: f64,
    refused_ms: f64,
    probes: [String; 2],
}

/// Starts the daemon once, with the probes watching, and stops it. One
/// probe connects from the blocked cgroup until it is refused; the other
/// waits in the last allowlisted cgroup until told, then connects until it
/// reaches the server (a process moving between cgroups would wait for an
/// RCU grace period, which would be timed).
fn time_start(stage: &BenchStage, rules: &Rules) -> anyhow::Result<StartTimes> {
    let mut reached = Probe::spawn(stage, "until-reached", &rules.last_allowed)?;
    let mut refused = Probe::spawn(stage, "until-refused", &stage.stage.blocked)?;
    // Nothing enforces before the daemon is spawned, so the figure cannot
    // be met by what an earlier start left behind.
    let open = refused.line()?;
    ensure!(
        open == "open",
        "the blocked cgroup did not reach the metadata server before the start: {open:?}"
    );
    let spawned = monotonic_ns()?;
    let daemon = stage.daemon(rules).spawn()?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut log_line = None;
    let mut refused_at = None;
    let (reached_at, log_line, refused_at) = loop {
        if log_line.is_none() && daemon.count_log(ENFORCING) > 0 {
            log_line = Some(monotonic_ns()?);
        }
        if refused_at.is_none()
            && let Some(fields) = refused.finished()?
        {
            refused_at = Some(fields.count("refused_ns")?);
            reached.go()?;
        }
        // `reached` was told to go only once `refused_at` was set.
        if let (Some(fields), Some(log_line), Some(refused_at)) =
            (reached.finished()?, log_line, refused_at)
        {
            break (fields.count("reached_ns")?, log_line, refused_at);
        }
        ensure!(
            Instant::now() < deadline,
            "imds-guard did not enforce within {START_TIMEOUT:?} (refused: {refused_at:?}):\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    stage.enforcement_off(daemon)?;
    ensure!(
        refused_at > spawned,
        "the blocked cgroup was refused before imds-guard was spawned"
    );
    let ms_after_spawn =
        |ns: u64| Duration::from_nanos(ns.saturating_sub(spawned)).as_secs_f64() * 1000.0;
    Ok(StartTimes {
        enforcing_ms: ms_after_spawn(reached_at),
        log_line_ms: ms_after_spawn(log_line),
        refused_ms: ms_after_spawn(refused_at),
        probes: [refused.printed(), reached.printed()],
    })
}

/// `imds-bench-traffic COMMAND` toward the fake metadata server, in the
/// client namespace and `cgroup`; killed on drop.
struct Probe {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// What it printed when it ended.
    ended: Option<Fields>,
}

impl Probe {
    fn spawn(stage: &BenchStage, command: &str, cgroup: &Path) -> anyhow::Result<Probe> {
        let metadata = METADATA_V4.to_string();
        let seconds = START_TIMEOUT.as_secs().to_string();
        let mut probe = Command::new(binary("imds-bench-traffic")?);
        probe
            .args([command, &metadata, "80", "--timeout-ms", PROBE_TIMEOUT_MS])
            .args(["--pause-us", PROBE_PAUSE_US, "--seconds", &seconds])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_in(&mut probe, &stage.stage.sandbox.client, Some(cgroup))?;
        let stdout = child.stdout.take().context("a probe's stdout")?;
        Ok(Probe {
            child,
            stdout: BufReader::new(stdout),
            ended: None,
        })
    }

    /// The next line it prints (empty once it has ended).
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("reading a probe")?;
        if line.is_empty() {
            return Err(self.failure());
        }
        Ok(line.trim().to_owned())
    }

    /// Tells it to begin.
    fn go(&mut self) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("a probe's stdin")?;
        stdin.write_all(b"go\n").context("telling a probe to begin")
    }

    /// What it printed, once it has ended well.
    fn finished(&mut self) -> anyhow::Result<Option<&Fields>> {
        if self.ended.is_none() {
            let Some(status) = self.child.try_wait().context("a probe")? else {
                return Ok(None);
            };
            if !status.success() {
                return Err(self.failure());
            }
            let mut rest = String::new();
            self.stdout
                .read_to_string(&mut rest)
                .context("reading a probe")?;
            self.ended = Some(Fields::parse(&rest)?);
        }
        Ok(self.ended.as_ref())
    }

    /// Its last line, for bench.json.
    fn printed(&self) -> String {
        self.ended
            .as_ref()
            .map(|fields| fields.line.clone())
            .unwrap_or_default()
    }

    /// Why it ended without its line.
    fn failure(&mut self) -> anyhow::Error {
        let status = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        anyhow::anyhow!("a probe failed ({status:?}): {}", stderr.trim())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
