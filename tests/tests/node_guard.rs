//! The node edge guard on node-shaped sandboxes (tests/src/nodeshape.rs):
//! the real daemon runs in the sandbox's node namespace, as the hostNetwork
//! DaemonSet runs in its node's, with the DaemonSet's privileges. Every
//! route a pod has through the node to the metadata address must be closed
//! (the sniffer upstream sees nothing arrive, whatever the client saw), and
//! ordinary traffic, allowlisted pods and the node itself keep their way.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use imds_guard_tests::{
    Daemon, NodeShape, Outcome, PinDir, Pod, TempFile, TestCgroup,
    apiserver::FakeApiServer,
    nodeshape::addrs::{self, node_uplink_for},
    pods::{self, Driver, TestPod},
    require_root,
};

/// How long the daemon may take to attach to the node's uplinks.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon's log line once the guard is in place.
const GUARD_UPDATED: &str = "node edge guard updated";

/// A node shape with a standalone daemon in its node namespace, guarding a
/// pod cgroup subtree that lists no pod: every forwarded packet to a
/// metadata address is refused.
struct GuardedNode {
    daemon: Daemon,
    _pods_cgroup: TestCgroup,
    pins: PinDir,
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
            _pods_cgroup: pods_cgroup,
            pins,
            shape,
        }
    }
}

