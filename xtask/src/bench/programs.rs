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
    ROUNDS, progress,
    report::{Row, Target, median, quantile},
    stage::{ACCEPT_PORT, BenchStage, Rules, SINK_PORT},
};

/// Each step of the traffic behind the program-cost figures: short, as
/// there are [`ROUNDS`] of them on each side.
const MIX_SECONDS: &str = "0.3";
/// The most a program may add to the floor's run time, per run.
const MAX_OVER_FLOOR_NS: f64 = 20.0;

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

/// One round of the program-cost phases: the floor's programs and ours
/// under ordinary traffic, ours under denied traffic.
struct Round {
    floor: Vec<ProgramRuns>,
    ordinary: Vec<ProgramRuns>,
    denied: Vec<ProgramRuns>,
}

/// [`ROUNDS`] rounds of the floor's and our programs' run times, which
/// goes first alternating, so a drift in the machine weighs on both alike.
fn rounds(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Vec<Round>> {
    let stats = Stats::enable()?;
    let floor_runs = || -> anyhow::Result<Vec<ProgramRuns>> {
        let floor = stage.floor_on()?;
        runs_during(&floor.programs, "ordinary", || {
            traffic_mix(stage, addrs::SERVER_V4, addrs::SERVER_V6, false)
        })
    };
    let our_runs = || -> anyhow::Result<[Vec<ProgramRuns>; 2]> {
        let daemon = stage.enforcement_on(rules)?;
        let programs = pinned(stage.stage.pins.path())?;
        let ordinary = runs_during(&programs, "ordinary", || {
            traffic_mix(stage, addrs::SERVER_V4, addrs::SERVER_V6, false)
        })?;
        let denied = runs_during(&programs, "denied", || {
            traffic_mix(stage, addrs::METADATA_V4, addrs::METADATA_V6, true)
        })?;
        stage.enforcement_off(daemon)?;
        Ok([ordinary, denied])
    };
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let (floor, [ordinary, denied]) = if round % 2 == 0 {
            let floor = floor_runs()?;
            (floor, our_runs()?)
        } else {
            let ours = our_runs()?;
            (floor_runs()?, ours)
        };
        rounds.push(Round {
            floor,
            ordinary,
            denied,
        });
    }
    drop(stats);
    Ok(rounds)
}

/// One program's figures across the rounds: each round's average run time
/// (ours, the floor's, ours over the floor's; and under denied traffic).
#[derive(Serialize)]
struct ProgramCost {
    program: &'static str,
    ordinary_ns: Vec<f64>,
    floor_ns: Vec<f64>,
    over_floor_ns: Vec<f64>,
    denied_ns: Vec<f64>,
    runs: [u64; 3],
}

impl ProgramCost {
    /// The median run time over the floor's, and the middle half of the rounds'.
    fn over_floor(&self) -> (f64, [f64; 2]) {
        let over = &self.over_floor_ns;
        (median(over), [quantile(over, 0.25), quantile(over, 0.75)])
    }
}

/// Each program's cost across `rounds`, in [`PROGRAMS`]' order. A round in
/// which a program did not run has no average and leaves no number.
fn costs(rounds: &[Round]) -> anyhow::Result<Vec<ProgramCost>> {
    PROGRAMS
        .iter()
        .map(|&name| {
            let mut cost = ProgramCost {
                program: name,
                ordinary_ns: Vec::new(),
                floor_ns: Vec::new(),
                over_floor_ns: Vec::new(),
                denied_ns: Vec::new(),
                runs: [0; 3],
            };
            for round in rounds {
                let find = |runs: &[ProgramRuns]| -> anyhow::Result<(f64, u64)> {
                    let found = runs
                        .iter()
                        .find(|runs| runs.program == name)
                        .with_context(|| format!("no runs of {name}"))?;
                    Ok((found.average_ns, found.runs))
                };
                let [(ordinary, ran), (floor, floor_ran), (denied, denied_ran)] = [
                    find(&round.ordinary)?,
                    find(&round.floor)?,
                    find(&round.denied)?,
                ];
                if ran > 0 && floor_ran > 0 {
                    cost.ordinary_ns.push(ordinary);
                    cost.floor_ns.push(floor);
                    cost.over_floor_ns.push(ordinary - floor);
                }
                if denied_ran > 0 {
                    cost.denied_ns.push(denied);
                }
                cost.runs[0] += ran;
                cost.runs[1] += floor_ran;
                cost.runs[2] += denied_ran;
            }
            ensure!(
                !cost.over_floor_ns.is_empty() && !cost.denied_ns.is_empty(),
                "{name} never ran on both sides of a round"
            );
            Ok(cost)
        })
        .collect()
}

