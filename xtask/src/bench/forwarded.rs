//! Figure 7: what the node edge guard costs traffic the node forwards. A
//! pod of a routed node-shaped sandbox sends to an ordinary upstream
//! server through the node, without and with the guard on the node's
//! uplink (a standalone daemon in the node's namespace, as the hostNetwork
//! DaemonSet runs), round after round, in alternating order.

use imds_guard_tests::{Daemon, NodeShape, PinDir, TestCgroup, nodeshape::addrs};
use serde::Serialize;

use super::{
    ROUNDS, progress,
    report::{Row, Target, median},
    stage::{start_sink, traffic_in},
    tcp_traffic,
    traffic::{Ratio, Unit, ratios, successful_per_second},
};

/// The daemon's log line once the guard is on the uplink.
const GUARD_UPDATED: &str = "node edge guard updated uplinks=uplink";
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The sandbox: the node shape with a sink upstream, an empty guarded
/// cgroup (the pods' subtree; the traffic is forwarded, not a local
/// socket's) and the pins.
struct EdgeBench {
    _sink: imds_guard_tests::Server,
    pins: PinDir,
    guarded: TestCgroup,
    shape: NodeShape,
}

impl EdgeBench {
    fn per_second(&self, args: &[&str]) -> anyhow::Result<f64> {
        let fields = traffic_in(&self.shape.pod().netns, None, args)?;
        successful_per_second(&fields, args)
    }

    /// Measures once with the guard on the uplink, then removes it
    /// (`uninstall` in the node's namespace) so the next "without" has none.
    fn with_guard(&self, args: &[&str]) -> anyhow::Result<f64> {
        let mut daemon = Daemon::standalone(self.guarded.path(), self.pins.path())
            .netns(&self.shape.node)
            .start()?;
        daemon.wait_for_log(GUARD_UPDATED, ATTACH_TIMEOUT)?;
        let measured = self.per_second(args);
        daemon.stop()?;
        let pins = self.pins.path().display().to_string();
        Daemon::command(["uninstall", "--bpffs-dir", &pins])
            .netns(&self.shape.node)
            .run_to_end()?;
        measured
    }
}

#[derive(Serialize)]
struct ForwardedRaw {
    unit: &'static str,
    command: String,
    without: Vec<f64>,
    with: Vec<f64>,
    with_vs_without: Ratio,
}

/// Forwarded TCP bulk throughput and connect rate, with/without the guard.
pub fn figures(number: &str) -> anyhow::Result<Vec<Row>> {
    progress("building a routed node-shaped sandbox for the forwarded figures");
    let shape = NodeShape::routed_veth()?;
    let bench = EdgeBench {
        _sink: start_sink(&shape.upstream.netns)?,
        pins: PinDir::new("bench-edge"),
        guarded: TestCgroup::new("bench-edge")?,
        shape,
    };
    let server = addrs::SERVER_V4.to_string();
    let [bulk, connects] = tcp_traffic(&server);
    let mut rows = Vec::new();
    for (name, unit, args, min_ratio) in [
        (
            "TCP bulk throughput, pod to upstream through the node",
            Unit::Bytes,
            &bulk[..],
            0.99,
        ),
        (
            "TCP connect-and-close rate, pod to upstream through the node",
            Unit::Calls,
            &connects[..],
            0.97,
        ),
    ] {
        let figure = format!("{number} forwarded {name}");
        progress(&format!(
            "{figure}: {ROUNDS} rounds without and with the node edge guard"
        ));
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Alternate which goes first, so a drift weighs on both alike.
            if round % 2 == 0 {
                without.push(bench.per_second(args)?);
                with.push(bench.with_guard(args)?);
            } else {
                with.push(bench.with_guard(args)?);
                without.push(bench.per_second(args)?);
            }
        }
        let ratio = Ratio::new(ratios(&with, &without));
        let [low, high] = ratio.quartiles;
        rows.push(
            Row::new(&figure, ratio.show())
                .sides(unit.show(median(&without)), unit.show(median(&with)))
                .target_bracketed(Target::AtLeast(min_ratio), ratio.median, low, high)
                .raw(ForwardedRaw {
                    unit: unit.name(),
                    command: args.join(" "),
                    without,
                    with,
                    with_vs_without: ratio,
                })?,
        );
    }
    Ok(rows)
}
