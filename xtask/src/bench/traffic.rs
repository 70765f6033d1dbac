//! Figures 1 to 3 and 6's ratios (the same traffic without enforcement,
//! under the floor, under the peer and with imds-guard, round after round)
//! and figure 5 (how a refused connect ends, with imds-guard and with the
//! peer's reject rule, against how a silently dropped one does).

use anyhow::ensure;
use imds_guard_tests::addrs;
use serde::Serialize;

use super::{
    ROUNDS, progress,
    report::{Row, Target, median, quantile},
    stage::{BenchStage, DROPPING_V4, Fields, Rules},
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
    pub fn show(self, per_second: f64) -> String {
        match self {
            Unit::Bytes => format!("{:.2} Gbit/s", per_second * 8.0 / 1e9),
            Unit::Calls => format!("{per_second:.0}/s"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes/s",
            Unit::Calls => "calls/s",
        }
    }
}

/// A client run's successful calls (or bytes) per second; it must have
/// had no failed call.
pub fn successful_per_second(fields: &Fields, args: &[&str]) -> anyhow::Result<f64> {
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

/// What a figure's traffic runs under.
#[derive(Clone, Copy)]
pub enum Side {
    Without,
    /// Allow-at-once programs on the same hooks.
    Floor,
    /// The nftables rules a user would deploy instead.
    Peer,
    With,
}

const SIDES: [Side; 4] = [Side::Without, Side::Floor, Side::Peer, Side::With];

/// One figure's samples on each side, one of each a round.
#[derive(Default)]
struct Samples {
    without: Vec<f64>,
    floor: Vec<f64>,
    peer: Vec<f64>,
    with: Vec<f64>,
}

/// Each round's `top / bottom`.
pub fn ratios(top: &[f64], bottom: &[f64]) -> Vec<f64> {
    top.iter()
        .zip(bottom)
        .map(|(top, bottom)| top / bottom)
        .collect()
}

/// Where a ratio figure's traffic runs: a client, and how each side is
/// turned on and off around it.
pub trait Arena {
    /// The successful calls (or bytes) per second of one run of the
    /// traffic client with `args`, with `side` on, which is off again after.
    fn measure(&self, side: Side, args: &[&str]) -> anyhow::Result<f64>;
}

/// Traffic from the stage's client, under rules enforced on its cgroup.
pub struct LocalTraffic<'a> {
    pub stage: &'a BenchStage,
    pub rules: &'a Rules,
}

impl Arena for LocalTraffic<'_> {
    fn measure(&self, side: Side, args: &[&str]) -> anyhow::Result<f64> {
        let (stage, rules) = (self.stage, self.rules);
        let measure = || successful_per_second(&stage.traffic(args)?, args);
        match side {
            Side::Without => measure(),
            Side::Floor => {
                let _floor = stage.floor_on()?;
                measure()
            }
            Side::Peer => {
                let _peer = stage.peer_on(rules)?;
                measure()
            }
            Side::With => {
                let daemon = stage.enforcement_on(rules)?;
                let measured = measure();
                stage.enforcement_off(daemon)?;
                measured
            }
        }
    }
}

/// Measures `args` on every side, [`ROUNDS`] times. The order rotates
/// every round, so each side takes each place in turn and a drift in the
/// machine's speed weighs on all alike.
fn side_by_side(arena: &impl Arena, args: &[&str]) -> anyhow::Result<Samples> {
    let mut samples = Samples::default();
    for round in 0..ROUNDS {
        for place in 0..SIDES.len() {
            let side = SIDES[(round + place) % SIDES.len()];
            std::thread::sleep(SETTLE);
            let measured = arena.measure(side, args)?;
            match side {
                Side::Without => samples.without.push(measured),
                Side::Floor => samples.floor.push(measured),
                Side::Peer => samples.peer.push(measured),
                Side::With => samples.with.push(measured),
            }
        }
    }
    Ok(samples)
}

/// The median of some rounds' ratios, and the middle half of them.
#[derive(Serialize)]
pub struct Ratio {
    pub ratios: Vec<f64>,
    pub median: f64,
    pub quartiles: [f64; 2],
}

impl Ratio {
    pub fn new(ratios: Vec<f64>) -> Ratio {
        let median = median(&ratios);
        let quartiles = [quantile(&ratios, 0.25), quantile(&ratios, 0.75)];
        Ratio {
            ratios,
            median,
            quartiles,
        }
    }

    pub fn show(&self) -> String {
        let [low, high] = self.quartiles;
        format!("{:.3} [{low:.3}–{high:.3}]", self.median)
    }
}

/// The numbers behind a ratio figure.
#[derive(Serialize)]
struct RatioRaw {
    unit: &'static str,
    command: String,
    without: Vec<f64>,
    floor: Vec<f64>,
    peer: Vec<f64>,
    with: Vec<f64>,
    with_vs_without: Ratio,
    with_vs_floor: Ratio,
    with_vs_peer: Ratio,
    peer_vs_without: Ratio,
}