/// Each program's median run time per run for ordinary traffic, against
/// the floor's (the same traffic through the allow-at-once programs on the
/// same hooks, timed the same way: the kernel's timing, two clock reads a
/// run, is in both and cancels), and for denied traffic.
pub fn figures(stage: &BenchStage, rules: &Rules, prefix: &str) -> anyhow::Result<Vec<Row>> {
    progress(&format!(
        "{prefix} program run times from the kernel's BPF statistics, {ROUNDS} rounds ({})",
        rules.name
    ));
    let costs = costs(&rounds(stage, rules)?)?;
    let mut rows = Vec::new();
    for cost in &costs {
        let (over, bracket) = cost.over_floor();
        let [low, high] = bracket;
        let shown = |ns: &[f64], runs: u64| format!("{runs} runs, {:.1} ns", median(ns));
        rows.push(
            Row::new(
                format!("{prefix} {} run time, ordinary traffic", cost.program),
                format!(
                    "{:.1} ns/run, {over:.1} [{low:.1}–{high:.1}] over the floor",
                    median(&cost.ordinary_ns)
                ),
            )
            .sides("-".to_owned(), shown(&cost.ordinary_ns, cost.runs[0]))
            .others(shown(&cost.floor_ns, cost.runs[1]), "-".to_owned())
            .target_bracketed("", Target::Below(MAX_OVER_FLOOR_NS, "ns"), over, bracket)
            .raw(cost)?,
        );
    }
    for cost in &costs {
        rows.push(
            Row::new(
                format!("{prefix} {} run time, denied traffic", cost.program),
                format!("{:.1} ns/run", median(&cost.denied_ns)),
            )
            .sides("-".to_owned(), format!("{} runs", cost.runs[2])),
        );
    }
    Ok(rows)
}

/// How the programs' cost moves with the rules' size: for each of
/// `scales`, every program's median run time over the floor's under
/// ordinary traffic (judged on the worst) and its run time under denied
/// traffic, each in one row.
pub fn scaling_figures(
    stage: &BenchStage,
    scales: &[Rules],
    number: &str,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for rules in scales {
        progress(&format!(
            "{number} program run times, {ROUNDS} rounds ({})",
            rules.name
        ));
        let costs = costs(&rounds(stage, rules)?)?;
        let listed = |value: &dyn Fn(&ProgramCost) -> f64| -> String {
            costs
                .iter()
                .map(|cost| {
                    format!(
                        "{} {:.1}",
                        cost.program.trim_start_matches("imds_guard_"),
                        value(cost)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let worst = |pick: &dyn Fn(&ProgramCost) -> f64| {
            costs.iter().map(pick).fold(f64::NEG_INFINITY, f64::max)
        };
        let over = worst(&|cost| cost.over_floor().0);
        let bracket = [
            worst(&|cost| cost.over_floor().1[0]),
            worst(&|cost| cost.over_floor().1[1]),
        ];
        rows.push(
            Row::new(
                format!(
                    "{number} {}: ns over the floor, ordinary traffic (worst program)",
                    rules.name
                ),
                format!("{} ns", listed(&|cost| cost.over_floor().0)),
            )
            .target_bracketed(
                "worst",
                Target::Below(MAX_OVER_FLOOR_NS, "ns"),
                over,
                bracket,
            )
            .raw(&costs)?,
        );
        rows.push(Row::new(
            format!("{number} {}: ns per run, denied traffic", rules.name),
            format!("{} ns", listed(&|cost| median(&cost.denied_ns))),
        ));
    }
    Ok(rows)
}
