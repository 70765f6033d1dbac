//! The node-shaped sandboxes themselves (tests/src/nodeshape.rs): each route
//! a pod has through the node is measured by the sniffer in the upstream
//! namespace, not only by what the client saw. No enforcer runs here, so the
//! routes to the metadata address are open: these checks prove the
//! topology is real, and the node edge guard's tests invert the metadata
//! ones.

use std::net::IpAddr;

use imds_guard_tests::{
    NodeShape, Outcome, Pod,
    nodeshape::{
        VXLAN_IF,
        addrs::{self, node_uplink_for},
        link_rx_packets,
    },
    require_root,
};

/// As `assert_arrives_from`, with the source SNAT gives: the node's uplink.
fn assert_forwarded_and_snated(
    shape: &NodeShape,
    pod: &Pod,
    attempt: (&str, IpAddr, &[String]),
    seen_at: IpAddr,
) {
    let client = pod.probe();
    shape.assert_arrives_from(&client, attempt, seen_at, node_uplink_for(seen_at));
}

/// The routes the node edge guard must close, measured open: direct TCP,
/// the Service whose endpoint is the metadata address, `AF_PACKET` raw and
/// dgram frames; both families.
fn assert_metadata_routes_open(shape: &NodeShape, pod: &Pod) {
    for (metadata, cluster_ip) in addrs::METADATA_SERVICES {
        let direct = shape.source_past_node(pod, metadata);
        let client = pod.probe();
        shape.assert_arrives_from(&client, ("tcp", metadata, &[]), metadata, direct);
        assert_forwarded_and_snated(shape, pod, ("tcp", cluster_ip, &[]), metadata);
        let frames = pod.packet_args(metadata);
        for action in ["packet-raw", "packet-dgram"] {
            shape.assert_arrives_from(&client, (action, metadata, &frames), metadata, direct);
        }
    }
}

#[test]
fn routed_veth_shape_forwards_nats_and_dnats() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    shape.assert_ordinary_routes(shape.pod());
}

#[test]
fn routed_veth_shape_has_open_metadata_routes() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    assert_metadata_routes_open(&shape, shape.pod());
}

/// The redirect program's shape: pod traffic to anything but a Service
/// arrives upstream with the pod's source (it bypassed the node's
/// masquerade, so netfilter never saw it), Services still go through
/// netfilter's DNAT and SNAT.
#[test]
fn redirect_shape_bypasses_netfilter_but_dnats_services() {
    require_root();
    let shape = NodeShape::redirect_past_netfilter().unwrap();
    shape.assert_ordinary_routes(shape.pod());
}

#[test]
fn redirect_shape_has_open_metadata_routes() {
    require_root();
    let shape = NodeShape::redirect_past_netfilter().unwrap();
    assert_metadata_routes_open(&shape, shape.pod());
}

#[test]
fn bridge_vxlan_shape_forwards_nats_and_dnats() {
    require_root();
    let shape = NodeShape::bridge_vxlan().unwrap();
    for pod in &shape.pods {
        shape.assert_ordinary_routes(pod);
    }
}

#[test]
fn bridge_vxlan_shape_has_open_metadata_routes() {
    require_root();
    let shape = NodeShape::bridge_vxlan().unwrap();
    assert_metadata_routes_open(&shape, shape.pod());
}

/// A plain UDP datagram to the node's flannel port, carrying an inner
/// packet to the metadata address (IPv4 or IPv6), is decapsulated by
/// flannel.1 and forwarded; the reply comes back to the pod's socket. With
/// the inner source spoofed (here: the other pod's address) it still
/// arrives upstream, and the reply goes to the spoofed pod, not the sender.
#[test]
fn bridge_vxlan_shape_decapsulates_to_metadata() {
    require_root();
    let shape = NodeShape::bridge_vxlan().unwrap();
    let (pod, other) = (&shape.pods[0], &shape.pods[1]);
    for metadata in [
        IpAddr::V4(addrs::METADATA_V4),
        IpAddr::V6(addrs::METADATA_V6),
    ] {
        let decapsulated_before = link_rx_packets(&shape.node, VXLAN_IF).unwrap();
        let own = shape.vxlan_args(pod, metadata, None).unwrap();
        assert_forwarded_and_snated(&shape, pod, ("vxlan", metadata, &own), metadata);
        assert!(
            link_rx_packets(&shape.node, VXLAN_IF).unwrap() > decapsulated_before,
            "the datagram to {metadata} did not come out of {VXLAN_IF}"
        );

        let spoofed = other.addr_for(metadata);
        let mut args = shape.vxlan_args(pod, metadata, Some(spoofed)).unwrap();
        args.extend(["--timeout-ms".to_owned(), "300".to_owned()]);
        let (outcome, from_node, from_anyone) = shape.attempt(
            &pod.probe(),
            ("vxlan", metadata, &args),
            metadata,
            node_uplink_for(metadata),
        );
        assert!(
            from_node > 0,
            "the inner packet from {spoofed} did not arrive at {metadata}"
        );
        assert_eq!(
            from_node, from_anyone,
            "the inner packet from {spoofed} was not SNATed"
        );
        assert_eq!(
            outcome,
            Outcome::TimedOut,
            "the reply to the spoofed {spoofed} came back to the sender"
        );
    }
}

/// A hostNetwork pod's `AF_PACKET` frames on the node's uplink, with and
/// without `PACKET_QDISC_BYPASS`, reach the metadata address from the
/// node's address (which the frame carries itself).
#[test]
fn host_network_packet_frames_reach_metadata() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    let probe = shape.host_network_probe();
    for metadata in [
        IpAddr::V4(addrs::METADATA_V4),
        IpAddr::V6(addrs::METADATA_V6),
    ] {
        let frames = shape.host_network_packet_args(metadata).unwrap();
        let bypass: Vec<String> = frames
            .iter()
            .cloned()
            .chain(["--qdisc-bypass".to_owned()])
            .collect();
        for (action, args) in [
            ("packet-raw", &frames),
            ("packet-dgram", &frames),
            ("packet-raw", &bypass),
            ("packet-dgram", &bypass),
        ] {
            let source = node_uplink_for(metadata);
            shape.assert_arrives_from(&probe, (action, metadata, args), metadata, source);
        }
    }
}
