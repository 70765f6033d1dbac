//! `imds-guard explain`: why one pod is blocked or allowed. Kubernetes mode
//! answers what the policy decided and why, and where the pod's cgroup is
//! ([`PodFacts`]); the endpoint adds what the node holds: the allow-map
//! entry, the programs and guards in force, the pod's counters and recent
//! attempts ([`Explanation`]). The same JSON goes to the node-local client
//! and, through the API server's pod proxy, to the kubectl plugin, which
//! both render it with [`render`].

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Which pod to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodQuery {
    /// By UID: what the network endpoint takes (see `http`).
    Uid(String),
    /// By namespace and name: the node-local socket only.
    Name { namespace: String, name: String },
}

/// A question to Kubernetes mode, answered from its view of the node.
#[derive(Debug)]
pub struct ExplainRequest {
    pub pod: PodQuery,
    /// `None`: no such pod on this node.
    pub reply: oneshot::Sender<Option<PodFacts>>,
}

/// Why the namespace may (or may not) let its pods ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// Listed in `kubernetes.allowNamespaces` (`--allow-namespace`).
    Listed,
    /// Its label says so.
    NamespaceLabel,
    /// Known, and neither listed nor labelled.
    NotPermitted,
    /// Not seen by the namespace watch (yet): only the list can permit it.
    NamespaceUnknown,
}

/// What the policy made of the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Allowed,
    /// Its namespace is in audit mode: attempts get through and are reported.
    Audited,
    /// It does not ask.
    Blocked,
    /// It asks, but its namespace does not permit it.
    LabelIgnored,
}

impl Outcome {
    /// The allow-map entry the outcome needs (`allow`, `audit`, or none).
    pub fn map_entry(self) -> Option<&'static str> {
        match self {
            Outcome::Allowed => Some("allow"),
            Outcome::Audited => Some("audit"),
            Outcome::Blocked | Outcome::LabelIgnored => None,
        }
    }
}

/// The label policy's settings that bear on a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTerms {
    pub label_key: String,
    pub pod_allow_value: String,
    pub namespace_allow_value: String,
    pub mode_label_key: String,
}

/// A pod's cgroup, once found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundCgroup {
    pub id: u64,
    pub path: PathBuf,
}

/// What Kubernetes mode knows of one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodFacts {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub policy: PolicyTerms,
    /// The pod's value of the policy's label, if it has the label.
    pub pod_label: Option<String>,
    pub permission: Permission,
    pub audit_namespace: bool,
    pub outcome: Outcome,
    /// The pod cgroup subtree looked in.
    pub pod_subtree: PathBuf,
    pub cgroup: Option<FoundCgroup>,
}

/// Refusals counted for the pod's cgroup, by hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    pub connect: u64,
    pub sendmsg: u64,
    pub egress: u64,
}

/// A route to denied destinations besides pod sockets, as the node has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    pub what: String,
    pub closed: bool,
}

/// One attempt of the pod the kernel reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub destination: String,
    pub hook: String,
    pub verdict: String,
}

/// The whole answer about one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    #[serde(flatten)]
    pub pod: PodFacts,
    /// What the node's allow map holds for the pod's cgroup (`allow`,
    /// `audit`), read from the kernel; `None` when it holds nothing.
    pub allow_map_entry: Option<String>,
    pub programs_attached: usize,
    pub programs_expected: usize,
    pub guards: Vec<Guard>,
    pub refusals: Refusals,
    /// Newest last.
    pub recent_attempts: Vec<Attempt>,
}

/// Attempts kept per cgroup, and cgroups kept.
const ATTEMPTS_PER_CGROUP: usize = 8;
const CGROUPS_KEPT: usize = 1024;

/// The last attempts from each cgroup, by cgroup id: the event reader
/// records them, `explain` reads those of a pod's cgroups.
#[derive(Clone, Debug, Default)]
pub struct RecentAttempts(Arc<Mutex<BTreeMap<u64, VecDeque<Attempt>>>>);

