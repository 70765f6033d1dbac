//! The node-shaped sandboxes themselves (tests/src/nodeshape.rs): each route
//! a pod has through the node is measured by the sniffer in the upstream
//! namespace, not only by what the client saw. No enforcer runs here, so the
//! routes to the metadata address are open: these checks prove the
//! topology is real, and the node edge guard's tests invert the metadata
//! ones.

use std::net::IpAddr;

use imds_guard_tests::{
    NodeShape, Outcome, Pod, Probe, Shape,
    nodeshape::{
        VXLAN_IF,
        addrs::{self, node_uplink_for},
        link_rx_packets,
    },
    require_root,
};

const PORT: u16 = addrs::SERVICE_PORT;

/// Makes one attempt from `client` and returns the packets upstream saw
/// arrive at `seen_at` from `source` and from anyone, during it.
fn attempt(
    shape: &NodeShape,
    client: &Probe,
    (action, target, extra): (&str, IpAddr, &[String]),
    seen_at: IpAddr,
    source: IpAddr,
) -> (Outcome, u64, u64) {
    let upstream = &shape.upstream;
    let counts = || {
        (
            upstream.packets(Some(source), seen_at).unwrap(),
            upstream.packets(None, seen_at).unwrap(),
        )
    };
    let before = counts();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let result = client.attempt(action, target, PORT, &extra).unwrap();
    let after = counts();
    (result.outcome, after.0 - before.0, after.1 - before.1)
}

/// The attempt reached the server at `seen_at` through the node: the client
/// got its echo, and upstream saw packets from `source` only (the node's
/// uplink address after SNAT; the pod's own where netfilter is bypassed).
fn assert_arrives_from(
    shape: &NodeShape,
    client: &Probe,
    (action, target, extra): (&str, IpAddr, &[String]),
    seen_at: IpAddr,
    source: IpAddr,
) {
    let (outcome, from_source, from_anyone) =
        attempt(shape, client, (action, target, extra), seen_at, source);
    assert_eq!(
        outcome,
        Outcome::Reached,
        "{action} {target} {extra:?} from {}",
        client.netns.name()
    );
    assert!(
        from_source > 0,
        "{action} {target}: upstream saw nothing from {source} arrive at {seen_at}: {:?}",
        shape.upstream.flows().unwrap()
    );
    assert_eq!(
        from_source,
        from_anyone,
        "{action} {target}: packets arrived at {seen_at} from other sources than {source}: {:?}",
        shape.upstream.flows().unwrap()
    );
}

/// As `assert_arrives_from`, with the source SNAT gives: the node's uplink.
fn assert_forwarded_and_snated(
    shape: &NodeShape,
    pod: &Pod,
    attempt: (&str, IpAddr, &[String]),
    seen_at: IpAddr,
) {
    let client = pod.probe();
    assert_arrives_from(shape, &client, attempt, seen_at, node_uplink_for(seen_at));
}

/// The source upstream sees for the pod's traffic to `dest` that is no
/// Service: the node's uplink after its masquerade, or, where the redirect
/// program hands it to the uplink past netfilter, the pod's own.
fn source_past_node(shape: &NodeShape, pod: &Pod, dest: IpAddr) -> IpAddr {
    if shape.shape == Shape::RedirectPastNetfilter {
        pod.addr_for(dest)
    } else {
        node_uplink_for(dest)
    }
}

/// Ordinary traffic and the ordinary Service, both families, from `pod`.
fn assert_ordinary_routes(shape: &NodeShape, pod: &Pod) {
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
        let direct = source_past_node(shape, pod, server);
        let client = pod.probe();
        assert_arrives_from(shape, &client, ("tcp", server, &[]), server, direct);
        assert_arrives_from(shape, &client, ("udp", server, &[]), server, direct);
        assert_forwarded_and_snated(shape, pod, ("tcp", cluster_ip, &[]), server);
        // DNAT happened on the node: the ClusterIP never left it.
        assert_eq!(
            shape.upstream.packets(None, cluster_ip).unwrap(),
            0,
            "a ClusterIP reached upstream"
        );
    }
}

/// The routes the node edge guard must close, measured open: direct TCP,
/// the Service whose endpoint is the metadata address, `AF_PACKET` raw and
/// dgram frames; both families.
fn assert_metadata_routes_open(shape: &NodeShape, pod: &Pod) {
    for (metadata, cluster_ip) in [
        (
            IpAddr::V4(addrs::METADATA_V4),
            IpAddr::V4(addrs::CLUSTER_IP_METADATA_V4),
        ),
        (
            IpAddr::V6(addrs::METADATA_V6),
            IpAddr::V6(addrs::CLUSTER_IP_METADATA_V6),
        ),
    ] {
        let direct = source_past_node(shape, pod, metadata);
        let client = pod.probe();
        assert_arrives_from(shape, &client, ("tcp", metadata, &[]), metadata, direct);
        assert_forwarded_and_snated(shape, pod, ("tcp", cluster_ip, &[]), metadata);
        let frames = pod.packet_args(metadata);
        for action in ["packet-raw", "packet-dgram"] {
            assert_arrives_from(
                shape,
                &client,
                (action, metadata, &frames),
                metadata,
                direct,
            );
        }
    }
}

#[test]
fn routed_veth_shape_forwards_nats_and_dnats() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    assert_ordinary_routes(&shape, shape.pod());
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
    assert_ordinary_routes(&shape, shape.pod());
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
        assert_ordinary_routes(&shape, pod);
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
        let (outcome, from_node, from_anyone) = attempt(
            &shape,
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
            assert_arrives_from(&shape, &probe, (action, metadata, args), metadata, source);
        }
    }
}
