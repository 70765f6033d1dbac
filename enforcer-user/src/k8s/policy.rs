//! Which pods keep metadata access. A pod label alone is never enough: pod
//! labels are whatever the pod's creator wrote, so the pod's namespace must
//! also be one an administrator opted in.

use std::collections::{BTreeMap, BTreeSet};

/// The label policy, with the README's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Label key used on pods and on namespaces.
    pub label_key: String,
    /// Pod label value that asks for access.
    pub pod_allow_value: String,
    /// Namespace label value that permits its pods to ask.
    pub namespace_allow_value: String,
    /// Namespaces permitted regardless of their labels.
    pub allow_namespaces: BTreeSet<String>,
}

pub const DEFAULT_LABEL_KEY: &str = "imds-guard.io/metadata-access";
pub const DEFAULT_POD_ALLOW_VALUE: &str = "allow";
pub const DEFAULT_NAMESPACE_ALLOW_VALUE: &str = "allow-pods";
pub const DEFAULT_ALLOW_NAMESPACES: [&str; 1] = ["kube-system"];

impl Default for Policy {
    fn default() -> Self {
        Policy {
            label_key: DEFAULT_LABEL_KEY.to_owned(),
            pod_allow_value: DEFAULT_POD_ALLOW_VALUE.to_owned(),
            namespace_allow_value: DEFAULT_NAMESPACE_ALLOW_VALUE.to_owned(),
            allow_namespaces: DEFAULT_ALLOW_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

/// What the policy says of one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Blocked,
    /// The pod asks for access, but its namespace does not permit it.
    LabelIgnored,
}

impl Policy {
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
        let permitted = self.allow_namespaces.contains(namespace)
            || namespace_labels
                .and_then(|labels| labels.get(&self.label_key))
                .is_some_and(|v| *v == self.namespace_allow_value);
        if permitted {
            Verdict::Allowed
        } else {
            Verdict::LabelIgnored
        }
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
        let policy = Policy::default();
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
    fn keys_and_values_are_configurable() {
        let policy = Policy {
            label_key: "example.com/imds".to_owned(),
            pod_allow_value: "true".to_owned(),
            namespace_allow_value: "permit".to_owned(),
            allow_namespaces: BTreeSet::new(),
        };
        let pod = labels(&[("example.com/imds", "true")]);
        let ns = labels(&[("example.com/imds", "permit")]);
        assert_eq!(
            policy.decide(&pod, "kube-system", None),
            Verdict::LabelIgnored
        );
        assert_eq!(policy.decide(&pod, "x", Some(&ns)), Verdict::Allowed);
    }
}