impl RecentAttempts {
    pub fn record(&self, cgroup_id: u64, attempt: Attempt) {
        let mut cgroups = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !cgroups.contains_key(&cgroup_id) && cgroups.len() >= CGROUPS_KEPT {
            // The cgroup whose last attempt is oldest makes room.
            let oldest = cgroups
                .iter()
                .min_by_key(|(_, attempts)| attempts.back().map_or(0, |a| a.at))
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                cgroups.remove(&id);
            }
        }
        let attempts = cgroups.entry(cgroup_id).or_default();
        if attempts.len() == ATTEMPTS_PER_CGROUP {
            attempts.pop_front();
        }
        attempts.push_back(attempt);
    }

    /// The last attempts from any of `cgroup_ids`, newest last.
    pub fn of(&self, cgroup_ids: &BTreeSet<u64>) -> Vec<Attempt> {
        let mut attempts: Vec<Attempt> = {
            let cgroups = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            cgroup_ids
                .iter()
                .filter_map(|id| cgroups.get(id))
                .flatten()
                .cloned()
                .collect()
        };
        attempts.sort_by_key(|a| a.at);
        let keep = attempts.len().saturating_sub(ATTEMPTS_PER_CGROUP);
        attempts.split_off(keep)
    }
}

/// Seconds since the Unix epoch now.
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Explanation {
    /// The verdict in one sentence: what decided it, and what would change it.
    pub fn reason(&self) -> String {
        let pod = &self.pod;
        let terms = &pod.policy;
        let asks = format!("{}={}", terms.label_key, terms.pod_allow_value);
        let permits = format!("{}={}", terms.label_key, terms.namespace_allow_value);
        let namespace = &pod.namespace;
        let permitted_by = match pod.permission {
            Permission::Listed => format!("namespace {namespace} is listed in allowNamespaces"),
            Permission::NamespaceLabel => format!("namespace {namespace} has the label {permits}"),
            Permission::NotPermitted | Permission::NamespaceUnknown => String::new(),
        };
        match pod.outcome {
            Outcome::Allowed => format!("ALLOWED: the pod has the label {asks} and {permitted_by}"),
            Outcome::Audited => format!(
                "AUDITED: namespace {namespace} has the label {}=audit: the pod's attempts \
                 reach the metadata API and are reported (log, metrics, Events)",
                terms.mode_label_key
            ),
            Outcome::LabelIgnored => format!(
                "BLOCKED: the pod has the label {asks}, but namespace {namespace} {}: label the \
                 namespace {permits} or list it in allowNamespaces",
                if pod.permission == Permission::NamespaceUnknown {
                    "is not known to the daemon yet (the namespace watch has not seen it)"
                } else {
                    "does not permit its pods to ask"
                }
            ),
            Outcome::Blocked => match &pod.pod_label {
                Some(value) => format!(
                    "BLOCKED: the pod's label {} is {value:?}, not {:?}",
                    terms.label_key, terms.pod_allow_value
                ),
                None => format!("BLOCKED: the pod does not have the label {asks}"),
            },
        }
    }

    /// Where the node disagrees with the decision, or cannot enforce it.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let wanted = self.pod.outcome.map_entry();
        match (&self.pod.cgroup, wanted, self.allow_map_entry.as_deref()) {
            (None, Some(_), _) => problems.push(format!(
                "its cgroup is not found under {}: the allow entry is written as soon as it \
                 appears (until then the pod is refused)",
                self.pod.pod_subtree.display()
            )),
            (Some(_), Some(want), have) if have != Some(want) => problems.push(format!(
                "the allow map holds {} for its cgroup, not {want}: a write is pending or \
                 failing (imds_guard_errors_total{{kind=\"map_write\"}}, the daemon's log)",
                have.unwrap_or("nothing")
            )),
            (Some(_), None, Some(have)) => problems.push(format!(
                "the allow map still holds {have} for its cgroup, which the policy does not \
                 list: a write is pending or failing"
            )),
            _ => {}
        }
        if self.programs_attached < self.programs_expected {
            problems.push(format!(
                "only {} of {} programs are attached on this node",
                self.programs_attached, self.programs_expected
            ));
        }
        problems
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// The human-readable form.
pub fn render(explanation: &Explanation) -> String {
    let pod = &explanation.pod;
    let terms = &pod.policy;
    let permission = match pod.permission {
        Permission::Listed => "yes: listed in allowNamespaces".to_owned(),
        Permission::NamespaceLabel => format!(
            "yes: label {}={}",
            terms.label_key, terms.namespace_allow_value
        ),
        Permission::NotPermitted => format!(
            "no: neither listed in allowNamespaces nor labelled {}={}",
            terms.label_key, terms.namespace_allow_value
        ),
        Permission::NamespaceUnknown => "unknown: the namespace watch has not seen it".to_owned(),
    };
    let cgroup = pod.cgroup.as_ref().map_or_else(
        || format!("not found under {}", pod.pod_subtree.display()),
        |c| format!("{} (id {})", c.path.display(), c.id),
    );
    let mut lines = vec![
        format!("pod         {}/{} ({})", pod.namespace, pod.name, pod.uid),
        format!("node        {}", pod.node),
        format!("verdict     {}", explanation.reason()),
        format!(
            "pod label   {}: {}",
            terms.label_key,
            pod.pod_label
                .as_deref()
                .map_or_else(|| "absent".to_owned(), |v| format!("{v:?}"))
        ),
        format!(
            "namespace   {} permits pods to ask: {permission}",
            pod.namespace
        ),
        format!(
            "audit mode  {} ({}=audit on the namespace)",
            yes_no(pod.audit_namespace),
            terms.mode_label_key
        ),
        format!("cgroup      {cgroup}"),
        format!(
            "allow map   {}",
            explanation
                .allow_map_entry
                .as_deref()
                .map_or_else(|| "no entry (refused)".to_owned(), |e| format!("entry {e}"))
        ),
        format!(
            "programs    {} of {} attached",
            explanation.programs_attached, explanation.programs_expected
        ),
        "node guards".to_owned(),
    ];
    lines.extend(explanation.guards.iter().map(|g| {
        let state = if g.closed { "closed" } else { "OPEN" };
        format!("  {state:<6}  {}", g.what)
    }));
    let r = explanation.refusals;
    lines.push(format!(
        "refused     connect {}, sendmsg {}, egress {}",
        r.connect, r.sendmsg, r.egress
    ));
    if explanation.recent_attempts.is_empty() {
        lines.push("attempts    none recorded since the daemon started".to_owned());
    } else {
        lines.push("attempts    (newest last)".to_owned());
        lines.extend(explanation.recent_attempts.iter().map(|a| {
            let at = i64::try_from(a.at)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .map_or_else(|| a.at.to_string(), |t| t.to_string());
            format!("  {at}  {:<8} {:<8} {}", a.verdict, a.hook, a.destination)
        }));
    }
    let problems = explanation.problems();
    if !problems.is_empty() {
        lines.push("problems".to_owned());
        lines.extend(problems.iter().map(|p| format!("  {p}")));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Asking a daemon, on the node or through the API server.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "cannot reach the daemon at {socket}: {source} (is `imds-guard run` running with \
         --status-socket there?)"
    )]
    NodeLocal {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon answered {status}: {message}")]
    Daemon { status: u16, message: String },
    #[error("the daemon's answer is not an explanation: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("cannot read pod {pod}: {source}")]
    Pod { pod: String, source: kube::Error },
    #[error("pod {0} is not scheduled to a node yet: no daemon decides for it until it is")]
    NotScheduled(String),
    #[error("cannot list imds-guard's daemon pods in namespace {namespace}: {source}")]
    DaemonPods {
        namespace: String,
        source: kube::Error,
    },
    #[error(
        "no running imds-guard daemon on node {node} (pods labelled {DAEMON_LABEL} in \
         namespace {namespace}): what is pinned there still refuses, but nothing follows the \
         policy"
    )]
    NoDaemon { node: String, namespace: String },
    #[error("daemon pod {0} has no container port named {DAEMON_PORT_NAME}")]
    NoPort(String),
    #[error(
        "the API server refused the pod proxy to daemon pod {namespace}/{pod}: {message} \
         (explain needs `get` on pods/proxy in namespace {namespace}: bind the Role \
         imds-guard-explain, deploy/base/explain-rbac.yaml)"
    )]
    ProxyForbidden {
        namespace: String,
        pod: String,
        message: String,
    },
    #[error("asking daemon pod {namespace}/{pod} through the API server's pod proxy: {source}")]
    Proxy {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
    #[error("building the pod proxy request: {0}")]
    Request(#[source] http::Error),
}

/// The API access the kubectl plugin uses in the daemon's namespace, beyond
/// reading the pod asked about: (API group, resource, verbs). The Role
/// imds-guard-explain must grant exactly this; a test checks it.
pub const EXPLAIN_ACCESS: [(&str, &str, &[&str]); 2] =
    [("", "pods", &["list"]), ("", "pods/proxy", &["get"])];

/// The daemon pods' label, as deploy/base/daemonset.yaml sets it.
pub const DAEMON_LABEL: &str = "app.kubernetes.io/name=imds-guard";
/// The daemon container's HTTP port, as deploy/base/daemonset.yaml names it.
pub const DAEMON_PORT_NAME: &str = "http-metrics";

fn parse(body: &str) -> Result<Explanation, ExplainError> {
    serde_json::from_str(body).map_err(ExplainError::Malformed)
}

/// Asks the daemon on this node, by the pod's namespace and name.
pub fn ask_node_local(
    socket: &std::path::Path,
    namespace: &str,
    name: &str,
) -> Result<Explanation, ExplainError> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("namespace", namespace)
        .append_pair("name", name)
        .finish();
    let (status, body) = super::http::get_node_local(socket, &format!("/explain?{query}"))
        .map_err(|source| ExplainError::NodeLocal {
            socket: socket.to_path_buf(),
            source,
        })?;
    if status != 200 {
        return Err(ExplainError::Daemon {
            status,
            message: body.trim().to_owned(),
        });
    }
    parse(&body)
}

