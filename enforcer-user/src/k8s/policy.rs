//! Which pods keep metadata access. A pod label alone is never enough: pod
//! labels are whatever the pod's creator wrote, so the pod's namespace must
//! also be one an administrator opted in. The policy's settings are read
//! and checked in `config::labels`; this is what they decide.

use std::collections::BTreeMap;

use crate::{
    bpf::maps::Access,
    config::labels::{AUDIT_MODE_VALUE, LabelPolicy},
    report::explain::Permission,
};

/// What the policy says of one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Blocked,
    /// The pod asks for access, but its namespace does not permit it.
    LabelIgnored,
}

impl LabelPolicy {
    /// `namespace_labels` is `None` while the namespace is unknown (not
    /// listed yet, or gone): only the flag list can permit it then.
    pub fn decide(
        &self,
        pod_labels: &BTreeMap<String, String>,
        namespace: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Verdict {
        if pod_labels.get(&self.label_key) != Some(&self.pod_allow_value) {
            return Verdict::Blocked;
        }
        match self.permission(namespace, namespace_labels) {
            Permission::Listed | Permission::NamespaceLabel => Verdict::Allowed,
            Permission::NotPermitted | Permission::NamespaceUnknown => Verdict::LabelIgnored,
        }
    }

    /// Whether, and why, `namespace` lets its pods ask for access.
    pub fn permission(
        &self,
        namespace: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Permission {
        if self.allow_namespaces.contains(namespace) {
            return Permission::Listed;
        }
        match namespace_labels {
            None => Permission::NamespaceUnknown,
            Some(labels) if labels.get(&self.label_key) == Some(&self.namespace_allow_value) => {
                Permission::NamespaceLabel
            }
            Some(_) => Permission::NotPermitted,
        }
    }

    /// Whether the namespace's labels put it in audit mode.
    pub fn audits(&self, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
        namespace_labels
            .and_then(|labels| labels.get(&self.mode_label_key))
            .is_some_and(|v| v == AUDIT_MODE_VALUE)
    }
}

impl LabelPolicy {
    /// What the allow map holds for a pod: allowed pods reach the metadata
    /// API wherever they are; the others are audited in a namespace in
    /// audit mode and refused elsewhere (no entry).
    pub fn access(
        &self,
        verdict: Verdict,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Option<Access> {
        if verdict == Verdict::Allowed {
            return Some(Access::Allow);
        }
        self.audits(namespace_labels).then_some(Access::Audit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn decisions() {
        let policy = LabelPolicy::default();
        let asks = labels(&[("imds-guard.io/metadata-access", "allow"), ("app", "x")]);
        let opted_in = labels(&[("imds-guard.io/metadata-access", "allow-pods")]);
        let other_value = labels(&[("imds-guard.io/metadata-access", "allow")]);
        let none = labels(&[]);
        let cases = [
            (&asks, "kube-system", None, Verdict::Allowed),
            (&asks, "team-a", Some(&opted_in), Verdict::Allowed),
            (&asks, "team-a", Some(&none), Verdict::LabelIgnored),
            (&asks, "team-a", None, Verdict::LabelIgnored),
            // The namespace must say allow-pods, not the pod's value.
            (&asks, "team-a", Some(&other_value), Verdict::LabelIgnored),
            (&none, "kube-system", None, Verdict::Blocked),
            (&none, "team-a", Some(&opted_in), Verdict::Blocked),
            (
                &labels(&[("imds-guard.io/metadata-access", "yes")]),
                "kube-system",
                None,
                Verdict::Blocked,
            ),
        ];
        for (i, (pod, namespace, ns_labels, want)) in cases.into_iter().enumerate() {
            assert_eq!(policy.decide(pod, namespace, ns_labels), want, "case {i}");
        }
    }

    #[test]
    fn permissions_say_why() {
        let policy = LabelPolicy::default();
        let opted_in = labels(&[("imds-guard.io/metadata-access", "allow-pods")]);
        let other = labels(&[("imds-guard.io/metadata-access", "allow")]);
        let cases = [
            ("kube-system", None, Permission::Listed),
            ("kube-system", Some(&other), Permission::Listed),
            ("team-a", Some(&opted_in), Permission::NamespaceLabel),
            ("team-a", Some(&other), Permission::NotPermitted),
            ("team-a", None, Permission::NamespaceUnknown),
        ];
        for (namespace, ns_labels, want) in cases {
            assert_eq!(policy.permission(namespace, ns_labels), want, "{namespace}");
        }
    }

    #[test]
    fn keys_and_values_are_configurable() {
        let policy = LabelPolicy {
            label_key: "example.com/imds".to_owned(),
            pod_allow_value: "true".to_owned(),
            namespace_allow_value: "permit".to_owned(),
            allow_namespaces: std::collections::BTreeSet::new(),
            mode_label_key: "example.com/mode".to_owned(),
        };
        let pod = labels(&[("example.com/imds", "true")]);
        let ns = labels(&[("example.com/imds", "permit")]);
        assert_eq!(
            policy.decide(&pod, "kube-system", None),
            Verdict::LabelIgnored
        );
        assert_eq!(policy.decide(&pod, "x", Some(&ns)), Verdict::Allowed);
        let audited = labels(&[("example.com/mode", "audit")]);
        assert_eq!(
            policy.access(Verdict::Blocked, Some(&audited)),
            Some(Access::Audit)
        );
    }

    #[test]
    fn audit_namespaces_audit_all_but_allowed_pods() {
        let policy = LabelPolicy::default();
        let audit = labels(&[("imds-guard.io/mode", "audit")]);
        let enforce = labels(&[("imds-guard.io/mode", "enforce")]);
        let cases = [
            (Verdict::Allowed, Some(&audit), Some(Access::Allow)),
            (Verdict::Allowed, None, Some(Access::Allow)),
            (Verdict::Blocked, Some(&audit), Some(Access::Audit)),
            (Verdict::LabelIgnored, Some(&audit), Some(Access::Audit)),
            (Verdict::Blocked, Some(&enforce), None),
            (Verdict::Blocked, None, None),
        ];
        for (i, (verdict, namespace, want)) in cases.into_iter().enumerate() {
            assert_eq!(policy.access(verdict, namespace), want, "case {i}");
        }
    }
}
