//! Kubernetes mode: this node's pods become allow-map entries, by label and
//! namespace policy, on every kubelet cgroup layout.

pub mod arrivals;
pub mod layout;
pub mod mode;
pub mod notify;
pub mod policy;
pub mod reachability;
pub mod reconcile;
pub mod taint;
pub mod view;
pub mod watch;

/// The Kubernetes API access the daemon uses: (API group, resource, verbs).
/// The deployment's ClusterRole must grant exactly this; a test checks it.
pub const API_ACCESS: [(&str, &str, &[&str]); 4] = [
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    // The reachability probe and the startup taint, on this node only (the
    // admission policy in deploy/ limits the patch).
    ("", "nodes", &["get", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
