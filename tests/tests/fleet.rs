//! Many nodes against one API server: twenty real daemons, each with its
//! own fake node (Node object, pod cgroup subtree, pins), watch the test
//! API server at once. What they cost adds up node by node, and when the
//! API server restarts and every watch position has expired, they relist
//! spread out over time rather than all in the same second.

use std::time::{Duration, Instant};

use enforcer_user::k8s::watch::FIRST_PAUSE_SPREAD;
use imds_guard_test_apiserver::{ApiRequest, ApiServerOptions, FakeApiServer, ResourceKind, Verb};
use imds_guard_tests::{
    Daemon, PinDir, TempFile, TestCgroup,
    pods::{self, Driver, TestPod, namespace},
    require_root,
};

const NODES: usize = 20;
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One fake node: its cgroup tree, pins and daemon.
struct FakeNode {
    name: String,
    daemon: Daemon,
    _pins: PinDir,
    _root: TestCgroup,
}

/// The node a pods request is for, from its field selector.
fn node_of(request: &ApiRequest) -> Option<&str> {
    request
        .param("fieldSelector")?
        .strip_prefix("spec.nodeName=")
}

fn pod_requests<'a>(
    requests: &'a [ApiRequest],
    verb: Verb,
    node: &'a str,
) -> impl Iterator<Item = &'a ApiRequest> {
    requests.iter().filter(move |r| {
        r.verb == verb && r.resource == ResourceKind::Pods && node_of(r) == Some(node)
    })
}

impl FakeNode {
    /// Node `index`, with two pods (one allowed) and its daemon, synced.
    fn start(api: &FakeApiServer, kubeconfig: &std::path::Path, index: usize) -> FakeNode {
        let name = format!("node-{index:02}");
        api.apply_node(pods::node(&name, &[])).expect("node");
        let mut root = TestCgroup::new("fleet").expect("cgroup root");
        root.child(Driver::Cgroupfs.base()).expect("pod base");
        let index = u32::try_from(index).expect("few nodes");
        for (offset, allowed) in [(0, true), (1, false)] {
            let pod = TestPod::on(
                &name,
                200 + 2 * index + offset,
                &format!("app-{index}-{offset}"),
                "kube-system",
            );
            api.apply_pod(pod.object(allowed)).expect("pod");
            root.child(&pod.container_dir(Driver::Cgroupfs))
                .expect("pod cgroup");
        }
        let pins = PinDir::new("fleet");
        let mut daemon = Daemon::kubernetes(&name, root.path(), pins.path(), kubeconfig)
            .start()
            .expect("imds-guard run starts");
        daemon
            .wait_for_log("synced with the API server", Duration::from_secs(20))
            .expect("first sync");
        FakeNode {
            name,
            daemon,
            _pins: pins,
            _root: root,
        }
    }
}

/// Waits until every node has relisted its pods after `restarted`; returns
/// when each did, relative to it, sorted.
fn wait_for_relists(api: &FakeApiServer, nodes: &[FakeNode], restarted: Instant) -> Vec<Duration> {
    let deadline = restarted + FIRST_PAUSE_SPREAD + Duration::from_secs(20);
    loop {
        let requests = api.requests();
        let firsts: Vec<Option<Instant>> = nodes
            .iter()
            .map(|node| {
                pod_requests(&requests, Verb::List, &node.name)
                    .map(|r| r.at)
                    .find(|at| *at > restarted)
            })
            .collect();
        if firsts.iter().all(Option::is_some) {
            let mut offsets: Vec<Duration> = firsts
                .into_iter()
                .flatten()
                .map(|at| at - restarted)
                .collect();
            offsets.sort();
            return offsets;
        }
        assert!(
            Instant::now() < deadline,
            "not every node relisted within {:?}: {firsts:?}",
            deadline - restarted
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn twenty_nodes_cost_twenty_times_one_and_relist_spread_out() {
    require_root();
    let mut api = FakeApiServer::start_with(&ApiServerOptions {
        max_watch_timeout: Some(WATCH_TIMEOUT),
        ..ApiServerOptions::default()
    })
    .expect("API server");
    for ns in ["kube-system", "team"] {
        api.apply_namespace(namespace(ns, false))
            .expect("namespace");
    }
    let kubeconfig = TempFile::new("kubeconfig", &api.kubeconfig()).expect("kubeconfig");
    let kubeconfig = kubeconfig.path();
    let mut nodes: Vec<FakeNode> = (0..NODES)
        .map(|index| FakeNode::start(&api, kubeconfig, index))
        .collect();

    // Steady state: each node renews its watches once a timeout, no more.
    let steady_from = Instant::now();
    std::thread::sleep(WATCH_TIMEOUT * 3 + Duration::from_secs(2));
    let steady_to = Instant::now();
    let requests = api.requests();
    let in_steady: Vec<ApiRequest> = requests
        .iter()
        .filter(|r| r.at > steady_from && r.at <= steady_to)
        .cloned()
        .collect();
    let mut per_node = Vec::new();
    for node in &nodes {
        let watches = pod_requests(&in_steady, Verb::Watch, &node.name).count();
        let lists = pod_requests(&in_steady, Verb::List, &node.name).count();
        assert_eq!(lists, 0, "{}: no list in steady state", node.name);
        assert!(
            (3..=4).contains(&watches),
            "{}: {watches} pod watch renewals in 32 s",
            node.name
        );
        per_node.push(watches);
    }
    let namespace_watches = in_steady
        .iter()
        .filter(|r| r.verb == Verb::Watch && r.resource == ResourceKind::Namespaces)
        .count();
    let pod_watches: usize = per_node.iter().sum();
    let others: Vec<&ApiRequest> = in_steady.iter().filter(|r| r.verb != Verb::Watch).collect();
    assert!(others.is_empty(), "only watch renewals: {others:?}");
    // Linear: the fleet's cost is the sum of the nodes', each the same.
    assert!(
        namespace_watches.abs_diff(pod_watches) <= NODES,
        "as many namespace renewals as pod renewals: {namespace_watches} vs {pod_watches}"
    );
    eprintln!(
        "steady state, {NODES} nodes, {:?}: {pod_watches} pod and {namespace_watches} namespace watch renewals ({:?} per node)",
        steady_to - steady_from,
        per_node
    );

    // The API server restarts, and every watch position has expired.
    api.stop().expect("stop");
    api.expire_watches();
    let restarted = Instant::now();
    api.restart().expect("restart");
    let offsets = wait_for_relists(&api, &nodes, restarted);
    eprintln!("relists after the restart: {offsets:?}");
    let busiest = offsets
        .iter()
        .map(|start| {
            offsets
                .iter()
                .filter(|o| **o >= *start && **o < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest <= NODES / 4,
        "{busiest} of {NODES} nodes relisted within one second: {offsets:?}"
    );
    for node in &mut nodes {
        let status = node.daemon.stop().expect("stop");
        assert!(status.success(), "{}: {status}", node.name);
    }
}
