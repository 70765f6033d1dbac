//! Figures 7 and 8 for standalone mode: the daemon's resident memory once
//! it idles, and the time from spawning it to its programs enforcing.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use imds_guard_tests::daemon::ENFORCING;
use serde::Serialize;

use super::{
    progress,
    report::{Row, Target, median},
    stage::{BenchStage, Rules},
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

#[derive(Serialize)]
struct StartRaw {
    starts_ms: Vec<f64>,
    median_ms: f64,
}

/// From spawning the daemon to its log saying it enforces, median of
/// [`STARTS`] starts.
pub fn start_figure(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Row> {
    progress(&format!(
        "8 daemon start to enforcing, {STARTS} starts ({})",
        rules.name
    ));
    let mut starts_ms = Vec::new();
    for _ in 0..STARTS {
        interrupted()?;
        let started = Instant::now();
        let daemon = stage.daemon(rules).spawn()?;
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
        stage.enforcement_off(daemon)?;
    }
    let median_ms = median(&starts_ms);
    Row::new(
        format!("8 daemon start to enforcing, median, {}", rules.name),
        format!("{median_ms:.1} ms"),
    )
    .target(Target::Below(100.0, "ms"), median_ms)
    .raw(StartRaw {
        starts_ms,
        median_ms,
    })
}