/// Asks the daemon on the pod's node from a workstation: reads the pod with
/// the caller's credentials (so the API server decides whether they may
/// see it), finds the daemon pod on its node, and asks it by the pod's UID
/// through the API server's pod proxy (which decides whether they may).
pub async fn ask_through_api(
    client: kube::Client,
    namespace: &str,
    name: &str,
    daemon_namespace: &str,
) -> Result<Explanation, ExplainError> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::{Api, api::ListParams};

    let shown = format!("{namespace}/{name}");
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| ExplainError::Pod {
            pod: shown.clone(),
            source,
        })?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| ExplainError::NotScheduled(shown.clone()))?;
    let daemons = Api::<Pod>::namespaced(client.clone(), daemon_namespace)
        .list(
            &ListParams::default()
                .labels(DAEMON_LABEL)
                .fields(&format!("spec.nodeName={node}")),
        )
        .await
        .map_err(|source| ExplainError::DaemonPods {
            namespace: daemon_namespace.to_owned(),
            source,
        })?;
    let daemon = daemons
        .items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .ok_or_else(|| ExplainError::NoDaemon {
            node: node.clone(),
            namespace: daemon_namespace.to_owned(),
        })?;
    let daemon_name = daemon.metadata.name.clone().unwrap_or_default();
    let port = daemon
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(DAEMON_PORT_NAME))
        .map(|p| p.container_port)
        .ok_or_else(|| ExplainError::NoPort(daemon_name.clone()))?;
    let request = http::Request::get(format!(
        "/api/v1/namespaces/{daemon_namespace}/pods/{daemon_name}:{port}/proxy/explain/{uid}"
    ))
    .body(Vec::new())
    .map_err(ExplainError::Request)?;
    let body = client
        .request_text(request)
        .await
        .map_err(|source| match source {
            kube::Error::Api(status) if status.code == 403 => ExplainError::ProxyForbidden {
                namespace: daemon_namespace.to_owned(),
                pod: daemon_name.clone(),
                message: status.message,
            },
            kube::Error::Api(status) => ExplainError::Daemon {
                status: status.code,
                message: status.message,
            },
            source => ExplainError::Proxy {
                namespace: daemon_namespace.to_owned(),
                pod: daemon_name.clone(),
                source,
            },
        })?;
    parse(&body)
}

