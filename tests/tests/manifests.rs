//! The deployment manifests (deploy/), as `kubectl kustomize` renders them:
//! valid against the Kubernetes API schemas, carrying what the daemon needs
//! and nothing more, with a configuration the daemon accepts, and an
//! admission policy that rejects every metadata address the daemon denies.
//!
//! And the optional monitoring bundle (deploy/monitoring): valid against
//! the prometheus-operator CRD schemas, every alert passing its promtool
//! unit tests, the dashboard what its generator builds.
//!
//! Needs kubectl, kubernetes-validate, promtool (Debian's prometheus),
//! python3 with cloudcoil-models-prometheus-operator and
//! grafana-foundation-sdk (`cargo xtask setup` installs all but kubectl);
//! no root, no cluster.

use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use enforcer_user::{
    config::{
        Common, Kubernetes, KubernetesSection, Layer, Mode, ModeSettings as _, Preset, Stack as _,
        rules::Action,
    },
    k8s::{API_ACCESS, STARTUP_TAINT_ACCESS},
    report::explain::EXPLAIN_ACCESS,
};
use imds_guard_tests::monitoring;
use kube_cel::{KubeCelExt as _, cel};
use serde_json::{Value, json};

/// The Kubernetes release the manifests are validated against (the API
/// version kube-rs is built for in this workspace).
const KUBERNETES_VERSION: &str = "1.34.0";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// Runs a tool that must be installed, feeding it `stdin`; a missing tool
/// fails the test, saying how to get it.
fn run_tool(program: &str, args: &[&str], stdin: &str, install_hint: &str) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run `{program}` ({err}): {install_hint}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("writing to the tool's stdin");
    let out = child.wait_with_output().expect("waiting for the tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl kustomize DIR`: the YAML text and its documents.
fn render(dir: &str) -> (String, Vec<Value>) {
    let (ok, yaml) = run_tool(
        "kubectl",
        &["kustomize", dir],
        "",
        "kubectl (with its built-in kustomize) is needed to render deploy/",
    );
    assert!(ok, "kubectl kustomize {dir} failed:\n{yaml}");
    (yaml.clone(), documents(&yaml))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn base() -> Vec<Value> {
    render("deploy").1
}

fn audit() -> Vec<Value> {
    render("deploy/overlays/audit").1
}

/// Every overlay a user may apply.
const OVERLAYS: [&str; 5] = [
    "deploy/overlays/audit",
    "deploy/overlays/packet-socket-lsm",
    "deploy/overlays/startup-taint",
    "deploy/overlays/kernel-5.10",
    "deploy/overlays/hybrid-cgroups",
];

/// The DaemonSet of some rendered manifests.
fn daemonset(docs: &[Value]) -> &Value {
    find(docs, "DaemonSet", "imds-guard")
}

/// The one document of `kind` (and `name`, when several could match).
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// The value at a JSON pointer, which must be there.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("nothing at {pointer} in {value:#}"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Validates YAML documents with kubernetes-validate, strictly (unknown
/// fields are errors). It passes a kind it has no schema for with only a
/// warning, so every document must be reported as passed.
fn validate(label: &str, yaml: &str) {
    let expected = documents(yaml).len();
    let (ok, report) = run_tool(
        "kubernetes-validate",
        &["--strict", "--kubernetes-version", KUBERNETES_VERSION, "-"],
        yaml,
        "install it with `cargo xtask setup` (pip install kubernetes-validate)",
    );
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        ok && passed == expected,
        "{label}: {passed} of {expected} documents passed strict validation against \
         Kubernetes {KUBERNETES_VERSION}:\n{report}"
    );
}

#[test]
fn every_rendered_document_is_valid_kubernetes() {
    for dir in std::iter::once("deploy").chain(OVERLAYS) {
        validate(dir, &render(dir).0);
    }
    // The end-to-end harnesses' objects cannot run here; they can be checked.
    let root = workspace_root();
    let read = |file: &str| {
        std::fs::read_to_string(root.join("deploy/e2e").join(file))
            .unwrap_or_else(|err| panic!("reading deploy/e2e/{file}: {err}"))
    };
    let clients = documents(&read("pods.yaml"));
    let items = clients[0]["items"]
        .as_array()
        .expect("deploy/e2e/pods.yaml is one List");
    let items: Vec<String> = items
        .iter()
        .map(|item| serde_yaml_ng::to_string(item).expect("serializable"))
        .collect();
    validate("deploy/e2e/pods.yaml", &items.join("---\n"));
    for file in ["endpointslice-metadata.yaml", "endpointslice-ordinary.yaml"] {
        validate(file, &read(file));
    }
}

/// Every `key: true` anywhere below `value`.
fn paths_set_true(value: &Value, key: &str, path: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}/{k}");
                if k == key && *v == Value::Bool(true) {
                    found.push(here.clone());
                }
                paths_set_true(v, key, &here, found);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                paths_set_true(v, key, &format!("{path}/{i}"), found);
            }
        }
        _ => {}
    }
}