/// Every forwarded route from `pod` to the metadata address is closed:
/// direct TCP and UDP (the pod's process is in no guarded cgroup, so only
/// the node can refuse it), the Service translated to it, `AF_PACKET` raw and
/// dgram frames; both families.
fn assert_forwarded_routes_closed(shape: &NodeShape, pod: &Pod) {
    let client = pod.probe();
    for (metadata, cluster_ip) in addrs::METADATA_SERVICES {
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

#[test]
fn routed_veth_forwarded_routes_are_closed() {
    require_root();
    let mut node = GuardedNode::standalone(NodeShape::routed_veth().unwrap());
    assert_forwarded_routes_closed(&node.shape, node.shape.pod());
    node.shape.assert_ordinary_routes(node.shape.pod());
    // Reported like the socket hooks' refusals, by the pod's interface.
    node.daemon
        .wait_for_log("hook=\"forward\"", ATTACH_TIMEOUT)
        .expect("the refusal is logged");
    assert!(
        node.daemon
            .log()
            .contains("forwarded, entered the node on interface"),
        "{}",
        node.daemon.log()
    );
}

#[test]
fn redirect_past_netfilter_forwarded_routes_are_closed() {
    require_root();
    let node = GuardedNode::standalone(NodeShape::redirect_past_netfilter().unwrap());
    assert_forwarded_routes_closed(&node.shape, node.shape.pod());
    node.shape.assert_ordinary_routes(node.shape.pod());
}

/// Both pods of the bridge, and the overlay: a VXLAN datagram to the
/// node's flannel port whose inner packet goes to the metadata address,
/// with the sender's own inner source and with the other pod's.
#[test]
fn bridge_vxlan_forwarded_and_decapsulated_routes_are_closed() {
    require_root();
    let node = GuardedNode::standalone(NodeShape::bridge_vxlan().unwrap());
    let shape = &node.shape;
    for pod in &shape.pods {
        assert_forwarded_routes_closed(shape, pod);
        shape.assert_ordinary_routes(pod);
    }
    let (pod, other) = (&shape.pods[0], &shape.pods[1]);
    for (metadata, _) in addrs::METADATA_SERVICES {
        for inner_source in [None, Some(other.addr_for(metadata))] {
            let mut args = shape.vxlan_args(pod, metadata, inner_source).unwrap();
            args.extend(["--timeout-ms".to_owned(), "300".to_owned()]);
            shape.assert_never_arrives(&pod.probe(), ("vxlan", metadata, &args), metadata);
        }
    }
}

const NODE: &str = "node-1";
const DRIVER: Driver = Driver::Systemd;

/// A node shape with the API server and a Kubernetes-mode daemon in its
/// node namespace (the API server too: a hostNetwork daemon reaches it
/// from the node's namespace, and ours may only talk on loopback there).
struct KubeNode {
    daemon: Daemon,
    api: FakeApiServer,
    root: TestCgroup,
    kubeconfig: TempFile,
    pins: PinDir,
    shape: NodeShape,
}

impl KubeNode {
    /// `pods` with their pods' addresses and whether they carry the allow
    /// label; `kube-system` permits the label, `team` does not.
    fn start(shape: NodeShape, pods: &[(&TestPod, bool)]) -> KubeNode {
        // A hostNetwork daemon reaches the API server from the node's
        // namespace; ours listens on loopback there.
        let api = shape
            .node
            .run_inside(|| FakeApiServer::start().expect("API server"))
            .expect("API server in the node's namespace");
        let mut root = TestCgroup::new("node").expect("cgroup root");
        root.child(DRIVER.base()).expect("pod base");
        pods::populate(&api, &mut root, NODE, DRIVER, pods, true);
        let kubeconfig = TempFile::new("kubeconfig", &api.kubeconfig()).expect("kubeconfig");
        let pins = PinDir::new("node-guard-k8s");
        let mut daemon = Daemon::kubernetes(NODE, root.path(), pins.path(), kubeconfig.path())
            .netns(&shape.node)
            .args(["--http-listen", "127.0.0.1:0"])
            .start()
            .expect("imds-guard run starts");
        daemon
            .wait_for_log("synced with the API server", ATTACH_TIMEOUT)
            .expect("first sync");
        KubeNode {
            daemon,
            api,
            root,
            kubeconfig,
            pins,
            shape,
        }
    }

    fn cgroup_of(&self, pod: &TestPod) -> PathBuf {
        self.root.path().join(pod.container_dir(DRIVER))
    }

    /// Waits until the guard lets `count` pod interfaces through.
    fn wait_for_allowed_interfaces(&mut self, count: usize) {
        let needle = format!("allowed_interfaces={count} ");
        let started = Instant::now();
        while !self
            .daemon
            .log()
            .lines()
            .rev()
            .find(|l| l.contains(GUARD_UPDATED))
            .is_some_and(|l| l.contains(&needle))
        {
            assert!(
                started.elapsed() < ATTACH_TIMEOUT,
                "the guard never let {count} interfaces through:\n{}",
                self.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test pod living in `pod`'s namespace, with its addresses.
fn test_pod(index: u32, name: &str, ns: &str, pod: &Pod) -> TestPod {
    let mut test_pod = TestPod::on(NODE, index, name, ns);
    test_pod.pod_ips = vec![pod.v4.into(), pod.v6.into()];
    test_pod
}

/// An allowlisted pod reaches the metadata server through the node from
/// its own cgroup: directly, through the Service, with `AF_PACKET` frames.
fn assert_allowed_routes_open(node: &KubeNode, pod: &Pod, cgroup: &std::path::Path) {
    let shape = &node.shape;
    let client = pod.probe_in(cgroup);
    for (metadata, cluster_ip) in addrs::METADATA_SERVICES {
        let direct = shape.source_past_node(pod, metadata);
        shape.assert_arrives_from(&client, ("tcp", metadata, &[]), metadata, direct);
        shape.assert_arrives_from(
            &client,
            ("tcp", cluster_ip, &[]),
            metadata,
            node_uplink_for(metadata),
        );
        let frames = pod.packet_args(metadata);
        shape.assert_arrives_from(&client, ("packet-raw", metadata, &frames), metadata, direct);
    }
}

/// A blocked pod in its own cgroup: its sockets are refused at the call,
/// the Service and its frames are dropped at the node.
fn assert_blocked(node: &KubeNode, pod: &Pod, cgroup: &std::path::Path) {
    let shape = &node.shape;
    let client = pod.probe_in(cgroup);
    for (metadata, cluster_ip) in addrs::METADATA_SERVICES {
        let outcome = shape.assert_never_arrives(&client, ("tcp", metadata, &[]), metadata);
        assert_eq!(outcome, Outcome::Refused("EPERM".to_owned()));
        let timeout = ["--timeout-ms".to_owned(), "300".to_owned()];
        shape.assert_never_arrives(&client, ("tcp", cluster_ip, &timeout), metadata);
        let frames = pod.packet_args(metadata);
        shape.assert_never_arrives(&client, ("packet-raw", metadata, &frames), metadata);
    }
}

/// Routed veth: the allowlisted pod's veth is let through, and only while
/// the pod stays allowlisted.
#[test]
fn routed_veth_lets_allowlisted_pods_through_while_listed() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    let agent = test_pod(1, "agent", "kube-system", shape.pod());
    let mut node = KubeNode::start(shape, &[(&agent, true)]);
    node.wait_for_allowed_interfaces(1);
    let cgroup = node.cgroup_of(&agent);
    assert_allowed_routes_open(&node, node.shape.pod(), &cgroup);

    node.api
        .apply_pod(agent.object(false))
        .expect("label removed");
    node.wait_for_allowed_interfaces(0);
    assert_blocked(&node, node.shape.pod(), &cgroup);
}

/// Bridge: the allowlisted pod's port marks its packets; the blocked pod
/// on the same bridge gets nothing, also when it writes the allowlisted
/// pod's address into its frames, or into a VXLAN datagram's inner packet.
#[test]
fn bridge_lets_only_the_allowlisted_pods_port_through() {
    require_root();
    let shape = NodeShape::bridge_vxlan().unwrap();
    let agent = test_pod(1, "agent", "kube-system", &shape.pods[0]);
    let plain = test_pod(2, "plain", "kube-system", &shape.pods[1]);
    let mut node = KubeNode::start(shape, &[(&agent, true), (&plain, false)]);
    node.wait_for_allowed_interfaces(1);
    let (allowed, blocked) = (&node.shape.pods[0], &node.shape.pods[1]);
    assert_allowed_routes_open(&node, allowed, &node.cgroup_of(&agent));
    let cgroup = node.cgroup_of(&plain);
    assert_blocked(&node, blocked, &cgroup);
    let shape = &node.shape;
    let client = blocked.probe_in(&cgroup);
    for (metadata, _) in addrs::METADATA_SERVICES {
        let spoofed = blocked.packet_args_from(allowed.addr_for(metadata));
        shape.assert_never_arrives(&client, ("packet-raw", metadata, &spoofed), metadata);
        let mut args = shape
            .vxlan_args(blocked, metadata, Some(allowed.addr_for(metadata)))
            .unwrap();
        args.extend(["--timeout-ms".to_owned(), "300".to_owned()]);
        shape.assert_never_arrives(&client, ("vxlan", metadata, &args), metadata);
    }
}

/// The node itself (a process in no pod cgroup) still reaches the metadata
/// server; a hostNetwork pod's `AF_PACKET` frames through the uplink's qdisc
/// do not. With `PACKET_QDISC_BYPASS` they skip tc: the route stays open
/// without the bpf LSM, and the daemon says so on /metrics.
#[test]
fn host_network_frames_are_judged_by_their_socket_cgroup() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    let mut host = TestPod::on(NODE, 3, "host-agent", "team");
    host.host_network = true;
    let mut node = KubeNode::start(shape, &[(&host, false)]);
    node.wait_for_allowed_interfaces(0);
    let shape = &node.shape;
    let cgroup = node.cgroup_of(&host);
    let pod_client = imds_guard_tests::Probe {
        netns: &shape.node,
        cgroup: Some(&cgroup),
    };
    for (metadata, _) in addrs::METADATA_SERVICES {
        let node_source = node_uplink_for(metadata);
        shape.assert_arrives_from(
            &shape.host_network_probe(),
            ("tcp", metadata, &[]),
            metadata,
            node_source,
        );
        let frames = shape.host_network_packet_args(metadata).unwrap();
        for action in ["packet-raw", "packet-dgram"] {
            shape.assert_never_arrives(&pod_client, (action, metadata, &frames), metadata);
        }
        let bypass: Vec<String> = frames
            .iter()
            .cloned()
            .chain(["--qdisc-bypass".to_owned()])
            .collect();
        shape.assert_arrives_from(
            &pod_client,
            ("packet-raw", metadata, &bypass),
            metadata,
            node_source,
        );
    }
    let daemon = &mut node.daemon;
    let guarded = node
        .shape
        .node
        .run_inside(|| {
            ["host_packet_socket", "host_packet_qdisc_bypass"].map(|route| {
                daemon.metric(&format!("imds_guard_route_guarded{{route=\"{route}\"}}"))
            })
        })
        .unwrap()
        .map(Result::unwrap);
    assert!(
        (guarded[0] - 1.0).abs() < f64::EPSILON && guarded[1].abs() < f64::EPSILON,
        "route_guarded: {guarded:?}"
    );
}

/// The guard outlives the daemon (a stopped daemon leaves it attached, as
/// it leaves the cgroup programs), and `imds-guard uninstall` in the node's
/// namespace removes it: then the route is open again.
#[test]
fn the_guard_stays_after_stop_and_goes_with_uninstall() {
    require_root();
    let mut node = GuardedNode::standalone(NodeShape::routed_veth().unwrap());
    let shape = &node.shape;
    let (metadata, cluster_ip) = addrs::METADATA_SERVICES[0];
    let timeout = ["--timeout-ms".to_owned(), "300".to_owned()];
    let through_service = ("tcp", cluster_ip, &timeout[..]);
    node.daemon.stop().expect("stop");
    shape.assert_never_arrives(&shape.pod().probe(), through_service, metadata);

    let pins = node.pins.path().display().to_string();
    Daemon::command(["uninstall", "--bpffs-dir", &pins])
        .netns(&shape.node)
        .run_to_end()
        .expect("uninstall");
    shape.assert_arrives_from(
        &shape.pod().probe(),
        ("tcp", cluster_ip, &[]),
        metadata,
        node_uplink_for(metadata),
    );
}

/// A restart of the daemon while the API server is away keeps the pinned
/// interface map as it was (as the cgroup allow map is kept): the
/// allowlisted pod keeps its way through the node, the blocked route stays
/// closed.
#[test]
fn a_restart_without_the_api_server_keeps_allowlisted_pods_through() {
    require_root();
    let shape = NodeShape::routed_veth().unwrap();
    let agent = test_pod(1, "agent", "kube-system", shape.pod());
    let mut node = KubeNode::start(shape, &[(&agent, true)]);
    node.wait_for_allowed_interfaces(1);
    node.daemon.kill().expect("SIGKILL");
    node.api.stop().expect("API server stopped");
    let mut daemon = Daemon::kubernetes(
        NODE,
        node.root.path(),
        node.pins.path(),
        node.kubeconfig.path(),
    )
    .netns(&node.shape.node)
    .start()
    .expect("starts without the API server");
    daemon
        .wait_for_log(GUARD_UPDATED, ATTACH_TIMEOUT)
        .expect("the guard is back on the uplink");
    let cgroup = node.cgroup_of(&agent);
    let shape = &node.shape;
    for (metadata, _) in addrs::METADATA_SERVICES {
        shape.assert_arrives_from(
            &shape.pod().probe_in(&cgroup),
            ("tcp", metadata, &[]),
            metadata,
            node_uplink_for(metadata),
        );
    }
    drop(daemon);
}
