//! `cargo xtask bench`: what imds-guard costs. Each cost is a ratio
//! against the same traffic without imds-guard, and against the floor
//! (allow-at-once programs on the same hooks) and the peer (nftables
//! `socket cgroupv2` rules with the same lists), measured side by side in
//! the same run, round after round, between the sandbox's network
//! namespaces over the veth pair. The traffic comes from a cgroup under the
//! protected one that is not allowlisted, so it runs under enforcement.
//! Only the blocked-connect figure targets the metadata address: our own
//! fake one, inside the sandbox.
//!
//! `stage` sets up and turns enforcement, the floor and the peer on and
//! off (`floor`, `peer`); `traffic`, `programs`, `daemon`, `forwarded`
//! (the node edge guard) and `kubernetes` measure; `report` prints and writes what they found.

mod daemon;
mod floor;
mod forwarded;
mod kubernetes;
mod peer;
mod programs;
mod report;
mod stage;
mod traffic;

use std::{path::Path, time::Instant};

use anyhow::{Context as _, bail};
use imds_guard_tests::addrs;

use self::{
    report::{Machine, Report, Row, chart, load_average, table},
    stage::{ACCEPT_PORT, BenchStage, SCALE, SINK_PORT, Scale},
    traffic::{LocalTraffic, Unit, ratio_figure},
};
use crate::{build_release, interrupt::catch_interrupts, is_root, setup, target_dir};

/// Figure 10's points: deny rules growing at a small allow list, then
/// allow entries growing at the smallest deny list (the daemon's two
/// defaults: the bench always denies both metadata families).
const SCALING: [Scale; 5] = [
    Scale { deny: 2, allow: 10 },
    Scale {
        deny: 100,
        allow: 10,
    },
    Scale {
        deny: 1000,
        allow: 10,
    },
    Scale {
        deny: 2,
        allow: 1000,
    },
    Scale {
        deny: 2,
        allow: 10_000,
    },
];

/// Rounds of "without" and "with" per ratio figure: many short ones, since
/// other work on a small machine comes in bursts, and a burst then spoils
/// one round's ratio instead of moving the median.
const ROUNDS: usize = 10;
const BULK_SECONDS: &str = "1.5";
const RATE_SECONDS: &str = "1";

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
    // The daemons run as root here, as in the README's runs, not with the
    // DaemonSet's grant: with it aya loads the programs nameless (its name
    // probe needs CAP_PERFMON), which the kernel's own listings then show.
    if std::env::var_os("IMDS_GUARD_TEST_CAPS").is_none() {
        // SAFETY: still single-threaded.
        unsafe { std::env::set_var("IMDS_GUARD_TEST_CAPS", "all") };
    }
    catch_interrupts()?;

    let started = Instant::now();
    let machine = Machine::now()?;
    let stage = BenchStage::new()?;
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
    if let Some(figures) = wanted_figures() {
        println!(
            "only figures {} (IMDS_GUARD_BENCH_FIGURES)",
            figures.join(", ")
        );
    }
    println!();
    print!("{}", table(&rows));
    println!();
    print!("{}", chart(&rows));
    let missed = rows.iter().filter(|r| r.missed()).count();
    let noise = rows.iter().filter(|r| r.within_noise).count();
    println!();
    println!("targets missed: {missed}, missed within noise: {noise}");

    let out_dir = target_dir(root)?.join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join("bench.json");
    Report {
        date: &machine.date,
        cores: machine.cores,
        kernel: &machine.kernel,
        load_average_before: &machine.load_before,
        load_average_after: &load_after,
        rounds: ROUNDS,
        wall_seconds: wall.as_secs_f64(),
        rows: &rows,
    }
    .write(&json_path)?;
    println!("raw numbers: {}", json_path.display());
    Ok(())
}

/// `imds-bench-traffic` arguments for TCP bulk throughput to the sink on
/// `server`, and for TCP connects to its accepting port.
fn tcp_traffic(server: &str) -> [[&str; 5]; 2] {
    [
        ["bulk", server, SINK_PORT, "--seconds", BULK_SECONDS],
        [
            "connect-rate",
            server,
            ACCEPT_PORT,
            "--seconds",
            RATE_SECONDS,
        ],
    ]
}

/// Every figure, in order; with `IMDS_GUARD_BENCH_FIGURES` (say `4,9`) only
/// those, for work on one of them (a partial run says so in its table).
fn measure(stage: &BenchStage) -> anyhow::Result<Vec<Row>> {
    let wanted = wanted_figures();
    let wants = |figure: &str| {
        wanted
            .as_ref()
            .is_none_or(|list| list.iter().any(|f| f == figure))
    };
    let default = stage.default_rules()?;
    let scale = stage.rules(SCALE)?;
    let server = addrs::SERVER_V4.to_string();
    let [bulk, connects] = tcp_traffic(&server);
    let datagrams = ["udp-rate", &server, SINK_PORT, "--seconds", RATE_SECONDS];
    let traffic: [(&str, Unit, &[&str]); 3] = [
        ("TCP bulk throughput, client to server", Unit::Bytes, &bulk),
        ("TCP connect-and-close rate", Unit::Calls, &connects),
        (
            "UDP sendto rate, 16-byte datagrams",
            Unit::Calls,
            &datagrams,
        ),
    ];
    let at_default = LocalTraffic {
        stage,
        rules: &default,
    };
    let at_scale = LocalTraffic {
        stage,
        rules: &scale,
    };

    let mut rows = Vec::new();
    for (number, (name, unit, args)) in ["1", "2", "3"].into_iter().zip(traffic) {
        if wants(number) {
            rows.push(ratio_figure(
                &at_default,
                &format!("{number} {name}"),
                unit,
                args,
            )?);
        }
    }
    if wants("4") {
        rows.extend(programs::figures(stage, &default, "4")?);
    }
    if wants("5") {
        rows.extend(traffic::blocked_connect_figures(stage, &default)?);
    }
    if wants("6") {
        for (name, unit, args) in traffic {
            rows.push(ratio_figure(
                &at_scale,
                &format!("6 {name}, {SCALE}"),
                unit,
                args,
            )?);
        }
        rows.extend(programs::figures(stage, &scale, "6 at scale:")?);
    }
    if wants("7") {
        for rules in [&default, &scale] {
            rows.push(daemon::memory_figure(stage, rules)?);
        }
        rows.extend(kubernetes::figures()?);
    }
    if wants("8") {
        for rules in [&default, &scale] {
            rows.push(daemon::start_figure(stage, rules)?);
        }
    }
    if wants("9") {
        rows.extend(forwarded::figures("9", [&default, &scale])?);
    }
    if wants("10") {
        let scales = SCALING
            .iter()
            .map(|&scale| stage.rules(scale))
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.extend(programs::scaling_figures(stage, &scales, "10")?);
    }
    Ok(rows)
}

/// The figure numbers `IMDS_GUARD_BENCH_FIGURES` names, if set.
fn wanted_figures() -> Option<Vec<String>> {
    let list = std::env::var("IMDS_GUARD_BENCH_FIGURES").ok()?;
    Some(
        list.split(',')
            .map(|figure| figure.trim().to_owned())
            .collect(),
    )
}

fn progress(what: &str) {
    println!("bench: {what}");
}