/// Nothing is privileged or shares the host's PID or IPC namespace; only
/// the DaemonSet's pod shares the node's network (the node edge guard
/// works there).
#[test]
fn nothing_is_privileged_or_shares_host_namespaces_but_the_network() {
    for docs in std::iter::once(base()).chain(OVERLAYS.map(|dir| render(dir).1)) {
        for (key, allowed) in [
            ("privileged", vec![]),
            (
                "hostNetwork",
                vec!["\"DaemonSet\"/spec/template/spec/hostNetwork"],
            ),
            ("hostPID", vec![]),
            ("hostIPC", vec![]),
            ("allowPrivilegeEscalation", vec![]),
        ] {
            let mut found = Vec::new();
            for doc in &docs {
                paths_set_true(doc, key, &format!("{}", doc["kind"]), &mut found);
            }
            assert_eq!(found, allowed, "{key}: true at {found:?}");
        }
    }
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn daemonset_has_what_the_daemon_needs_and_no_more() {
    let docs = base();
    let daemonset = find(&docs, "DaemonSet", "imds-guard");
    let pod = at(daemonset, "/spec/template/spec");
    let containers = at(pod, "/containers").as_array().expect("a list");
    assert_eq!(containers.len(), 1, "one container: the daemon");
    let container = &containers[0];

    // The daemon's contract.
    let args: Vec<&str> = at(container, "/args")
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--config",
            "/etc/imds-guard/config.yaml",
            "--cgroup-root",
            "/host/sys/fs/cgroup",
            "--bpffs-dir",
            "/host/sys/fs/bpf/imds-guard",
            "--http-listen",
            "0.0.0.0:9464",
            "--status-socket",
            "/run/imds-guard/status.sock",
        ]
    );
    assert_eq!(
        at(pod, "/hostNetwork"),
        true,
        "the node edge guard's namespace"
    );
    assert_eq!(at(pod, "/dnsPolicy"), "ClusterFirstWithHostNet");
    let node_name = at(container, "/env")
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        at(node_name, "/valueFrom/fieldRef/fieldPath"),
        "spec.nodeName"
    );
    assert_eq!(
        at(container, "/image"),
        &json!(format!("imds-guard:{}", env!("CARGO_PKG_VERSION"))),
        "the image `cargo xtask image` builds"
    );

    // Metrics and health on one named port.
    assert_eq!(
        at(container, "/ports"),
        &json!([{"name": "http-metrics", "containerPort": 9464, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(container, &format!("/{probe}/httpGet"));
        assert_eq!(
            (&get["path"], &get["port"]),
            (&json!(path), &json!("http-metrics")),
            "{probe}"
        );
    }

    // Least privilege: two capabilities, root without the rest, no host
    // namespaces, a read-only root.
    let security = at(container, "/securityContext");
    assert_eq!(
        strings(at(security, "/capabilities/add")),
        set(&["BPF", "NET_ADMIN"])
    );
    assert_eq!(strings(at(security, "/capabilities/drop")), set(&["ALL"]));
    assert_eq!(at(security, "/runAsUser"), 0);
    assert_eq!(at(security, "/allowPrivilegeEscalation"), false);
    assert_eq!(at(security, "/readOnlyRootFilesystem"), true);
    assert_eq!(at(security, "/seccompProfile/type"), "RuntimeDefault");
    assert_eq!(
        at(pod, "/automountServiceAccountToken"),
        true,
        "it uses the API"
    );

    // Exactly three host paths: the host's cgroup hierarchy, read-only,
    // its bpffs, where pins outlive the pod, and the node-local socket's
    // directory.
    let mounts: HashMap<&str, &Value> = at(container, "/volumeMounts")
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| (m["name"].as_str().expect("named"), m))
        .collect();
    let host_paths: HashMap<&str, &str> = at(pod, "/volumes")
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v.pointer("/hostPath/path")?.as_str()?)))
        .collect();
    assert_eq!(
        host_paths,
        HashMap::from([
            ("host-cgroup", "/sys/fs/cgroup"),
            ("bpffs", "/sys/fs/bpf"),
            ("status", "/run/imds-guard")
        ])
    );
    assert_eq!(mounts["status"]["mountPath"], "/run/imds-guard");
    let cgroup = mounts["host-cgroup"];
    assert_eq!(
        (
            &cgroup["mountPath"],
            &cgroup["readOnly"],
            &cgroup["recursiveReadOnly"]
        ),
        (
            &json!("/host/sys/fs/cgroup"),
            &json!(true),
            &json!("IfPossible")
        ),
        "read-only all the way down where the runtime can"
    );
    let bpffs = mounts["bpffs"];
    // Not under /sys/fs: the default AppArmor profile denies writes there.
    assert_eq!(bpffs["mountPath"], "/host/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");
    assert_ne!(
        bpffs["readOnly"], true,
        "pins are written to the host's bpffs"
    );
    let config = mounts["config"];
    assert_eq!(
        (&config["mountPath"], &config["readOnly"]),
        (&json!("/etc/imds-guard"), &json!(true))
    );

    // On every node, before anything else, one node at a time.
    assert!(
        at(pod, "/tolerations")
            .as_array()
            .expect("a list")
            .contains(&json!({"operator": "Exists"})),
        "a toleration of every taint"
    );
    assert_eq!(at(pod, "/priorityClassName"), "system-node-critical");
    assert_eq!(
        at(
            daemonset,
            "/spec/updateStrategy/rollingUpdate/maxUnavailable"
        ),
        1
    );
    for resource in ["requests", "limits"] {
        for kind in ["cpu", "memory"] {
            at(container, &format!("/resources/{resource}/{kind}"));
        }
    }
}

