//! Figure 9: what the node edge guard costs traffic the node forwards. A
//! pod of a routed node-shaped sandbox sends to an ordinary upstream
//! server through the node, on the four sides of every ratio figure: no
//! guard, the floor (a no-verdict tc program on the uplink), the peer
//! (nftables in the node's forward hook, as an iptables-based CNI's
//! network policies) and the guard on the uplink (a standalone daemon in the
//! node's namespace, as the hostNetwork DaemonSet runs).

use imds_guard_tests::{Daemon, NodeShape, PinDir, TestCgroup, nodeshape::addrs};

use super::{
    floor::Floor,
    peer::{self, Judged, Peer},
    progress,
    report::Row,
    stage::{Rules, start_sink, traffic_in},
    tcp_traffic,
    traffic::{Arena, Side, Unit, ratio_figure, successful_per_second},
};

/// The node's interface to upstream, in the routed shape.
const UPLINK: &str = "uplink";
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

/// The edge bench under one set of deny rules.
struct Forwarded<'a> {
    bench: &'a EdgeBench,
    rules: &'a Rules,
    peer_ruleset: String,
}

impl Forwarded<'_> {
    fn per_second(&self, args: &[&str]) -> anyhow::Result<f64> {
        let fields = traffic_in(&self.bench.shape.pod().netns, None, args)?;
        successful_per_second(&fields, args)
    }

    /// Measures once with the guard on the uplink, then removes it
    /// (`uninstall` in the node's namespace) so the next side has none.
    fn with_guard(&self, args: &[&str]) -> anyhow::Result<f64> {
        let bench = self.bench;
        let deny: Vec<&str> = self.rules.deny_args.iter().map(String::as_str).collect();
        let mut daemon = Daemon::standalone(bench.guarded.path(), bench.pins.path())
            .args(&deny)
            .netns(&bench.shape.node)
            .start()?;
        daemon.wait_for_log(GUARD_UPDATED, ATTACH_TIMEOUT)?;
        let measured = self.per_second(args);
        daemon.stop()?;
        let pins = bench.pins.path().display().to_string();
        Daemon::command(["uninstall", "--bpffs-dir", &pins])
            .netns(&bench.shape.node)
            .run_to_end()?;
        measured
    }
}

impl Arena for Forwarded<'_> {
    fn measure(&self, side: Side, args: &[&str]) -> anyhow::Result<f64> {
        let node = &self.bench.shape.node;
        match side {
            Side::Without => self.per_second(args),
            Side::Floor => {
                let _floor = Floor::attach_uplink(node, UPLINK)?;
                self.per_second(args)
            }
            Side::Peer => {
                let _peer = Peer::apply(node, &self.peer_ruleset)?;
                self.per_second(args)
            }
            Side::With => self.with_guard(args),
        }
    }
}

/// Forwarded TCP bulk throughput and connect rate under each of `rules`.
pub fn figures(number: &str, rules: [&Rules; 2]) -> anyhow::Result<Vec<Row>> {
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
    for rules in rules {
        let arena = Forwarded {
            bench: &bench,
            rules,
            peer_ruleset: peer::ruleset(&Judged::Forwarded { uplink: UPLINK }, &rules.deny)?,
        };
        // The forwarded traffic meets the deny rules only: allow entries
        // are local cgroups'.
        let deny_count = rules.deny.len();
        for (name, unit, args) in [
            (
                "TCP bulk throughput, pod to upstream through the node",
                Unit::Bytes,
                &bulk[..],
            ),
            (
                "TCP connect-and-close rate, pod to upstream through the node",
                Unit::Calls,
                &connects[..],
            ),
        ] {
            let figure = format!("{number} forwarded {name}, {deny_count} deny rules");
            rows.push(ratio_figure(&arena, &figure, unit, args)?);
        }
    }
    Ok(rows)
}