/// How close to the floor every traffic figure must be (the "within 3%")...
const MIN_VS_FLOOR: f64 = 0.97;
/// ...and that it must be at least as good as the peer.
const MIN_VS_PEER: f64 = 1.0;

/// A ratio figure: medians of each side, and the medians of the rounds'
/// ratios (with/without, with/floor, with/peer, peer/without), with the
/// middle half of each in brackets to show how much the machine's noise
/// moves them. Judged on with/floor and with/peer.
pub fn ratio_figure(
    arena: &impl Arena,
    figure: &str,
    unit: Unit,
    args: &[&str],
) -> anyhow::Result<Row> {
    progress(&format!(
        "{figure}: {ROUNDS} rounds without, floor, peer and with"
    ));
    let samples = side_by_side(arena, args)?;
    let with_vs_without = Ratio::new(ratios(&samples.with, &samples.without));
    let with_vs_floor = Ratio::new(ratios(&samples.with, &samples.floor));
    let with_vs_peer = Ratio::new(ratios(&samples.with, &samples.peer));
    let peer_vs_without = Ratio::new(ratios(&samples.peer, &samples.without));
    let floor_vs_without = median(&ratios(&samples.floor, &samples.without));
    Row::new(figure, with_vs_without.show())
        .charted(
            floor_vs_without,
            with_vs_without.median,
            peer_vs_without.median,
        )
        .sides(
            unit.show(median(&samples.without)),
            unit.show(median(&samples.with)),
        )
        .others(
            unit.show(median(&samples.floor)),
            unit.show(median(&samples.peer)),
        )
        .ratios(
            with_vs_floor.show(),
            with_vs_peer.show(),
            peer_vs_without.show(),
        )
        .target_bracketed(
            "with/floor",
            Target::AtLeast(MIN_VS_FLOOR),
            with_vs_floor.median,
            with_vs_floor.quartiles,
        )
        .target_bracketed(
            "with/peer",
            Target::AtLeast(MIN_VS_PEER),
            with_vs_peer.median,
            with_vs_peer.quartiles,
        )
        .raw(RatioRaw {
            unit: unit.name(),
            command: args.join(" "),
            without: samples.without,
            floor: samples.floor,
            peer: samples.peer,
            with: samples.with,
            with_vs_without,
            with_vs_floor,
            with_vs_peer,
            peer_vs_without,
        })
}

/// [`BLOCKED_CONNECTS`] connects to the metadata address, every one of
/// which must fail with the outcome `expected` counts (`refused` for EPERM,
/// `reset` for ECONNREFUSED).
fn blocked_connects(stage: &BenchStage, expected: &str) -> anyhow::Result<Fields> {
    let metadata = addrs::METADATA_V4.to_string();
    let blocked = stage.traffic(&[
        "blocked-connect",
        &metadata,
        HTTP_PORT,
        "--count",
        BLOCKED_CONNECTS,
        "--seconds",
        BLOCKED_CONNECTS_MAX_SECONDS,
    ])?;
    let attempts = blocked.count("attempts")?;
    ensure!(
        blocked.count(expected)? == attempts && attempts == BLOCKED_CONNECTS.parse::<u64>()?,
        "not every connect to {metadata} ended {expected}: {}",
        blocked.line
    );
    Ok(blocked)
}

/// The numbers behind a blocked-connect row.
#[derive(Serialize)]
struct BlockedRaw {
    with: serde_json::Value,
    peer: serde_json::Value,
}

/// How long a refused connect to the metadata address takes, with
/// imds-guard and with the peer's reject rule, and what the same connect
/// does against a destination that silently drops.
pub fn blocked_connect_figures(stage: &BenchStage, rules: &Rules) -> anyhow::Result<Vec<Row>> {
    progress("5 blocked TCP connects to the metadata address");
    let daemon = stage.enforcement_on(rules)?;
    let blocked = blocked_connects(stage, "refused")?;
    stage.enforcement_off(daemon)?;
    let peer = stage.peer_on(rules)?;
    let reset = blocked_connects(stage, "reset")?;
    drop(peer);
    let micros =
        |fields: &Fields, key: &str| -> anyhow::Result<f64> { Ok(fields.number(key)? / 1000.0) };
    let to = format!("{}:{HTTP_PORT}", addrs::METADATA_V4);
    let mut rows = Vec::new();
    for (quantile, key) in [("p50", "p50_ns"), ("p99", "p99_ns")] {
        let (ours, theirs) = (micros(&blocked, key)?, micros(&reset, key)?);
        let row = Row::new(
            format!("5 blocked connect to {to} fails (EPERM; peer: reset), {quantile}"),
            format!("{ours:.1} µs"),
        )
        .others("-".to_owned(), format!("{theirs:.1} µs"));
        let row = if quantile == "p99" {
            row.target(Target::Below(50.0, "µs"), ours)
        } else {
            row
        };
        rows.push(row.raw(BlockedRaw {
            with: blocked.to_json(),
            peer: reset.to_json(),
        })?);
    }

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
            "5 plain drop instead (no imds-guard, as behind a drop rule): the same connect",
            result,
        )
        .raw(dropped.to_json())?,
    );
    Ok(rows)
}
