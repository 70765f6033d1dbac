//! This node's pods and the cluster's namespaces as the watchers last saw
//! them, kept to the few fields the policy and the cgroup layout need.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::{
    config::labels::LabelPolicy,
    k8s::{layout::Qos, policy::Verdict},
    report::events::PodIndex,
};

/// What we keep of a pod (no managed fields, no spec beyond this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub qos: Option<Qos>,
}

impl PodEntry {
    /// `None` for a pod without a UID (never sent by a real API server).
    pub fn from_pod(pod: &Pod) -> Option<PodEntry> {
        let meta = &pod.metadata;
        Some(PodEntry {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            qos: pod
                .status
                .as_ref()
                .and_then(|s| s.qos_class.as_deref())
                .and_then(Qos::from_status),
        })
    }
}

/// A namespace's name and labels.
pub type NamespaceEntry = (String, BTreeMap<String, String>);

/// Name and labels of a namespace.
pub fn namespace_entry(namespace: &Namespace) -> Option<NamespaceEntry> {
    let name = namespace.metadata.name.clone()?;
    Some((name, namespace.metadata.labels.clone().unwrap_or_default()))
}

#[derive(Debug, Default)]
pub struct ClusterView {
    pods: BTreeMap<String, PodEntry>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl ClusterView {
    pub fn apply_pod(&mut self, pod: PodEntry) {
        self.pods.insert(pod.uid.clone(), pod);
    }

    pub fn delete_pod(&mut self, uid: &str) {
        self.pods.remove(uid);
    }

    /// After a full (re)list: exactly these pods, so pods deleted while the
    /// watch was away disappear.
    pub fn replace_pods(&mut self, pods: Vec<PodEntry>) {
        self.pods = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
    }

    pub fn apply_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name, labels);
    }

    pub fn delete_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn replace_namespaces(&mut self, namespaces: Vec<NamespaceEntry>) {
        self.namespaces = namespaces.into_iter().collect();
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

    /// The pods the policy allows, and the UIDs of those whose label it ignores.
    pub fn judge(&self, policy: &LabelPolicy) -> (Vec<&PodEntry>, BTreeSet<&str>) {
        let mut allowed = Vec::new();
        let mut ignored = BTreeSet::new();
        for pod in self.pods.values() {
            match policy.decide(
                &pod.labels,
                &pod.namespace,
                self.namespaces.get(&pod.namespace),
            ) {
                Verdict::Allowed => allowed.push(pod),
                Verdict::LabelIgnored => {
                    ignored.insert(pod.uid.as_str());
                }
                Verdict::Blocked => {}
            }
        }
        (allowed, ignored)
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
            namespace: namespace.to_owned(),
            name: format!("pod-{uid}"),
            labels,
            qos: Some(Qos::Burstable),
        }
    }

    #[test]
    fn namespace_changes_re_evaluate_their_pods() {
        let policy = LabelPolicy::default();
        let mut view = ClusterView::default();
        view.apply_pod(pod("a", "team", true));
        view.apply_pod(pod("b", "team", false));
        view.apply_pod(pod("c", "kube-system", true));
        let uids = |view: &ClusterView| -> (Vec<String>, Vec<String>) {
            let (allowed, ignored) = view.judge(&policy);
            (
                allowed.iter().map(|p| p.uid.clone()).collect(),
                ignored.iter().map(|s| (*s).to_owned()).collect(),
            )
        };
        assert_eq!(uids(&view), (vec!["c".to_owned()], vec!["a".to_owned()]));
        let opt_in = BTreeMap::from([(
            "imds-guard.io/metadata-access".to_owned(),
            "allow-pods".to_owned(),
        )]);
        view.apply_namespace("team".to_owned(), opt_in);
        assert_eq!(uids(&view), (vec!["a".to_owned(), "c".to_owned()], vec![]));
        view.delete_namespace("team");
        assert_eq!(uids(&view), (vec!["c".to_owned()], vec!["a".to_owned()]));
        // A relist without "c" drops it.
        view.replace_pods(vec![pod("a", "team", true)]);
        assert_eq!(uids(&view), (vec![], vec!["a".to_owned()]));
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
            "status": {"qosClass": "BestEffort"}
        }))
        .expect("pod json");
        let entry = PodEntry::from_pod(&pod).expect("entry");
        assert_eq!(entry.uid, "u-1");
        assert_eq!(entry.namespace, "shop");
        assert_eq!(entry.qos, Some(Qos::BestEffort));
        assert_eq!(entry.labels.len(), 1);
        let no_uid: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))
            .expect("pod json");
        assert_eq!(PodEntry::from_pod(&no_uid), None);
    }
}
