//! Figures 1 to 3 and 6's ratios (the same traffic without and with
//! enforcement, round after round) and figure 5 (how a refused connect
//! ends, against how a silently dropped one does).

use anyhow::ensure;
use imds_guard_tests::addrs;
use serde::Serialize;

use super::{
    ROUNDS, progress,
    report::{Row, Target, median, quantile},
    stage::{BenchStage, DROPPING_V4, Rules},
};

/// A pause before each measurement, so "with" is measured on a daemon that
/// has finished starting, and "without" on one that has finished stopping.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
/// What a metadata client would connect to.
const HTTP_PORT: &str = "80";
const BLOCKED_CONNECTS: &str = "1000";
/// Bounds the blocked connects, which take microseconds each.
const BLOCKED_CONNECTS_MAX_SECONDS: &str = "60";
const PLAIN_DROP_TIMEOUT_MS: &str = "3000";

#[derive(Clone, Copy)]
pub enum Unit {
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

/// The successful calls (or bytes) per second of one client run, which must
/// have had no failed call.
fn per_second(stage: &BenchStage, args: &[&str]) -> anyhow::Result<f64> {
    let fields = stage.traffic(args)?;
    if let Some(failed) = fields.text("failed") {
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
fn side_by_side(stage: &BenchStage, rules: &Rules, args: &[&str]) -> anyhow::Result<Paired> {
    let mut paired = Paired::default();
    for round in 0..ROUNDS {
        let with_first = round % 2 == 1;
        for enforced in [with_first, !with_first] {
            if enforced {
                let daemon = stage.enforcement_on(rules)?;
                std::thread::sleep(SETTLE);
                paired.with.push(per_second(stage, args)?);
                stage.enforcement_off(daemon)?;
            } else {
                std::thread::sleep(SETTLE);
                paired.without.push(per_second(stage, args)?);
            }
        }
    }
    Ok(paired)
}

/// The numbers behind a ratio figure.
#[derive(Serialize)]
struct RatioRaw {
    unit: &'static str,
    command: String,
    without: Vec<f64>,
    with: Vec<f64>,
    ratios: Vec<f64>,
    ratio: f64,
    ratio_quartiles: [f64; 2],
}

/// A ratio figure: medians of each side, and the median of the rounds'
/// with/without ratios against `min_ratio`, with the middle half of those
/// ratios in brackets to show how much the machine's noise moves them.
pub fn ratio_figure(
    stage: &BenchStage,
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
    Row::new(figure, format!("{ratio:.3} [{low:.3}–{high:.3}]"))
        .sides(
            unit.show(median(&paired.without)),
            unit.show(median(&paired.with)),
        )
        .target(Target::AtLeast(min_ratio), ratio)
        .raw(RatioRaw {
            unit: unit.name(),
            command: args.join(" "),
            without: paired.without,
            with: paired.with,
            ratios,
            ratio,
            ratio_quartiles: [low, high],
        })
}

/// How long a refused connect to the metadata address takes, and what the
/// same connect does against a destination that silently drops.
pub fn blocked_connect_figures(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Vec<Row>> {
    progress("5 blocked TCP connects to the metadata address");
    let metadata = addrs::METADATA_V4.to_string();
    let daemon = stage.enforcement_on(rules)?;
    let blocked = stage.traffic(&[
        "blocked-connect",
        &metadata,
        HTTP_PORT,
        "--count",
        BLOCKED_CONNECTS,
        "--seconds",
        BLOCKED_CONNECTS_MAX_SECONDS,
    ])?;
    stage.enforcement_off(daemon)?;
    let attempts = blocked.count("attempts")?;
    ensure!(
        blocked.count("refused")? == attempts && attempts == BLOCKED_CONNECTS.parse::<u64>()?,
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
        .raw(blocked.to_json())?,
        Row::new(
            format!("5 blocked connect to {to} fails (EPERM), p99"),
            format!("{p99:.1} µs"),
        )
        .target(Target::Below(50.0, "µs"), p99)
        .raw(blocked.to_json())?,
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
    let result = if dropped.count("timeout")? == 1 {
        format!("hangs ≥ {seconds:.1} s (timeout)")
    } else {
        format!("ended after {seconds:.3} s: {}", dropped.line)
    };
    rows.push(
        Row::new(
            "5 plain drop instead (no imds-guard): the same connect",
            result,
        )
        .raw(dropped.to_json())?,
    );
    Ok(rows)
}
