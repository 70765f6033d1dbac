//! Label and field selectors, parsed and applied as the API server does for
//! `labelSelector` and `fieldSelector`.

use serde_json::Value;

/// Which objects a list or watch request covers: its namespace (for a
/// namespaced request path) and its selectors.
#[derive(Debug, Default)]
pub(crate) struct ObjectFilter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl ObjectFilter {
    pub fn matches(&self, object: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|namespace| field_value(object, "metadata.namespace") == namespace);
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }

    /// Whether the request narrows the collection beyond its path, which
    /// makes the number of remaining items in a paged list unknown.
    pub fn has_selectors(&self) -> bool {
        !self.labels.0.is_empty() || !self.fields.0.is_empty()
    }
}

#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A `labelSelector`: every requirement must hold.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

impl LabelSelector {
    /// Parses the string form, e.g. `app=web,tier!=db,env in (a,b),!legacy`;
    /// the error is the message of the server's 400 answer.
    pub fn parse(text: &str) -> Result<Self, String> {
        split_outside_parentheses(text)
            .into_iter()
            .map(|term| {
                parse_label_requirement(term)
                    .ok_or_else(|| format!("unable to parse requirement: {term:?} in {text:?}"))
            })
            .collect::<Result<_, _>>()
            .map(LabelSelector)
    }

    fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        // A missing label satisfies `!=` and `notin`, as in Kubernetes.
        self.0.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|v| values.iter().any(|x| x == v))
            }
            LabelRequirement::NotIn(key, values) => {
                !label(key).is_some_and(|v| values.iter().any(|x| x == v))
            }
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::DoesNotExist(key) => label(key).is_none(),
        })
    }
}

/// Splits on the commas that separate requirements, leaving the commas of
/// `in (a,b)` value lists alone.
fn split_outside_parentheses(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in text.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .collect()
}

fn parse_label_requirement(term: &str) -> Option<LabelRequirement> {
    if let Some(key) = term.strip_prefix('!') {
        return Some(LabelRequirement::DoesNotExist(label_key(key)?));
    }
    if let Some((head, rest)) = term.split_once('(') {
        let values = rest
            .strip_suffix(')')?
            .split(',')
            .map(|value| label_value(value.trim()))
            .collect::<Option<Vec<_>>>()?;
        let mut words = head.split_whitespace();
        let (key, operator) = (label_key(words.next()?)?, words.next()?);
        if words.next().is_some() {
            return None;
        }
        return match operator {
            "in" => Some(LabelRequirement::In(key, values)),
            "notin" => Some(LabelRequirement::NotIn(key, values)),
            _ => None,
        };
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Some(LabelRequirement::NotEquals(
            label_key(key)?,
            label_value(value.trim())?,
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(LabelRequirement::Equals(
            label_key(key)?,
            label_value(value.trim())?,
        ));
    }
    Some(LabelRequirement::Exists(label_key(term)?))
}

/// A label key: an optional DNS prefix and `/`, then a name.
fn label_key(text: &str) -> Option<String> {
    let key = text.trim();
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    valid.then(|| key.to_owned())
}

/// A label value: possibly empty, no spaces or operators.
fn label_value(text: &str) -> Option<String> {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        .then(|| text.to_owned())
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    field: String,
    value: String,
    equal: bool,
}

/// A `fieldSelector`: every `field=value` / `field!=value` term must hold.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<FieldRequirement>);

impl FieldSelector {
    /// Parses the string form, accepting only the fields the server indexes
    /// for the resource (`supported`), as the real server does.
    pub fn parse(text: &str, supported: &[&str]) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|term| !term.is_empty())
            .map(|term| {
                let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                    (field, value, false)
                } else if let Some((field, value)) =
                    term.split_once("==").or_else(|| term.split_once('='))
                {
                    (field, value, true)
                } else {
                    return Err(format!(
                        "invalid selector: {text:?}; can't understand {term:?}"
                    ));
                };
                let field = field.trim();
                if !supported.contains(&field) {
                    return Err(format!("field label not supported: {field}"));
                }
                Ok(FieldRequirement {
                    field: field.to_owned(),
                    value: value.trim().to_owned(),
                    equal,
                })
            })
            .collect::<Result<_, _>>()
            .map(FieldSelector)
    }

    fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|term| (field_value(object, &term.field) == term.value) == term.equal)
    }
}

/// A field as the server's field selectors see it: strings as they are,
/// booleans as `true`/`false`, and an unset field as the empty string (an
/// unscheduled pod has `spec.nodeName=""`).
fn field_value(object: &Value, path: &str) -> String {
    match path
        .split('.')
        .try_fold(object, |value, segment| value.get(segment))
    {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Bool(flag)) => flag.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "web-1", "namespace": "apps", "labels": {"app": "web", "tier": "front"}},
            "spec": {"nodeName": "node-a", "hostNetwork": true},
        })
    }

    fn labels_match(selector: &str) -> bool {
        LabelSelector::parse(selector)
            .unwrap_or_else(|e| panic!("{selector:?} should parse: {e}"))
            .matches(&pod())
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        for (selector, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (db, web)", true),
            ("app in (db)", false),
            ("app notin (db,cache)", true),
            ("missing notin (x)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("missing", false),
            ("!missing", true),
            ("!tier", false),
            ("app=web, tier in (front,back), !legacy", true),
            ("app=web,tier=back", false),
            ("example.com/role", false),
        ] {
            assert_eq!(labels_match(selector), expected, "{selector:?}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_refused() {
        for selector in [
            "app in web",
            "app in (a",
            "app within (a)",
            "a b",
            "app=x y",
            "!",
        ] {
            assert!(
                LabelSelector::parse(selector).is_err(),
                "{selector:?} should be refused"
            );
        }
    }

    #[test]
    fn field_selectors_match_and_refuse_unindexed_fields() {
        let supported = [
            "metadata.name",
            "spec.nodeName",
            "spec.hostNetwork",
            "status.phase",
        ];
        let matches = |selector: &str| {
            FieldSelector::parse(selector, &supported)
                .unwrap_or_else(|e| panic!("{selector:?} should parse: {e}"))
                .matches(&pod())
        };
        assert!(matches("spec.nodeName=node-a"));
        assert!(matches("spec.nodeName==node-a,metadata.name=web-1"));
        assert!(!matches("spec.nodeName=node-b"));
        assert!(matches("spec.nodeName!=node-b"));
        assert!(matches("spec.hostNetwork=true"));
        assert!(
            matches("status.phase="),
            "an unset field is the empty string"
        );
        assert_eq!(
            FieldSelector::parse("spec.containers=x", &supported),
            Err("field label not supported: spec.containers".to_owned())
        );
        assert!(FieldSelector::parse("spec.nodeName", &supported).is_err());
    }
}
