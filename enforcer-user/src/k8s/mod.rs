//! Kubernetes mode: this node's pods become allow-map entries, by label and
//! namespace policy, on every kubelet cgroup layout.

pub mod layout;
pub mod notify;
pub mod policy;
pub mod run;
pub mod view;

/// The Kubernetes API access the daemon uses: (API group, resource, verbs).
/// The deployment's ClusterRole must grant exactly this; a test checks it.
pub const API_ACCESS: [(&str, &str, &[&str]); 3] = [
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