/// A pod as kubectl names it: `pod/NAME` (or `pods/`, `po/`) or `NAME`.
pub fn pod_name(argument: &str) -> Result<&str, String> {
    let name = match argument.split_once('/') {
        None => argument,
        Some(("pod" | "pods" | "po", name)) => name,
        Some((kind, _)) => {
            return Err(format!(
                "{argument:?}: explain takes a pod (pod/NAME or NAME, with -n NAMESPACE), not a {kind}"
            ));
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "{argument:?}: not a pod name (pod/NAME or NAME, with -n NAMESPACE)"
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explanation(outcome: Outcome, permission: Permission) -> Explanation {
        Explanation {
            pod: PodFacts {
                node: "node-1".to_owned(),
                namespace: "shop".to_owned(),
                name: "web".to_owned(),
                uid: "0f6c".to_owned(),
                policy: PolicyTerms {
                    label_key: "imds-guard.io/metadata-access".to_owned(),
                    pod_allow_value: "allow".to_owned(),
                    namespace_allow_value: "allow-pods".to_owned(),
                    mode_label_key: "imds-guard.io/mode".to_owned(),
                },
                pod_label: Some("allow".to_owned()),
                permission,
                audit_namespace: outcome == Outcome::Audited,
                outcome,
                pod_subtree: PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
                cgroup: Some(FoundCgroup {
                    id: 4242,
                    path: PathBuf::from("/sys/fs/cgroup/kubepods.slice/kubepods-pod0f6c.slice"),
                }),
            },
            allow_map_entry: outcome.map_entry().map(str::to_owned),
            programs_attached: 5,
            programs_expected: 5,
            guards: vec![Guard {
                what: "forwarded packets".to_owned(),
                closed: true,
            }],
            refusals: Refusals::default(),
            recent_attempts: Vec::new(),
        }
    }

    #[test]
    fn the_reason_names_what_decided() {
        let cases = [
            (
                Outcome::Allowed,
                Permission::NamespaceLabel,
                None,
                "ALLOWED: the pod has the label imds-guard.io/metadata-access=allow and namespace \
                 shop has the label imds-guard.io/metadata-access=allow-pods",
            ),
            (
                Outcome::Allowed,
                Permission::Listed,
                None,
                "ALLOWED: the pod has the label imds-guard.io/metadata-access=allow and namespace \
                 shop is listed in allowNamespaces",
            ),
            (
                Outcome::LabelIgnored,
                Permission::NotPermitted,
                None,
                "BLOCKED: the pod has the label imds-guard.io/metadata-access=allow, but namespace \
                 shop does not permit its pods to ask",
            ),
            (
                Outcome::LabelIgnored,
                Permission::NamespaceUnknown,
                None,
                "namespace shop is not known to the daemon yet",
            ),
            (
                Outcome::Blocked,
                Permission::NotPermitted,
                Some(None),
                "BLOCKED: the pod does not have the label imds-guard.io/metadata-access=allow",
            ),
            (
                Outcome::Blocked,
                Permission::NamespaceLabel,
                Some(Some("yes")),
                "BLOCKED: the pod's label imds-guard.io/metadata-access is \"yes\", not \"allow\"",
            ),
            (
                Outcome::Audited,
                Permission::NotPermitted,
                Some(None),
                "AUDITED: namespace shop has the label imds-guard.io/mode=audit",
            ),
        ];
        for (outcome, permission, pod_label, want) in cases {
            let mut e = explanation(outcome, permission);
            if let Some(label) = pod_label {
                e.pod.pod_label = label.map(str::to_owned);
            }
            let reason = e.reason();
            assert!(reason.contains(want), "{outcome:?}: {reason}");
            assert!(e.problems().is_empty(), "{:?}", e.problems());
        }
    }

    #[test]
    fn problems_are_where_the_node_disagrees_with_the_policy() {
        let mut missing_cgroup = explanation(Outcome::Allowed, Permission::Listed);
        missing_cgroup.pod.cgroup = None;
        missing_cgroup.allow_map_entry = None;
        let mut entry_missing = explanation(Outcome::Allowed, Permission::Listed);
        entry_missing.allow_map_entry = None;
        let mut entry_stale = explanation(Outcome::Blocked, Permission::NotPermitted);
        entry_stale.allow_map_entry = Some("allow".to_owned());
        let mut wrong_entry = explanation(Outcome::Audited, Permission::NotPermitted);
        wrong_entry.allow_map_entry = Some("allow".to_owned());
        let mut detached = explanation(Outcome::Blocked, Permission::NotPermitted);
        detached.programs_attached = 3;
        let cases = [
            (
                missing_cgroup,
                "its cgroup is not found under /sys/fs/cgroup/kubepods.slice",
            ),
            (
                entry_missing,
                "the allow map holds nothing for its cgroup, not allow",
            ),
            (
                entry_stale,
                "the allow map still holds allow for its cgroup",
            ),
            (
                wrong_entry,
                "the allow map holds allow for its cgroup, not audit",
            ),
            (detached, "only 3 of 5 programs are attached"),
        ];
        for (e, want) in cases {
            let problems = e.problems();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(want), "{problems:?}");
            assert!(render(&e).contains(want));
        }
    }

    #[test]
    fn json_and_text_carry_every_fact() {
        let mut e = explanation(Outcome::Allowed, Permission::NamespaceLabel);
        e.recent_attempts = vec![Attempt {
            at: 1_796_000_000,
            destination: "169.254.169.254:80".to_owned(),
            hook: "connect".to_owned(),
            verdict: "refused".to_owned(),
        }];
        e.refusals.connect = 3;
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["outcome"], "allowed");
        assert_eq!(json["permission"], "namespace-label");
        assert_eq!(json["cgroup"]["id"], 4242);
        assert_eq!(json["allow_map_entry"], "allow");
        let back: Explanation = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, e);
        let text = render(&e);
        for want in [
            "pod         shop/web (0f6c)",
            "node        node-1",
            "cgroup      /sys/fs/cgroup/kubepods.slice/kubepods-pod0f6c.slice (id 4242)",
            "allow map   entry allow",
            "programs    5 of 5 attached",
            "closed  forwarded packets",
            "refused     connect 3, sendmsg 0, egress 0",
            "2026-11-30T00:53:20Z  refused  connect  169.254.169.254:80",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[test]
    fn recent_attempts_are_bounded_and_merged_newest_last() {
        let recent = RecentAttempts::default();
        let attempt = |at| Attempt {
            at,
            destination: format!("d{at}"),
            hook: "connect".to_owned(),
            verdict: "refused".to_owned(),
        };
        for at in 0..20 {
            recent.record(if at % 2 == 0 { 1 } else { 2 }, attempt(at));
        }
        let both = recent.of(&BTreeSet::from([1, 2]));
        let times: Vec<u64> = both.iter().map(|a| a.at).collect();
        assert_eq!(times, (12..20).collect::<Vec<_>>());
        assert_eq!(recent.of(&BTreeSet::from([3])), Vec::new());
        for id in 10..10 + CGROUPS_KEPT as u64 {
            recent.record(id, attempt(100 + id));
        }
        // The cgroups with the oldest attempts made room.
        assert!(recent.of(&BTreeSet::from([1])).is_empty());
        assert!(recent.of(&BTreeSet::from([2])).is_empty());
        assert_eq!(recent.of(&BTreeSet::from([10])).len(), 1);
    }

    #[test]
    fn pods_are_named_as_kubectl_names_them() {
        let cases = [
            ("web", Ok("web")),
            ("pod/web", Ok("web")),
            ("pods/web", Ok("web")),
            ("po/web", Ok("web")),
            ("deployment/web", Err("not a deployment")),
            ("pod/", Err("not a pod name")),
            ("shop/web", Err("not a shop")),
            ("pod/a/b", Err("not a pod name")),
        ];
        for (argument, want) in cases {
            match (pod_name(argument), want) {
                (Ok(name), Ok(want)) => assert_eq!(name, want),
                (Err(err), Err(want)) => assert!(err.contains(want), "{argument}: {err}"),
                (got, want) => panic!("{argument}: {got:?}, want {want:?}"),
            }
        }
    }
}
