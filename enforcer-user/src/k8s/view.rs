//! This node's pods and the cluster's namespaces as the watchers last saw
//! them, kept to the few fields the policy and the cgroup layout need.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::PartialObjectMeta;

use crate::{
    bpf::maps::Access,
    config::labels::LabelPolicy,
    k8s::{layout::Qos, policy::Verdict},
    report::events::PodIndex,
};

/// What we keep of a pod (no managed fields, no spec beyond this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub uid: String,
    /// The UID in the pod's cgroup name: the API's, except for a static
    /// pod's mirror, whose cgroup carries the static pod's own UID (the
    /// `kubernetes.io/config.mirror` annotation).
    pub cgroup_uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub qos: Option<Qos>,
    /// In a terminal phase (Succeeded, Failed): its containers are gone, so
    /// it is dropped as if deleted.
    pub finished: bool,
    /// Its addresses on the pod network (none for a hostNetwork pod, whose
    /// address is the node's): the node edge guard finds its interface by them.
    pub pod_ips: Vec<IpAddr>,
}

impl PodEntry {
    /// `None` for a pod without a UID (never sent by a real API server).
    pub fn from_pod(pod: &Pod) -> Option<PodEntry> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let uid = meta.uid.clone()?;
        let cgroup_uid = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| uid.clone());
        Some(PodEntry {
            uid,
            cgroup_uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            qos: status
                .and_then(|s| s.qos_class.as_deref())
                .and_then(Qos::from_status),
            finished: status
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed")),
            pod_ips: pod_network_ips(pod),
        })
    }
}

/// A pod's `status.podIPs` (or `podIP`), unless it shares the node's network.
fn pod_network_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let texts: Vec<&str> = match status.pod_ip.as_deref() {
        Some(single) if status.pod_ips.as_ref().is_none_or(Vec::is_empty) => vec![single],
        _ => listed.collect(),
    };
    texts.into_iter().filter_map(|t| t.parse().ok()).collect()
}

/// Marks a static pod's mirror in the API, with the static pod's UID.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A namespace's name and labels.
pub type NamespaceEntry = (String, BTreeMap<String, String>);

/// Name and labels of a namespace, from its metadata alone.
pub fn namespace_entry(namespace: &PartialObjectMeta<Namespace>) -> Option<NamespaceEntry> {
    let name = namespace.metadata.name.clone()?;
    Some((name, namespace.metadata.labels.clone().unwrap_or_default()))
}

/// The pods a change may have changed the decision for.
#[derive(Debug, PartialEq, Eq)]
pub enum Touched {
    /// These pods, by UID.
    Pods(BTreeSet<String>),
    /// Every pod (a relist, a policy reload).
    All,
}

impl Touched {
    fn pod(uid: &str) -> Touched {
        Touched::Pods(BTreeSet::from([uid.to_owned()]))
    }
}

/// What the policy says of one pod: whether its label is ignored, and what
/// the allow map should hold for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub label_ignored: bool,
    pub access: Option<Access>,
}

#[derive(Debug, Default)]
pub struct ClusterView {
    pods: BTreeMap<String, PodEntry>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl ClusterView {
    /// A pod added or changed; a finished one is dropped.
    pub fn apply_pod(&mut self, pod: PodEntry) -> Touched {
        let touched = Touched::pod(&pod.uid);
        if pod.finished {
            self.pods.remove(&pod.uid);
        } else {
            self.pods.insert(pod.uid.clone(), pod);
        }
        touched
    }

    pub fn delete_pod(&mut self, uid: &str) -> Touched {
        self.pods.remove(uid);
        Touched::pod(uid)
    }

    /// After a full (re)list: exactly these pods, so pods deleted while the
    /// watch was away disappear.
    pub fn replace_pods(&mut self, pods: Vec<PodEntry>) -> Touched {
        self.pods = pods
            .into_iter()
            .filter(|p| !p.finished)
            .map(|p| (p.uid.clone(), p))
            .collect();
        Touched::All
    }

    /// The pods of `name`: their namespace's labels changed.
    fn pods_in(&self, name: &str) -> Touched {
        Touched::Pods(
            self.pods
                .values()
                .filter(|p| p.namespace == name)
                .map(|p| p.uid.clone())
                .collect(),
        )
    }

    pub fn apply_namespace(&mut self, name: String, labels: BTreeMap<String, String>) -> Touched {
        if self.namespaces.get(&name) == Some(&labels) {
            return Touched::Pods(BTreeSet::new());
        }
        let touched = self.pods_in(&name);
        self.namespaces.insert(name, labels);
        touched
    }

    pub fn delete_namespace(&mut self, name: &str) -> Touched {
        self.namespaces.remove(name);
        self.pods_in(name)
    }

    pub fn replace_namespaces(&mut self, namespaces: Vec<NamespaceEntry>) -> Touched {
        self.namespaces = namespaces.into_iter().collect();
        Touched::All
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Namespace and name of every pod, by UID.
    pub fn names(&self) -> PodIndex {
        self.pods
            .values()
            .map(|p| (p.uid.clone(), (p.namespace.clone(), p.name.clone())))
            .collect()
    }

    pub fn pod(&self, uid: &str) -> Option<&PodEntry> {
        self.pods.get(uid)
    }

    /// The pod named `name` in `namespace`, if it is on this node.
    pub fn pod_named(&self, namespace: &str, name: &str) -> Option<&PodEntry> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The labels of `namespace`, once the namespace watch has seen it.
    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace)
    }

    pub fn uids(&self) -> impl Iterator<Item = &str> {
        self.pods.keys().map(String::as_str)
    }

