//! Figures 4 and 6's per-program rows: each program's average run time
//! from the kernel's BPF statistics (aya's `enable_stats` and
//! `loaded_programs`), for ordinary and for denied traffic. Our programs
//! are found through the links the daemon pins, by program id, so their
//! names need not be known to the kernel.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    path::Path,
};

use anyhow::{Context as _, ensure};
use aya::programs::links::{FdLink, PinnedLink};
use enforcer_common::names::PROGRAMS;
use imds_guard_tests::addrs;
use serde::Serialize;

use super::{
    progress,
    report::{Row, Target},
    stage::{ACCEPT_PORT, BenchStage, Rules, SINK_PORT},
};

/// Each step of the traffic behind the program-cost figures.
const MIX_SECONDS: &str = "1";

/// One of our programs, as the kernel knows it.
#[derive(Clone, Debug)]
pub struct Program {
    pub name: &'static str,
    pub id: u32,
}

/// The programs behind the links pinned under `pins` (one generation: the
/// benchmark's daemons start on an empty pin directory).
pub fn pinned(pins: &Path) -> anyhow::Result<Vec<Program>> {
    let mut generations = std::fs::read_dir(pins)
        .with_context(|| format!("reading {}", pins.display()))?
        .flatten()
        .map(|entry| entry.path());
    let generation = generations
        .next()
        .with_context(|| format!("no generation pinned under {}", pins.display()))?;
    ensure!(
        generations.next().is_none(),
        "more than one generation pinned under {}",
        pins.display()
    );
    PROGRAMS
        .iter()
        .map(|&name| {
            let pin = generation.join(format!("link-{name}"));
            let link = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening the link pinned at {}", pin.display()))?;
            // Dropping the opened link closes only our descriptor: the pin keeps it.
            let id = FdLink::from(link)
                .info()
                .with_context(|| format!("describing the link pinned at {}", pin.display()))?
                .program_id();
            Ok(Program { name, id })
        })
        .collect()
}

/// Those of `programs` the kernel still holds. A program that cannot be
/// described while being listed is going away, and counts as gone.
pub fn still_loaded(programs: &[Program]) -> Vec<Program> {
    let loaded: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| info.id())
        .collect();
    programs
        .iter()
        .filter(|program| loaded.contains(&program.id))
        .cloned()
        .collect()
}

/// Each program's total run time (ns) and run count so far, in the order given.
fn run_totals(programs: &[Program]) -> anyhow::Result<Vec<(u64, u64)>> {
    let infos: Vec<aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .collect();
    programs
        .iter()
        .map(|program| {
            let info = infos
                .iter()
                .find(|info| info.id() == program.id)
                .with_context(|| format!("{} (id {}) is not loaded", program.name, program.id))?;
            let nanos = u64::try_from(info.run_time().as_nanos())?;
            Ok((nanos, info.run_count()))
        })
        .collect()
}

/// One program's runs, and the time they took, during a phase of traffic.
#[derive(Serialize)]
struct ProgramRuns {
    program: &'static str,
    traffic: &'static str,
    runs: u64,
    run_time_ns: u64,
    average_ns: f64,
}

fn runs_during(
    programs: &[Program],
    traffic: &'static str,
    phase: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<ProgramRuns>> {
    let before = run_totals(programs)?;
    phase()?;
    let after = run_totals(programs)?;
    Ok(programs
        .iter()
        .zip(before.into_iter().zip(after))
        .map(
            |(program, ((time_before, runs_before), (time_after, runs_after)))| {
                let runs = runs_after.saturating_sub(runs_before);
                let run_time_ns = time_after.saturating_sub(time_before);
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "an average: nanoseconds and runs well below 2^52"
                )]
                let average_ns = run_time_ns as f64 / runs as f64;
                ProgramRuns {
                    program: program.name,
                    traffic,
                    runs,
                    run_time_ns,
                    average_ns,
                }
            },
        )
        .collect())
}

/// The kernel's run-time statistics, on while this lives: it times programs
/// only then, and the timing costs every BPF program on the machine a
/// little, so it stays off for the ratio figures. The kernel turns it off
/// when the last such descriptor closes, also when we crash.
struct Stats {
    _enabled: OwnedFd,
}

impl Stats {
    fn enable() -> anyhow::Result<Stats> {
        let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF run-time statistics")?;
        Ok(Stats { _enabled: enabled })
    }
}

/// The traffic behind the program-cost figures: TCP connects, unconnected
/// UDP sends and ICMP echoes (which only the packet hook sees), over IPv4
/// and IPv6, so each of the five programs runs. Denied traffic must get
/// nowhere, ordinary traffic must all go through.
fn traffic_mix(stage: &BenchStage, v4: Ipv4Addr, v6: Ipv6Addr, denied: bool) -> anyhow::Result<()> {
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

/// Each program's average run time, for ordinary and for denied traffic,
/// and for ordinary traffic over the floor's: the same traffic through the
/// allow-at-once programs on the same hooks, timed the same way (the
/// kernel's timing, two clock reads a run, is in both and cancels).
pub fn figures(stage: &BenchStage, rules: &Rules, prefix: &str) -> anyhow::Result<Vec<Row>> {
    progress(&format!(
        "{prefix} program run times from the kernel's BPF statistics ({})",
        rules.name
    ));
    let stats = Stats::enable()?;
    let floor = stage.floor_on()?;
    let floor_runs = runs_during(&floor.programs, "ordinary", || {
        traffic_mix(stage, addrs::SERVER_V4, addrs::SERVER_V6, false)
    })?;
    drop(floor);
    let daemon = stage.enforcement_on(rules)?;
    let programs = pinned(stage.stage.pins.path())?;
    let ordinary = runs_during(&programs, "ordinary", || {
        traffic_mix(stage, addrs::SERVER_V4, addrs::SERVER_V6, false)
    })?;
    let denied = runs_during(&programs, "denied", || {
        traffic_mix(stage, addrs::METADATA_V4, addrs::METADATA_V6, true)
    })?;
    stage.enforcement_off(daemon)?;
    drop(stats);
    let mut rows = Vec::new();
    for program in ordinary {
        let figure = format!("{prefix} {} run time, ordinary traffic", program.program);
        let floor = floor_runs
            .iter()
            .find(|floor| floor.program == program.program)
            .with_context(|| format!("no floor program for {}", program.program))?;
        let row = if program.runs == 0 || floor.runs == 0 {
            Row::new(figure, "did not run")
        } else {
            let over = program.average_ns - floor.average_ns;
            Row::new(
                figure,
                format!("{:.1} ns/run, {over:.1} over the floor", program.average_ns),
            )
            .target(Target::Below(20.0, "ns"), over)
        };
        let shown = |runs: &ProgramRuns| format!("{} runs, {:.1} ns", runs.runs, runs.average_ns);
        let row = row
            .sides("-".to_owned(), shown(&program))
            .others(shown(floor), "-".to_owned());
        rows.push(row.raw(FloorRuns {
            with: &program,
            floor,
        })?);
    }
    for program in denied {
        let figure = format!("{prefix} {} run time, denied traffic", program.program);
        let row = if program.runs == 0 {
            Row::new(figure, "did not run")
        } else {
            Row::new(figure, format!("{:.1} ns/run", program.average_ns))
        };
        let with = format!("{} runs", program.runs);
        rows.push(row.sides("-".to_owned(), with).raw(program)?);
    }
    Ok(rows)
}

/// The numbers behind an ordinary-traffic run-time row.
#[derive(Serialize)]
struct FloorRuns<'a> {
    with: &'a ProgramRuns,
    floor: &'a ProgramRuns,
}
