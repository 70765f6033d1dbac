//! The node edge guard on node-shaped sandboxes (tests/src/nodeshape.rs):
//! the real daemon runs in the sandbox's node namespace, as the hostNetwork
//! DaemonSet runs in its node's, with the DaemonSet's privileges. Every
//! route a pod has through the node to the metadata address must be closed
//! (the sniffer upstream sees nothing arrive, whatever the client saw), and
//! ordinary traffic, allowlisted pods and the node itself keep their way.

use std::net::IpAddr;

use imds_guard_tests::{
    Daemon, NodeShape, PinDir, Pod, TestCgroup,
    nodeshape::addrs::{self, node_uplink_for},
    require_root,
};

/// How long the daemon may take to attach to the node's uplinks.
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The daemon's log line once the guard is in place.
const GUARD_UPDATED: &str = "node edge guard updated";

/// A node shape with a standalone daemon in its node namespace, guarding a
/// pod cgroup subtree that lists no pod: every forwarded packet to a
/// metadata address is refused.
struct GuardedNode {
    daemon: Daemon,
    pods_cgroup: TestCgroup,
    _pins: PinDir,
    shape: NodeShape,
}

impl GuardedNode {
    fn standalone(shape: NodeShape) -> GuardedNode {
        let pods_cgroup = TestCgroup::new("guarded-pods").expect("cgroup");
        let pins = PinDir::new("node-guard");
        let mut daemon = Daemon::standalone(pods_cgroup.path(), pins.path())
            .netns(&shape.node)
            .start()
            .expect("daemon");
        daemon
            .wait_for_log(GUARD_UPDATED, ATTACH_TIMEOUT)
            .expect("the guard attaches");
        GuardedNode {
            daemon,
            pods_cgroup,
            _pins: pins,
            shape,
        }
    }
}

fn metadata_pairs() -> [(IpAddr, IpAddr); 2] {
    [
        (
            IpAddr::V4(addrs::METADATA_V4),
            IpAddr::V4(addrs::CLUSTER_IP_METADATA_V4),
        ),
        (
            IpAddr::V6(addrs::METADATA_V6),
            IpAddr::V6(addrs::CLUSTER_IP_METADATA_V6),
        ),
    ]
}

/// Every forwarded route from `pod` to the metadata address is closed:
/// direct TCP and UDP (the pod's process is in no guarded cgroup, so only
/// the node can refuse it), the Service DNATed to it, AF_PACKET raw and
/// dgram frames; both families.
fn assert_forwarded_routes_closed(shape: &NodeShape, pod: &Pod) {
    let client = pod.probe();
    for (metadata, cluster_ip) in metadata_pairs() {
        let frames = pod.packet_args(metadata);
        let timeout = ["--timeout-ms".to_owned(), "300".to_owned()];
        for attempt in [
            ("tcp", metadata, &timeout[..]),
            ("udp", metadata, &timeout[..]),
            ("tcp", cluster_ip, &timeout[..]),
            ("packet-raw", metadata, &frames[..]),
            ("packet-dgram", metadata, &frames[..]),
        ] {
            shape.assert_never_arrives(&client, attempt, metadata);
        }
    }
}

/// Ordinary destinations, directly and through a Service, both families.
fn assert_ordinary_routes_open(shape: &NodeShape, pod: &Pod) {
    let client = pod.probe();
    for (server, cluster_ip) in [
        (
            IpAddr::V4(addrs::SERVER_V4),
            IpAddr::V4(addrs::CLUSTER_IP_ORDINARY_V4),
        ),
        (
            IpAddr::V6(addrs::SERVER_V6),
            IpAddr::V6(addrs::CLUSTER_IP_ORDINARY_V6),
        ),
    ] {
        let direct = shape.source_past_node(pod, server);
        shape.assert_arrives_from(&client, ("tcp", server, &[]), server, direct);
        shape.assert_arrives_from(&client, ("udp", server, &[]), server, direct);
        shape.assert_arrives_from(
            &client,
            ("tcp", cluster_ip, &[]),
            server,
            node_uplink_for(server),
        );
    }
}

#[test]
fn routed_veth_forwarded_routes_are_closed() {
    require_root();
    let node = GuardedNode::standalone(NodeShape::routed_veth().unwrap());
    assert_forwarded_routes_closed(&node.shape, node.shape.pod());
    assert_ordinary_routes_open(&node.shape, node.shape.pod());
    let _ = &node.daemon;
    let _ = &node.pods_cgroup;
}
