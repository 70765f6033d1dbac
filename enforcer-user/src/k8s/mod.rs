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
/// (The reachability probe's `GET` of its own Node needs no grant: any
/// answer, a 403 too, says the API server is there.)
pub const API_ACCESS: [(&str, &str, &[&str]); 3] = [
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// What `--startup-taint` adds: its own node, read and patched (the
/// startup-taint component grants it, with the admission policy that
/// limits the patch to removing that taint).
pub const STARTUP_TAINT_ACCESS: [(&str, &str, &[&str]); 1] = [("", "nodes", &["get", "patch"])];
