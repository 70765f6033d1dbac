//! Kubernetes objects as the tests' fake nodes need them: pods with the
//! cgroup the kubelet would make for them, namespaces, nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};

/// The pod and namespace label of the default policy.
pub const ACCESS_LABEL: &str = "imds-guard.io/metadata-access";
/// The namespace label whose value `audit` audits the namespace.
pub const MODE_LABEL: &str = "imds-guard.io/mode";
/// The startup taint the daemon removes by default.
pub const STARTUP_TAINT: &str = "imds-guard.io/not-ready";

/// The kubelet's cgroup driver, as it shows in directory names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl Driver {
    /// The pod subtree's base, relative to the cgroup root.
    pub fn base(self) -> &'static str {
        match self {
            Driver::Systemd => "kubepods.slice",
            Driver::Cgroupfs => "kubepods",
        }
    }
}

/// One pod: its API object's fields and its container cgroup.
pub struct TestPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    pub host_network: bool,
    /// `status.podIPs`: where the node edge guard finds the pod's interface.
    pub pod_ips: Vec<std::net::IpAddr>,
}

impl TestPod {
    /// A pod on `node`, with a UID unique to this process and `index`.
    pub fn on(node: &str, index: u32, name: &str, namespace: &str) -> TestPod {
        TestPod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid: format!("{index:08x}-aaaa-4bbb-8ccc-{:012x}", std::process::id()),
            node: node.to_owned(),
            host_network: false,
            pod_ips: Vec::new(),
        }
    }

    /// The pod's API object, with the allow label or without.
    pub fn object(&self, allow_label: bool) -> Pod {
        let mut labels = BTreeMap::from([("app".to_owned(), self.name.clone())]);
        if allow_label {
            labels.insert(ACCESS_LABEL.to_owned(), "allow".to_owned());
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "uid": self.uid,
                "labels": labels,
            },
            "spec": {
                "nodeName": self.node,
                "hostNetwork": self.host_network,
                "containers": [{"name": "main", "image": "example"}],
            },
            "status": {
                "qosClass": "Burstable", "phase": "Running",
                "podIPs": self.pod_ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
            },
        }))
        .expect("pod object")
    }

    /// The container cgroup the kubelet would make, relative to the root.
    pub fn container_dir(&self, driver: Driver) -> String {
        match driver {
            Driver::Systemd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
                self.uid.replace('-', "_"),
                self.name
            ),
            Driver::Cgroupfs => format!("kubepods/burstable/pod{}/{}", self.uid, self.name),
        }
    }
}

/// A namespace with `labels` (and its name label, as the API server adds).
pub fn namespace_with(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut all = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())]);
    all.extend(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": all},
    }))
    .expect("namespace object")
}

/// A namespace that permits its pods to ask for access, or not.
pub fn namespace(name: &str, allow_pods: bool) -> Namespace {
    if allow_pods {
        namespace_with(name, &[(ACCESS_LABEL, "allow-pods")])
    } else {
        namespace_with(name, &[])
    }
}

/// A node with these `NoSchedule` taint keys.
pub fn node(name: &str, taints: &[&str]) -> Node {
    let taints: Vec<serde_json::Value> = taints
        .iter()
        .map(|key| serde_json::json!({"key": key, "value": "true", "effect": "NoSchedule"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("node-{name}"), "labels": {"kubernetes.io/hostname": name}},
        "spec": {"taints": taints, "podCIDR": "10.244.0.0/24"},
    }))
    .expect("node object")
}

/// The keys of a node's taints.
pub fn taint_keys(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|taints| taints.iter().map(|t| t.key.clone()).collect())
        .unwrap_or_default()
}

/// Stores what a fake node's API server holds at start: the node, the
/// namespaces `kube-system` and `team` (neither permitting the label by
/// itself; `kube-system` is the daemon's default allowed namespace), and
/// `pods` with the allow label or without; with `with_cgroups`, also makes
/// each pod's container cgroup below `root` in `driver`'s layout.
///
/// # Panics
/// When the API server or the cgroup tree refuses.
pub fn populate(
    api: &imds_guard_test_apiserver::FakeApiServer,
    root: &mut crate::TestCgroup,
    node_name: &str,
    driver: Driver,
    pods: &[(&TestPod, bool)],
    with_cgroups: bool,
) {
    api.apply_node(node(node_name, &[])).expect("node");
    for ns in ["kube-system", "team"] {
        api.apply_namespace(namespace(ns, false))
            .expect("namespace");
    }
    for (pod, allow) in pods {
        api.apply_pod(pod.object(*allow)).expect("pod");
        if with_cgroups {
            root.child(&pod.container_dir(driver)).expect("pod cgroup");
        }
    }
}