/// The DaemonSet's pod spec with the paths an overlay may change removed.
fn without(daemonset: &Value, pointers: &[&str]) -> Value {
    let mut copy = daemonset.clone();
    for pointer in pointers {
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        let parent = copy.pointer_mut(parent).expect("present");
        match parent {
            Value::Object(map) => {
                map.remove(key);
            }
            Value::Array(items) => {
                items.remove(key.parse::<usize>().expect("an index"));
            }
            _ => panic!("{pointer} is not in a map or list"),
        }
    }
    copy
}

/// The hostPath of volume `name`, and the DaemonSet without it, its volumes
/// in name order (a strategic merge may reorder them).
fn split_host_path(daemonset: &Value, name: &str) -> (String, Value) {
    let mut copy = daemonset.clone();
    let volumes = copy
        .pointer_mut("/spec/template/spec/volumes")
        .and_then(Value::as_array_mut)
        .expect("volumes");
    volumes.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_owned());
    let volume = volumes
        .iter_mut()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    let path = volume
        .pointer_mut("/hostPath/path")
        .map(Value::take)
        .and_then(|p| p.as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("volume {name} is no hostPath"));
    (path, copy)
}

#[test]
fn overlays_change_only_what_they_say() {
    const CAPABILITIES: &str = "/spec/template/spec/containers/0/securityContext/capabilities/add";
    let base_docs = base();
    let base = daemonset(&base_docs);

    let kernel_docs = render("deploy/overlays/kernel-5.10").1;
    let kernel = daemonset(&kernel_docs);
    assert_eq!(
        strings(at(kernel, CAPABILITIES)),
        set(&["BPF", "NET_ADMIN", "SYS_RESOURCE"]),
        "kernels before 5.11 need CAP_SYS_RESOURCE to raise RLIMIT_MEMLOCK"
    );
    assert_eq!(
        without(kernel, &[&format!("{CAPABILITIES}/2")]),
        *base,
        "nothing else changes"
    );

    let hybrid_docs = render("deploy/overlays/hybrid-cgroups").1;
    let hybrid = daemonset(&hybrid_docs);
    let (base_path, base_rest) = split_host_path(base, "host-cgroup");
    let (hybrid_path, hybrid_rest) = split_host_path(hybrid, "host-cgroup");
    assert_eq!(
        (base_path.as_str(), hybrid_path.as_str()),
        ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
    );
    assert_eq!(hybrid_rest, base_rest, "only the cgroup hostPath changes");
    for overlay in [&kernel_docs, &hybrid_docs] {
        assert_eq!(overlay.len(), base_docs.len(), "the same objects");
    }

    let taint_docs = render("deploy/overlays/startup-taint").1;
    let tainted = daemonset(&taint_docs);
    let args_path = "/spec/template/spec/containers/0/args";
    let added = at(tainted, args_path).as_array().expect("args").len() - 1;
    assert_eq!(
        at(tainted, &format!("{args_path}/{added}")),
        "--startup-taint=imds-guard.io/not-ready"
    );
    assert_eq!(
        without(tainted, &[&format!("{args_path}/{added}")]),
        *base,
        "one argument more"
    );
    assert_eq!(
        taint_docs.len(),
        base_docs.len() + 4,
        "a ClusterRole, its binding, the node policy and its binding"
    );

    let lsm_docs = render("deploy/overlays/packet-socket-lsm").1;
    let lsm = daemonset(&lsm_docs);
    assert_eq!(
        strings(at(lsm, CAPABILITIES)),
        set(&["BPF", "NET_ADMIN", "PERFMON"]),
        "BPF LSM programs are tracing programs: CAP_PERFMON"
    );
    let added = at(lsm, args_path).as_array().expect("args").len() - 1;
    assert_eq!(
        at(lsm, &format!("{args_path}/{added}")),
        "--refuse-packet-sockets=on"
    );
    assert_eq!(
        without(
            lsm,
            &[
                &format!("{CAPABILITIES}/2"),
                &format!("{args_path}/{added}")
            ]
        ),
        *base,
        "one capability and one argument more"
    );
    assert_eq!(lsm_docs.len(), base_docs.len(), "the same objects");
}

