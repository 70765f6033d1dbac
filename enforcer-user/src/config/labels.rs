//! The settings of Kubernetes mode's label policy, and what makes a valid
//! label key or value.

use std::collections::BTreeSet;

/// The label policy's settings, with the README's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelPolicy {
    /// Label key used on pods and on namespaces.
    pub label_key: String,
    /// Pod label value that asks for access.
    pub pod_allow_value: String,
    /// Namespace label value that permits its pods to ask.
    pub namespace_allow_value: String,
    /// Namespaces permitted regardless of their labels.
    pub allow_namespaces: BTreeSet<String>,
    /// Namespace label key whose value [`AUDIT_MODE_VALUE`] audits the
    /// namespace's pods instead of refusing them.
    pub mode_label_key: String,
}

pub const DEFAULT_LABEL_KEY: &str = "imds-guard.io/metadata-access";
pub const DEFAULT_POD_ALLOW_VALUE: &str = "allow";
pub const DEFAULT_NAMESPACE_ALLOW_VALUE: &str = "allow-pods";
pub const DEFAULT_ALLOW_NAMESPACES: [&str; 1] = ["kube-system"];
pub const DEFAULT_MODE_LABEL_KEY: &str = "imds-guard.io/mode";
/// The value of the mode label that audits a namespace.
pub const AUDIT_MODE_VALUE: &str = "audit";

impl Default for LabelPolicy {
    fn default() -> Self {
        LabelPolicy {
            label_key: DEFAULT_LABEL_KEY.to_owned(),
            pod_allow_value: DEFAULT_POD_ALLOW_VALUE.to_owned(),
            namespace_allow_value: DEFAULT_NAMESPACE_ALLOW_VALUE.to_owned(),
            allow_namespaces: DEFAULT_ALLOW_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            mode_label_key: DEFAULT_MODE_LABEL_KEY.to_owned(),
        }
    }
}

/// Label keys are `[prefix/]name`, values at most 63 characters of
/// alphanumerics, `-`, `_` and `.`, beginning and ending alphanumeric.
pub fn valid_label_value(value: &str) -> bool {
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    value.len() <= 63
        && ends_ok(value.chars().next())
        && ends_ok(value.chars().last())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or(("", key), |(p, n)| (p, n));
    let prefix_ok = prefix.len() <= 253
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    prefix_ok && valid_label_value(name)
}