    /// The policy's decision for a pod the view holds.
    pub fn decide(&self, pod: &PodEntry, policy: &LabelPolicy) -> Decision {
        let namespace = self.namespaces.get(&pod.namespace);
        let verdict = policy.decide(&pod.labels, &pod.namespace, namespace);
        Decision {
            // Not before the namespace is known: pods and namespaces come
            // in separate watches, and a pod seen first is not yet ignored.
            label_ignored: verdict == Verdict::LabelIgnored && namespace.is_some(),
            access: policy.access(verdict, namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, namespace: &str, allow: bool) -> PodEntry {
        let mut labels = BTreeMap::new();
        if allow {
            labels.insert(
                "imds-guard.io/metadata-access".to_owned(),
                "allow".to_owned(),
            );
        }
        PodEntry {
            uid: uid.to_owned(),
            cgroup_uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            name: format!("pod-{uid}"),
            labels,
            qos: Some(Qos::Burstable),
            finished: false,
            pod_ips: Vec::new(),
        }
    }

    /// Every pod's decision, by UID.
    fn decisions(view: &ClusterView, policy: &LabelPolicy) -> Vec<(String, Decision)> {
        view.uids()
            .filter_map(|uid| view.pod(uid))
            .map(|pod| (pod.uid.clone(), view.decide(pod, policy)))
            .collect()
    }

    const ALLOWED: Decision = Decision {
        label_ignored: false,
        access: Some(Access::Allow),
    };
    const IGNORED: Decision = Decision {
        label_ignored: true,
        access: None,
    };
    const BLOCKED: Decision = Decision {
        label_ignored: false,
        access: None,
    };

    #[test]
    fn namespace_changes_touch_their_pods_only() {
        let policy = LabelPolicy::default();
        let mut view = ClusterView::default();
        view.apply_pod(pod("a", "team", true));
        view.apply_pod(pod("b", "team", false));
        view.apply_pod(pod("c", "kube-system", true));
        let id = |uid: &str| uid.to_owned();
        // Not ignored before its namespace is known, only blocked.
        assert_eq!(
            decisions(&view, &policy),
            vec![(id("a"), BLOCKED), (id("b"), BLOCKED), (id("c"), ALLOWED)]
        );
        view.apply_namespace("team".to_owned(), BTreeMap::new());
        assert_eq!(decisions(&view, &policy)[0], (id("a"), IGNORED));
        let opt_in = BTreeMap::from([(
            "imds-guard.io/metadata-access".to_owned(),
            "allow-pods".to_owned(),
        )]);
        let touched = view.apply_namespace("team".to_owned(), opt_in.clone());
        assert_eq!(touched, Touched::Pods(BTreeSet::from([id("a"), id("b")])));
        // The same labels again change nothing.
        assert_eq!(
            view.apply_namespace("team".to_owned(), opt_in),
            Touched::Pods(BTreeSet::new())
        );
        assert_eq!(decisions(&view, &policy)[0], (id("a"), ALLOWED));
        let audit = BTreeMap::from([("imds-guard.io/mode".to_owned(), "audit".to_owned())]);
        view.apply_namespace("team".to_owned(), audit);
        let audited = Decision {
            label_ignored: true,
            access: Some(Access::Audit),
        };
        assert_eq!(decisions(&view, &policy)[0], (id("a"), audited));
        assert_eq!(
            view.delete_namespace("team"),
            Touched::Pods(BTreeSet::from([id("a"), id("b")]))
        );
        assert_eq!(decisions(&view, &policy)[0], (id("a"), BLOCKED));
        view.apply_namespace("team".to_owned(), BTreeMap::new());
        // A relist without "c" drops it; a finished pod is dropped too.
        let mut done = pod("d", "kube-system", true);
        done.finished = true;
        assert_eq!(
            view.replace_pods(vec![pod("a", "team", true), done.clone()]),
            Touched::All
        );
        assert_eq!(decisions(&view, &policy), vec![(id("a"), IGNORED)]);
        view.apply_pod(pod("d", "kube-system", true));
        assert_eq!(view.pod_count(), 2);
        assert_eq!(
            view.apply_pod(done),
            Touched::Pods(BTreeSet::from([id("d")]))
        );
        assert_eq!(view.pod_count(), 1);
    }

    #[test]
    fn entries_come_from_api_objects() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "labels": {"imds-guard.io/metadata-access": "allow"},
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {"nodeName": "node-1", "hostNetwork": true, "containers": []},
            "status": {"qosClass": "BestEffort", "phase": "Running"}
        }))
        .expect("pod json");
        let entry = PodEntry::from_pod(&pod).expect("entry");
        assert_eq!(entry.uid, "u-1");
        assert_eq!(entry.namespace, "shop");
        assert_eq!(entry.qos, Some(Qos::BestEffort));
        assert_eq!(entry.labels.len(), 1);
        assert!(!entry.finished);
        for (phase, finished) in [("Pending", false), ("Succeeded", true), ("Failed", true)] {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "job", "uid": "u-2"},
                "status": {"phase": phase}
            }))
            .expect("pod json");
            assert_eq!(
                PodEntry::from_pod(&pod).expect("entry").finished,
                finished,
                "{phase}"
            );
        }
        let no_uid: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))
            .expect("pod json");
        assert_eq!(PodEntry::from_pod(&no_uid), None);
        assert_eq!(entry.cgroup_uid, "u-1");
        let mirror: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "etcd-node-1", "uid": "api-uid",
                "annotations": {"kubernetes.io/config.mirror": "static-hash"}
            }
        }))
        .expect("pod json");
        let mirror = PodEntry::from_pod(&mirror).expect("entry");
        assert_eq!(
            (mirror.uid.as_str(), mirror.cgroup_uid.as_str()),
            ("api-uid", "static-hash")
        );
    }
}
