//! Kubernetes mode: this node's pods become allow-map entries, by label and
//! namespace policy, on every kubelet cgroup layout.

pub mod layout;
pub mod policy;
pub mod run;
pub mod view;