#[test]
fn test_harness_runs_the_daemon_with_the_daemonsets_capabilities() {
    let docs = base();
    let added = strings(at(
        daemonset(&docs),
        "/spec/template/spec/containers/0/securityContext/capabilities/add",
    ));
    let harness: BTreeSet<String> = imds_guard_tests::privileges::DAEMONSET_CAPABILITIES
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    assert_eq!(
        added, harness,
        "tests/src/privileges.rs must grant what the manifest grants"
    );
}

/// What a ClusterRole or Role grants, as (API group, resource, verb).
fn granted(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in at(role, "/rules").as_array().expect("a list") {
        let keys: BTreeSet<&str> = rule
            .as_object()
            .expect("a rule is a map")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["apiGroups", "resources", "verbs"]),
            "no resourceNames, nonResourceURLs or anything else: {rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    granted
}

/// The daemon's declared API access, as (API group, resource, verb).
fn used(access: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    access
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|verb| {
                (
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect()
}

/// Checks that `binding` gives `role` to the account the daemon runs as,
/// and to no one else.
fn bound_to_the_daemon(docs: &[Value], binding: &str, role: &str) {
    let daemonset = find(docs, "DaemonSet", "imds-guard");
    let binding = find(docs, "ClusterRoleBinding", binding);
    assert_eq!(at(binding, "/roleRef/name"), role);
    assert_eq!(
        at(binding, "/subjects"),
        &json!([{
            "kind": "ServiceAccount",
            "name": at(daemonset, "/spec/template/spec/serviceAccountName"),
            "namespace": at(daemonset, "/metadata/namespace"),
        }])
    );
}

#[test]
fn cluster_role_grants_exactly_the_api_access_the_daemon_uses() {
    let docs = base();
    assert_eq!(
        granted(find(&docs, "ClusterRole", "imds-guard")),
        used(&API_ACCESS)
    );
    bound_to_the_daemon(&docs, "imds-guard", "imds-guard");
    assert!(
        !docs.iter().any(|d| d["kind"] == "ValidatingAdmissionPolicy"
            && d["metadata"]["name"] == "imds-guard-own-node-taint"),
        "no node access, and so no node policy, without the component"
    );
    // The startup-taint component adds node access, with its policy.
    let tainted = render("deploy/overlays/startup-taint").1;
    assert_eq!(
        granted(find(&tainted, "ClusterRole", "imds-guard-startup-taint")),
        used(&STARTUP_TAINT_ACCESS)
    );
    bound_to_the_daemon(
        &tainted,
        "imds-guard-startup-taint",
        "imds-guard-startup-taint",
    );
    // What `kubectl imds-guard explain` needs, in the daemon's namespace
    // only, and bound to no one by the manifests.
    let explain = find(&docs, "Role", "imds-guard-explain");
    assert_eq!(at(explain, "/metadata/namespace"), "imds-guard");
    assert_eq!(granted(explain), used(&EXPLAIN_ACCESS));
    assert!(
        !docs.iter().any(|d| d["kind"] == "RoleBinding"),
        "the explain Role is the administrator's to bind"
    );
}

/// The daemon's configuration file as the ConfigMap carries it.
fn config_text(docs: &[Value]) -> String {
    at(
        find(docs, "ConfigMap", "imds-guard-config"),
        "/data/config.yaml",
    )
    .as_str()
    .expect("config.yaml is text")
    .to_owned()
}

/// What the admission policy's binding does with a rejection.
fn admission_actions(docs: &[Value]) -> BTreeSet<String> {
    let binding = find(
        docs,
        "ValidatingAdmissionPolicyBinding",
        "imds-guard-metadata-endpoints",
    );
    strings(at(binding, "/spec/validationActions"))
}

/// Parses and resolves a configuration as `imds-guard run` does at start.
fn resolve(text: &str) -> Common {
    let file = Layer::parse(text).unwrap_or_else(|err| panic!("{err}:\n{text}"));
    let flags = Layer {
        kubernetes: Some(KubernetesSection {
            node_name: Some("node-1".to_owned()),
            ..KubernetesSection::default()
        }),
        ..Layer::default()
    };
    Kubernetes::validate(&flags.over(file.clone())).unwrap_or_else(|err| panic!("{err}:\n{text}"));
    Common::validate(&file).unwrap_or_else(|err| panic!("{err}:\n{text}"))
}

#[test]
fn shipped_configurations_are_valid_for_the_daemon() {
    let base = base();
    let audit = audit();
    assert_eq!(resolve(&config_text(&base)).mode, Mode::Enforce);
    assert_eq!(resolve(&config_text(&audit)).mode, Mode::Audit);
    // In audit mode the admission policy only warns and records, too.
    assert_eq!(admission_actions(&base), set(&["Deny"]));
    assert_eq!(admission_actions(&audit), set(&["Warn", "Audit"]));
}

/// Every deny prefix of the daemon: its defaults and every preset's, as the
/// daemon's own configuration code resolves them.
fn daemon_deny_prefixes() -> BTreeSet<String> {
    let presets = <Preset as clap::ValueEnum>::value_variants();
    let files = std::iter::once(Layer::default()).chain(presets.iter().map(|&preset| Layer {
        presets: Some(vec![preset]),
        ..Layer::default()
    }));
    files
        .flat_map(|file| {
            let common = Common::validate(&file).expect("built-in rules");
            common
                .rules
                .rules()
                .iter()
                .filter(|rule| rule.action == Action::Deny)
                .map(|rule| rule.prefix.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn admission_policy() -> Value {
    find(
        &base(),
        "ValidatingAdmissionPolicy",
        "imds-guard-metadata-endpoints",
    )
    .clone()
}

#[test]
fn admission_policy_names_every_address_the_daemon_denies() {
    let policy = admission_policy();
    let variables = at(&policy, "/spec/variables").as_array().expect("a list");
    let prefixes = variables
        .iter()
        .find(|v| v["name"] == "metadataPrefixes")
        .expect("a metadataPrefixes variable");
    // The CEL list's string literals.
    let named: BTreeSet<String> = at(prefixes, "/expression")
        .as_str()
        .expect("CEL text")
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert_eq!(named, daemon_deny_prefixes());
    let text = serde_json::to_string(&policy).expect("serializable");
    for address in [
        "169.254.169.254",
        "fd00:ec2::254",
        "169.254.170.2",
        "168.63.129.16",
        "100.100.100.200",
        "fd00:a9fe:a9fe::254",
    ] {
        assert!(text.contains(address), "the policy forgets {address}");
    }
}

/// Evaluates the policy as the API server would for `object` of `kind`:
/// its variables in order, then its validations. Returns the messages of
/// the validations that fail (an evaluation error fails too, as with
/// failurePolicy Fail).
fn admission_failures(policy: &Value, kind: &str, object: &Value) -> Vec<String> {
    let request = json!({"kind": {"group": "", "version": "v1", "kind": kind}});
    evaluate_policy(policy, &[("object", object), ("request", &request)])
}

/// The messages of the policy's validations that fail with these bindings
/// (`object`, `oldObject`, `request`), its variables evaluated first.
fn evaluate_policy(policy: &Value, bindings: &[(&str, &Value)]) -> Vec<String> {
    let mut context = cel::Context::default().with_all();
    for (name, value) in bindings {
        context
            .add_variable(*name, cel::to_value(value).expect("JSON value"))
            .unwrap_or_else(|err| panic!("binding {name}: {err}"));
    }
    let compile = |expression: &Value| {
        let text = expression.as_str().expect("CEL text");
        cel::Program::compile(text).unwrap_or_else(|err| panic!("{err}: {text}"))
    };
    let mut variables = HashMap::new();
    for variable in at(policy, "/spec/variables").as_array().expect("a list") {
        context.add_variable_from_value("variables", variables.clone());
        let value = compile(&variable["expression"])
            .execute(&context)
            .unwrap_or_else(|err| panic!("variable {}: {err}", variable["name"]));
        let name = variable["name"].as_str().expect("named").to_owned();
        variables.insert(name, value);
    }
    context.add_variable_from_value("variables", variables);
    at(policy, "/spec/validations")
        .as_array()
        .expect("a list")
        .iter()
        .filter(|validation| {
            !matches!(
                compile(&validation["expression"]).execute(&context),
                Ok(cel::Value::Bool(true))
            )
        })
        .map(|validation| validation["message"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn endpoint_slice(address_type: &str, address: &str) -> Value {
    json!({"addressType": address_type, "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": [address]}]})
}

fn endpoints(ready: &str, not_ready: &str) -> Value {
    json!({"subsets": [{"addresses": [{"ip": ready}], "notReadyAddresses": [{"ip": not_ready}]}]})
}

#[test]
fn admission_policy_rejects_endpoints_at_metadata_addresses_and_admits_others() {
    let policy = admission_policy();
    let rejected = |kind: &str, object: &Value| {
        assert!(
            !admission_failures(&policy, kind, object).is_empty(),
            "{kind} admitted: {object}"
        );
    };
    let admitted = |kind: &str, object: &Value| {
        let failures = admission_failures(&policy, kind, object);
        assert!(
            failures.is_empty(),
            "{kind} rejected ({failures:?}): {object}"
        );
    };
    for prefix in daemon_deny_prefixes() {
        let (address, _) = prefix.split_once('/').expect("a prefix");
        let family = if address.contains(':') {
            "IPv6"
        } else {
            "IPv4"
        };
        rejected("EndpointSlice", &endpoint_slice(family, address));
        rejected("Endpoints", &endpoints(address, "10.0.0.2"));
        rejected("Endpoints", &endpoints("10.0.0.2", address));
    }
    // Other spellings of a metadata address.
    rejected("EndpointSlice", &endpoint_slice("IPv6", "FD00:EC2:0::254"));
    rejected("EndpointSlice", &endpoint_slice("IPv4", "169.254.169.0254"));
    rejected(
        "EndpointSlice",
        &endpoint_slice("IPv6", "::ffff:169.254.169.254"),
    );
    // Neighbours, the default pass list (EKS Pod Identity, NodeLocal DNS),
    // names, and empty objects.
    for address in [
        "10.96.0.10",
        "169.254.169.253",
        "169.254.170.23",
        "169.254.20.10",
    ] {
        admitted("EndpointSlice", &endpoint_slice("IPv4", address));
        admitted("Endpoints", &endpoints(address, address));
    }
    admitted("EndpointSlice", &endpoint_slice("IPv6", "fd00:ec2::23"));
    admitted(
        "EndpointSlice",
        &endpoint_slice("FQDN", "metadata.google.internal"),
    );
    admitted("EndpointSlice", &json!({"addressType": "IPv4"}));
    admitted("Endpoints", &json!({}));
    admitted(
        "Endpoints",
        &json!({"subsets": [{"ports": [{"port": 80}]}]}),
    );
}

/// The daemon's own node, as the node-taint policy sees a patch of it.
fn tainted_node(taints: &[&str]) -> Value {
    json!({
        "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
        "spec": {
            "podCIDR": "10.244.1.0/24",
            "taints": taints.iter().map(|key| json!({"key": key, "effect": "NoSchedule"})).collect::<Vec<_>>(),
        },
    })
}

#[test]
fn node_taint_policy_names_the_daemons_account_and_taint() {
    let docs = render("deploy/overlays/startup-taint").1;
    // The policy names the account the daemon runs as and the taint it is
    // told to remove: a renamed namespace or key must change both.
    let daemonset = find(&docs, "DaemonSet", "imds-guard");
    let text = serde_json::to_string(find(
        &docs,
        "ValidatingAdmissionPolicy",
        "imds-guard-own-node-taint",
    ))
    .expect("serializable");
    let account = format!(
        "system:serviceaccount:{}:{}",
        at(daemonset, "/metadata/namespace")
            .as_str()
            .expect("a namespace"),
        at(daemonset, "/spec/template/spec/serviceAccountName")
            .as_str()
            .expect("a name")
    );
    assert!(
        text.contains(&format!("'{account}'")),
        "the policy matches {account}"
    );
    let args = strings(at(daemonset, "/spec/template/spec/containers/0/args"));
    let key = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--startup-taint="))
        .expect("the component sets the taint key");
    assert!(
        text.contains(&format!("'{key}'")),
        "the policy names the taint {key}"
    );
}

#[test]
fn node_taint_policy_lets_the_daemon_remove_only_its_taint_from_only_its_node() {
    let docs = render("deploy/overlays/startup-taint").1;
    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "imds-guard-own-node-taint",
    )
    .clone();
    let daemon = "system:serviceaccount:imds-guard:imds-guard";
    let condition = at(&policy, "/spec/matchConditions/0/expression")
        .as_str()
        .expect("CEL text")
        .to_owned();
    // The policy applies to the daemon's service account and nobody else.
    for (username, applies) in [
        (daemon, true),
        ("system:node:node-1", false),
        ("admin", false),
    ] {
        let mut context = cel::Context::default().with_all();
        let request = json!({"userInfo": {"username": username}});
        context
            .add_variable("request", cel::to_value(&request).expect("JSON"))
            .expect("binding request");
        let matched = cel::Program::compile(&condition)
            .expect("CEL")
            .execute(&context)
            .expect("evaluates");
        assert_eq!(matched, cel::Value::Bool(applies), "{username}");
    }
    let request = |claim: Option<&str>| {
        let extra = claim.map_or_else(
            || json!({}),
            |node| json!({"authentication.kubernetes.io/node-name": [node]}),
        );
        json!({"userInfo": {"username": daemon, "extra": extra}})
    };
    let before = tainted_node(&["imds-guard.io/not-ready", "example.com/other"]);
    let removed = tainted_node(&["example.com/other"]);
    let failures = |claim: Option<&str>, old: &Value, new: &Value| {
        evaluate_policy(
            &policy,
            &[
                ("object", new),
                ("oldObject", old),
                ("request", &request(claim)),
            ],
        )
    };
    assert_eq!(
        failures(Some("node-1"), &before, &removed),
        Vec::<String>::new()
    );
    let mut relabelled = removed.clone();
    relabelled["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("");
    let mut cordoned = removed.clone();
    cordoned["spec"]["unschedulable"] = json!(true);
    let mut recidr = removed.clone();
    recidr["spec"]["podCIDR"] = json!("10.244.9.0/24");
    let rejected = [
        ("another node's claim", Some("node-2"), &before, &removed),
        ("no node claim", None, &before, &removed),
        (
            "another taint removed too",
            Some("node-1"),
            &before,
            &tainted_node(&[]),
        ),
        ("the taint added", Some("node-1"), &removed, &before),
        ("a label added", Some("node-1"), &before, &relabelled),
        ("cordoned", Some("node-1"), &before, &cordoned),
        ("podCIDR changed", Some("node-1"), &before, &recidr),
    ];
    for (what, claim, old, new) in rejected {
        assert!(!failures(claim, old, new).is_empty(), "{what} was admitted");
    }
}

const MONITORING: &str = "deploy/monitoring";

/// Runs `tests/monitoring/validate_operator_crds.py` on `objects`: for each
/// `Kind/name`, `None` when valid, or the problems it names.
fn validate_operator_objects(objects: &[Value]) -> HashMap<String, Option<String>> {
    let (_, report) = run_tool(
        "python3",
        &["tests/monitoring/validate_operator_crds.py"],
        &serde_json::to_string(objects).expect("serializable"),
        "install cloudcoil-models-prometheus-operator with `cargo xtask setup`",
    );
    let mut verdicts = HashMap::new();
    let mut current: Option<String> = None;
    for line in report.lines() {
        if let Some(name) = line.strip_prefix("valid: ") {
            verdicts.insert(name.to_owned(), None);
            current = None;
        } else if let Some(name) = line.strip_prefix("invalid: ") {
            verdicts.insert(name.to_owned(), Some(String::new()));
            current = Some(name.to_owned());
        } else if let Some(problems) = current.as_ref().and_then(|n| verdicts.get_mut(n)) {
            problems.get_or_insert_default().push_str(line);
            problems.get_or_insert_default().push('\n');
        } else {
            panic!("the validator said {line:?} in:\n{report}");
        }
    }
    assert_eq!(verdicts.len(), objects.len(), "{report}");
    verdicts
}

/// One run of the validator (importing the models takes seconds) checks
/// the bundle and that the check bites: a misspelled field and a wrongly
/// typed one are each named, not passed over.
#[test]
fn the_monitoring_bundle_is_valid_against_its_schemas() {
    let (yaml, docs) = render(MONITORING);
    let (operator, kubernetes): (Vec<Value>, Vec<Value>) = docs
        .into_iter()
        .partition(|d| d["apiVersion"] == "monitoring.coreos.com/v1");
    let kinds: BTreeSet<String> = operator
        .iter()
        .map(|d| d["kind"].as_str().expect("kind").to_owned())
        .collect();
    assert_eq!(kinds, set(&["PodMonitor", "PrometheusRule"]), "{yaml}");
    let mut misspelled = find(&operator, "PodMonitor", "imds-guard").clone();
    misspelled["metadata"]["name"] = json!("misspelled");
    let endpoint = misspelled["spec"]["podMetricsEndpoints"][0]
        .as_object_mut()
        .expect("an endpoint");
    let interval = endpoint.remove("interval").expect("an interval");
    endpoint.insert("intervall".to_owned(), interval);
    let mut mistyped = find(&operator, "PrometheusRule", "imds-guard").clone();
    mistyped["metadata"]["name"] = json!("mistyped");
    mistyped["spec"]["groups"][0]["rules"][0]["for"] = json!("one minute");
    let mut checked = operator.clone();
    checked.extend([misspelled, mistyped]);
    let verdicts = validate_operator_objects(&checked);
    for shipped in ["PodMonitor/imds-guard", "PrometheusRule/imds-guard"] {
        assert_eq!(verdicts[shipped], None, "{shipped}: {verdicts:?}");
    }
    for (name, named) in [
        (
            "PodMonitor/misspelled",
            "unknown field spec.podMetricsEndpoints[0].intervall",
        ),
        ("PrometheusRule/mistyped", "spec.groups.0.rules.0.for"),
    ] {
        let problems = verdicts[name].as_deref().unwrap_or_default();
        assert!(
            problems.contains(named),
            "{name}: {named} not reported: {verdicts:?}"
        );
    }
    // The rest is the dashboard's ConfigMap, for Grafana's sidecar.
    let configmap = find(&kubernetes, "ConfigMap", "imds-guard-dashboard");
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(configmap["metadata"]["namespace"], "imds-guard");
    let shipped: Value = serde_json::from_str(
        configmap["data"]["imds-guard.json"]
            .as_str()
            .expect("the dashboard JSON"),
    )
    .expect("JSON");
    assert_eq!(shipped, monitoring::dashboard());
    let texts: Vec<String> = kubernetes
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("serializable"))
        .collect();
    validate(MONITORING, &texts.join("---\n"));
    // The scrape finds the DaemonSet's pods and port.
    let pod_monitor = find(&operator, "PodMonitor", "imds-guard");
    let deployed = base();
    let template = at(daemonset(&deployed), "/spec/template");
    assert_eq!(
        at(pod_monitor, "/spec/selector/matchLabels"),
        at(template, "/metadata/labels")
    );
    assert_eq!(
        at(pod_monitor, "/spec/podMetricsEndpoints/0/port"),
        at(template, "/spec/containers/0/ports/0/name")
    );
}

/// Writes the `PrometheusRule`'s groups as a rule file, and the promtool unit
/// tests beside it, into a directory of their own.
fn promtool_dir(rule_file: &Value) -> PathBuf {
    let dir = std::env::temp_dir().join(imds_guard_tests::unique_name("promtool"));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml_ng::to_string(rule_file).expect("serializable"),
    )
    .expect("writing rules.yaml");
    std::fs::copy(
        workspace_root().join("tests/monitoring/alerts.test.yaml"),
        dir.join("alerts.test.yaml"),
    )
    .expect("copying the alert tests");
    dir
}

fn promtool_test(rule_file: &Value) -> (bool, String) {
    let dir = promtool_dir(rule_file);
    let rules = dir.join("rules.yaml").display().to_string();
    let tests = dir.join("alerts.test.yaml").display().to_string();
    let hint = "install Debian's prometheus package (cargo xtask setup)";
    let (checked, check) = run_tool("promtool", &["check", "rules", &rules], "", hint);
    let result = if checked {
        run_tool("promtool", &["test", "rules", &tests], "", hint)
    } else {
        (false, check)
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn every_alert_passes_its_promtool_unit_tests() {
    let rule_file = monitoring::rule_file();
    let (ok, report) = promtool_test(&rule_file);
    assert!(ok, "{report}");
    // Every alert is tested there.
    let tests = std::fs::read_to_string(workspace_root().join("tests/monitoring/alerts.test.yaml"))
        .expect("the alert tests");
    for (alert, _) in monitoring::alerts(&rule_file) {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
    }
    // And they bite: an alert that never fires fails them.
    let mut silenced = rule_file.clone();
    silenced["groups"][0]["rules"][0]["expr"] = json!("vector(0) > 1");
    let (ok, report) = promtool_test(&silenced);
    assert!(!ok, "a silenced alert passed:\n{report}");
}

#[test]
fn the_dashboard_is_what_its_generator_builds() {
    let (ok, generated) = run_tool(
        "python3",
        &["deploy/monitoring/dashboards/generate.py"],
        "",
        "install grafana-foundation-sdk with `cargo xtask setup`",
    );
    assert!(ok, "{generated}");
    let committed = std::fs::read_to_string(
        workspace_root().join("deploy/monitoring/dashboards/imds-guard.json"),
    )
    .expect("the committed dashboard");
    assert!(
        generated == committed,
        "deploy/monitoring/dashboards/imds-guard.json is not what generate.py builds: run\n  \
         python3 deploy/monitoring/dashboards/generate.py > deploy/monitoring/dashboards/imds-guard.json"
    );
    // Every panel with data queries the daemon's metrics.
    let queries = monitoring::dashboard_queries(&monitoring::dashboard());
    assert!(queries.len() >= 10, "{queries:?}");
    assert!(
        queries
            .iter()
            .all(|q| !monitoring::metric_names(q).is_empty()),
        "{queries:?}"
    );
}
