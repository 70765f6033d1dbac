//! The daemon as the DaemonSet runs it: under crun and runc, from a bundle
//! generated from the rendered manifest itself (`imds_guard_tests::oci`), so
//! with its capabilities, user, `no_new_privs`, read-only root, mounts and
//! their propagation, namespaces, containerd's seccomp profile for those
//! capabilities and its memlock limit. Traffic comes from the sandbox's
//! namespaces and cgroups, never from the container or the host.
//!
//! A change to the manifest changes what runs here: the tests also mutate
//! the parsed manifest and check that the bundle and the container's
//! behaviour follow.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use imds_guard_tests::{
    Outcome, addrs, nodeshape,
    oci::{
        Bundle, Container, Manifest, Node, Pod, PodSettings, Runtime, RuntimeFeatures, ScratchDir,
        generate, pod::START_TIMEOUT, rootfs::PROBE, seccomp,
    },
    privileges::capability_number,
    stage::{HTTP, case, eperm},
};
use serde_json::Value;

/// Each scenario runs once with each runtime.
macro_rules! with_each_runtime {
    ($($scenario:ident),* $(,)?) => {
        mod crun {
            $(#[test] fn $scenario() { super::$scenario(super::Runtime::Crun) })*
        }
        mod runc {
            $(#[test] fn $scenario() { super::$scenario(super::Runtime::Runc) })*
        }
    };
}

with_each_runtime!(
    enforces_answers_status_and_survives_sigkill,
    removing_a_capability_changes_the_bundle_and_the_daemon_names_it,
    root_and_propagation_mutations_change_what_the_container_can_do,
    the_cgroup_view_for_this_node_is_read_only_all_the_way_down,
    the_base_cgroup_mount_is_recursive_only_where_the_runtime_can,
    a_seccomp_profile_without_bpf_is_named_as_the_cause,
);

const BOUND: Duration = Duration::from_secs(30);

fn base() -> Manifest {
    Manifest::render("base").expect("deploy/base renders")
}

fn tcp_to_metadata() -> imds_guard_tests::stage::Case {
    case("tcp", addrs::METADATA_V4, HTTP)
}

/// The JSON pointers where two bundles differ, each bundle's own directory
/// written as `BUNDLE` (its configMap volumes live there).
fn differences(a: &Bundle, b: &Bundle) -> BTreeSet<String> {
    let json = |bundle: &Bundle| -> Value {
        let text = serde_json::to_string(bundle.spec()).expect("serializes");
        let text = text.replace(&bundle.dir().display().to_string(), "BUNDLE");
        serde_json::from_str(&text).expect("parses")
    };
    let mut found = BTreeSet::new();
    diff("", &json(a), &json(b), &mut found);
    found
}

fn diff(at: &str, a: &Value, b: &Value, found: &mut BTreeSet<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let (va, vb) = (&x.get(key), &y.get(key));
                match (va, vb) {
                    (Some(va), Some(vb)) => diff(&format!("{at}/{key}"), va, vb, found),
                    _ => {
                        found.insert(format!("{at}/{key}"));
                    }
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{at}/{i}"), va, vb, found);
            }
        }
        _ if a != b => {
            found.insert(at.to_owned());
        }
        _ => {}
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A field of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map_or_else(
            || panic!("no {field} in /proc/{pid}/status"),
            |v| v.trim().to_owned(),
        )
}

/// The CFS quota (µs per 100 ms) and memory limit of `pid`'s cgroup, from
/// the v1 controllers where they are mounted, else from cgroup2.
fn cgroup_limits(pid: u32) -> (u64, u64) {
    let memberships = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let path_of = |controller: &str| {
        memberships.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
    };
    let read = |file: String| -> String {
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .to_owned()
    };
    let number = |text: &str| text.parse::<u64>().unwrap_or_else(|_| panic!("{text:?}"));
    if let (Some(cpu), Some(memory)) = (path_of("cpu"), path_of("memory")) {
        let quota = read(format!("/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us"));
        let limit = read(format!(
            "/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
        ));
        return (number(&quota), number(&limit));
    }
    let cgroup2 = imds_guard_tests::cgroups::cgroup2_mount().expect("cgroup2");
    let dir = cgroup2.join(
        path_of("")
            .expect("cgroup2 membership")
            .trim_start_matches('/'),
    );
    let cpu_max = read(dir.join("cpu.max").display().to_string());
    let quota = cpu_max
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let limit = read(dir.join("memory.max").display().to_string());
    (number(&quota), number(&limit))
}

/// `imds-probe mkdir ARGS` in a container made from `bundle`'s settings:
/// (directory, outcome) per line.
fn mkdir_inside(runtime: Runtime, bundle: &mut Bundle, args: &[&str]) -> Vec<(String, String)> {
    let mut command = vec![PROBE.to_owned(), "mkdir".to_owned()];
    command.extend(args.iter().map(|a| (*a).to_owned()));
    bundle.replace_command(command).expect("bundle");
    let (status, stdout, log) = Container::run_to_end(runtime, bundle, BOUND).expect("runs");
    assert!(
        status.success(),
        "imds-probe mkdir failed ({status}):\n{log}"
    );
    stdout
        .lines()
        .filter_map(|l| {
            let (dir, outcome) = l.strip_prefix("dir=")?.split_once(' ')?;
            Some((dir.to_owned(), outcome.to_owned()))
        })
        .collect()
}

/// Where the manifest mounts the host's cgroup hierarchy.
const CGROUP_MOUNT: &str = "/host/sys/fs/cgroup";

const EROFS: &str = "outcome=refused errno=EROFS";

/// A node like a systemd host's: /sys/fs/bpf shared, hybrid cgroups.
const SYSTEMD_NODE: &str = "\
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
42 23 0:39 / /sys/fs/bpf rw,relatime shared:11 - bpf bpf rw
";

/// Generation alone, against manifest text and a described node: no root.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn the_bundle_is_the_manifests_container() {
    let manifest = base();
    let node = Node::from_parts(SYSTEMD_NODE, "6.18.0", false);
    let volumes = ScratchDir::new("volumes").expect("scratch");
    let mut settings = PodSettings::new("gen");
    settings
        .host_paths
        .insert("status".to_owned(), volumes.path().join("status"));
    let rootfs = Path::new("/rootfs");
    let bundle = |manifest: &Manifest, features| {
        generate(manifest, &node, features, &settings, rootfs, volumes.path())
    };
    let spec = bundle(&manifest, RuntimeFeatures::default()).expect("generates");
    let container = manifest.container().expect("container");

    let mut args = vec!["/usr/local/bin/imds-guard".to_owned()];
    args.extend(container.args.clone().unwrap_or_default());
    assert_eq!(spec.process.args, args);
    assert!(spec.process.env.contains(&"NODE_NAME=test-node".to_owned()));
    let caps = &spec.process.capabilities;
    let two = vec!["CAP_BPF".to_owned(), "CAP_NET_ADMIN".to_owned()];
    assert_eq!(
        (&caps.bounding, &caps.effective, &caps.permitted),
        (&two, &two, &two)
    );
    assert!(caps.ambient.is_empty() && caps.inheritable.is_empty());
    assert_eq!((spec.process.user.uid, spec.process.user.gid), (0, 0));
    assert!(spec.process.no_new_privileges);
    assert!(spec.root.readonly);
    assert_eq!(spec.process.rlimits[0].kind, "RLIMIT_MEMLOCK");
    assert_eq!(spec.process.rlimits[0].hard, 64 * 1024);

    let mount = |destination: &str| {
        spec.mount_at(destination)
            .unwrap_or_else(|| panic!("no mount at {destination}: {:?}", spec.mounts))
    };
    for (destination, kind) in [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
        ("/sys/fs/cgroup", "cgroup"),
    ] {
        assert_eq!(mount(destination).kind, kind, "{destination}");
    }
    assert!(mount("/sys").options.contains(&"ro".to_owned()));
    assert!(mount("/sys/fs/cgroup").options.contains(&"ro".to_owned()));
    let config = mount("/etc/imds-guard");
    assert_eq!(config.options, ["rbind", "rprivate", "ro"]);
    let data = manifest.config_map("imds-guard-config").expect("ConfigMap");
    let shipped = data
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config.yaml");
    let written = std::fs::read_to_string(config.source.join("config.yaml")).expect("volume");
    assert_eq!(
        &written, shipped,
        "the ConfigMap's data, through the kubelet's ..data link"
    );
    let cgroup = mount("/host/sys/fs/cgroup");
    assert_eq!(cgroup.source, Path::new("/sys/fs/cgroup"));
    assert_eq!(
        cgroup.options,
        ["rbind", "rprivate", "ro"],
        "no rro without the runtime's"
    );
    let bpffs = mount("/host/sys/fs/bpf");
    assert_eq!(bpffs.options, ["rbind", "rslave", "rw"]);
    assert_eq!(spec.linux.rootfs_propagation.as_deref(), Some("rslave"));

    let kinds: Vec<(&str, bool)> = spec
        .linux
        .namespaces
        .iter()
        .map(|n| (n.kind.as_str(), n.path.is_some()))
        .collect();
    // Hybrid node: no cgroup namespace (containerd gives one on unified only).
    let fresh = [
        ("pid", false),
        ("ipc", false),
        ("uts", false),
        ("mount", false),
    ];
    // hostNetwork: no network namespace of its own.
    assert_eq!(kinds, fresh);
    assert!(spec.linux.masked_paths.contains(&"/proc/kcore".to_owned()));
    assert!(spec.linux.readonly_paths.contains(&"/proc/sys".to_owned()));
    let seccomp = spec.linux.seccomp.as_ref().expect("RuntimeDefault");
    let allows = |call: &str| {
        seccomp
            .syscalls
            .iter()
            .any(|r| r.action == "SCMP_ACT_ALLOW" && r.names.iter().any(|n| n == call))
    };
    assert!(allows("bpf") && !allows("perf_event_open") && !allows("mount"));
    let resources = &spec.linux.resources;
    assert_eq!(resources.memory.as_ref().map(|m| m.limit), Some(128 << 20));
    let cpu = resources.cpu.as_ref().expect("cpu");
    assert_eq!(
        (cpu.shares, cpu.quota, cpu.period),
        (Some(10), Some(20_000), Some(100_000))
    );

    // recursiveReadOnly: IfPossible takes rro where the runtime has it.
    let with_rro = RuntimeFeatures {
        recursive_read_only: true,
    };
    let spec_rro = bundle(&manifest, with_rro).expect("generates");
    let cgroup_rro = spec_rro.mount_at(CGROUP_MOUNT).expect("cgroup mount");
    assert_eq!(cgroup_rro.options, ["rbind", "rprivate", "rro"]);
    let mut enabled = manifest.clone();
    volume_mount(&mut enabled, "host-cgroup").recursive_read_only = Some("Enabled".to_owned());
    let refused = bundle(&enabled, RuntimeFeatures::default()).expect_err("kubelet refuses");
    assert!(
        refused
            .to_string()
            .contains("volume \"host-cgroup\" requested recursive read-only mode, but it is not supported by the runtime"),
        "{refused}"
    );

    // Without hostNetwork, a new network namespace of the pod's own.
    let mut own_network = manifest.clone();
    own_network.pod_mut().expect("pod").host_network = Some(false);
    let spec_own = bundle(&own_network, RuntimeFeatures::default()).expect("generates");
    assert!(
        spec_own
            .linux
            .namespaces
            .iter()
            .any(|n| n.kind == "network" && n.path.is_none())
    );

    // A node whose /sys/fs/bpf propagates nothing: containerd refuses.
    let private = SYSTEMD_NODE.replace("shared:11 ", "");
    let private_node = Node::from_parts(&private, "6.18.0", false);
    let refused = generate(
        &manifest,
        &private_node,
        RuntimeFeatures::default(),
        &settings,
        rootfs,
        volumes.path(),
    )
    .expect_err("containerd refuses");
    assert_eq!(
        refused.to_string(),
        "path \"/sys/fs/bpf\" is mounted on \"/sys/fs/bpf\" but it is not a shared or slave mount"
    );
}

fn volume_mount<'a>(
    manifest: &'a mut Manifest,
    name: &str,
) -> &'a mut k8s_openapi::api::core::v1::VolumeMount {
    manifest.volume_mount_mut(name).expect("volumeMount")
}

/// The generations under the daemon's pin directory.
fn generations(pins: &Path) -> Vec<String> {
    imds_guard_tests::pins::generations_in(pins)
}

/// `imds-guard status --output json` from a second container of the pod,
/// joining `network` (the daemon's) when given.
fn status_from_second_container(pod: &Pod, manifest: &Manifest, network: Option<PathBuf>) -> Value {
    let mut settings = pod.settings("status");
    settings.network = network;
    let mut bundle = pod.bundle(manifest, &settings).expect("bundle");
    let args = [
        "status",
        "--bpffs-dir",
        &manifest.arg("--bpffs-dir").expect("--bpffs-dir"),
        "--cgroup-root",
        &manifest.arg("--cgroup-root").expect("--cgroup-root"),
        "--output",
        "json",
    ];
    bundle
        .replace_args(args.iter().map(|a| (*a).to_owned()).collect())
        .expect("bundle");
    let (status, stdout, log) = Container::run_to_end(pod.runtime, &bundle, BOUND).expect("runs");
    assert!(status.success(), "status failed ({status}):\n{log}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status JSON ({e}): {stdout}\n{log}"))
}

/// In the node's namespace the node edge guard closes a pod's forwarded
/// route (a Service rewritten to the metadata address), and ordinary
/// forwarding goes on.
fn assert_node_guard_in_force(pod: &Pod, daemon: &mut Container) {
    daemon
        .wait_for_log("node edge guard updated uplinks=uplink", START_TIMEOUT)
        .expect("the guard attaches to the node's uplink");
    let shape = &pod.node_shape;
    let timeout = ["--timeout-ms".to_owned(), "300".to_owned()];
    shape.assert_never_arrives(
        &shape.pod().probe(),
        (
            "tcp",
            nodeshape::addrs::CLUSTER_IP_METADATA_V4.into(),
            &timeout,
        ),
        nodeshape::addrs::METADATA_V4.into(),
    );
    shape.assert_arrives_from(
        &shape.pod().probe(),
        ("tcp", nodeshape::addrs::CLUSTER_IP_ORDINARY_V4.into(), &[]),
        nodeshape::addrs::SERVER_V4.into(),
        nodeshape::addrs::NODE_UPLINK_V4.into(),
    );
}

fn enforces_answers_status_and_survives_sigkill(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let manifest = base();
    let bundle = pod.standalone_bundle(&manifest, "daemon").expect("bundle");
    let mut daemon = pod
        .start_daemon(&bundle)
        .expect("the daemon enforces in the container");

    // What the runtime made of the bundle, read from the host.
    let pid = daemon.pid().expect("pid");
    let resources = &bundle.spec().linux.resources;
    let bit = |name: &str| 1u64 << capability_number(name).expect("capability");
    let two_caps = format!("{:016x}", bit("BPF") | bit("NET_ADMIN"));
    assert_eq!(
        proc_status(pid, "CapBnd:"),
        two_caps,
        "bounding set: BPF, NET_ADMIN"
    );
    assert_eq!(proc_status(pid, "CapEff:"), two_caps);
    assert_eq!(proc_status(pid, "CapAmb:"), format!("{:016x}", 0));
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Seccomp:"), "2", "a seccomp filter");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let memlock = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .expect("memlock line");
    assert!(memlock.contains("65536"), "{memlock}");
    assert_eq!(
        cgroup_limits(pid),
        (
            resources
                .cpu
                .as_ref()
                .and_then(|c| c.quota)
                .and_then(|quota| u64::try_from(quota).ok())
                .expect("a CPU limit"),
            resources
                .memory
                .as_ref()
                .and_then(|memory| u64::try_from(memory.limit).ok())
                .expect("a memory limit")
        ),
        "the manifest's CPU and memory limits hold"
    );
    let netns = |p: &Path| std::fs::metadata(p).expect("netns").ino();
    assert_eq!(
        netns(Path::new(&format!("/proc/{pid}/ns/net"))),
        netns(&pod.node_shape.node.path()),
        "hostNetwork: the node's network namespace"
    );
    assert_node_guard_in_force(&pod, &mut daemon);

    let blocked = pod.attempt(&pod.blocked, &tcp_to_metadata());
    assert_eq!(blocked.outcome, eperm(), "{blocked:?}");
    assert!(blocked.elapsed < Duration::from_millis(100), "{blocked:?}");
    let allowed = pod.attempt(&pod.allowed, &tcp_to_metadata());
    assert_eq!(allowed.outcome, Outcome::Reached, "{allowed:?}");

    // A second container of the pod, in its network namespace.
    let status = status_from_second_container(
        &pod,
        &manifest,
        Some(daemon.network_namespace().expect("netns")),
    );
    let programs = status["programs"].as_object().expect("programs");
    assert!(
        !programs.is_empty() && programs.values().all(|a| a == true),
        "{status}"
    );
    assert_eq!(status["mode"], "enforce");
    assert_eq!(status["daemon_reachable"], true, "{status}");
    let guarded = bundle.container_path(&pod.guarded).expect("guarded inside");
    assert_eq!(
        status["protected_cgroup"],
        guarded.display().to_string(),
        "{status}"
    );
    let allowed_inside = bundle.container_path(&pod.allowed).expect("allowed inside");
    let allowed_entries = status["allowed"].to_string();
    assert!(
        allowed_entries.contains(&allowed_inside.display().to_string()),
        "{status}"
    );

    // SIGKILL: the pins hold enforcement.
    let pins = pod
        .pins_on_node(&manifest, &bundle)
        .expect("pins on the node");
    let ended = daemon.kill().expect("killed");
    assert!(!ended.success(), "{ended}");
    let blocked = pod.attempt(&pod.blocked, &tcp_to_metadata());
    assert_eq!(blocked.outcome, eperm(), "after SIGKILL: {blocked:?}");
    let allowed = pod.attempt(&pod.allowed, &tcp_to_metadata());
    assert_eq!(
        allowed.outcome,
        Outcome::Reached,
        "after SIGKILL: {allowed:?}"
    );
    assert_eq!(generations(&pins).len(), 1, "{}", pins.display());
    let status = status_from_second_container(&pod, &manifest, None);
    let programs = status["programs"].as_object().expect("programs");
    assert!(
        programs.values().all(|a| a == true),
        "after SIGKILL: {status}"
    );
    assert_eq!(status["daemon_reachable"], false, "{status}");
}

fn removing_a_capability_changes_the_bundle_and_the_daemon_names_it(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let manifest = base();
    let settings = pod.settings("caps");
    let shipped = pod.bundle(&manifest, &settings).expect("bundle");
    for (capability, named, seccomp_changes) in [
        ("BPF", "CAP_BPF", true),
        ("NET_ADMIN", "CAP_NET_ADMIN", false),
    ] {
        let mut mutated = manifest.clone();
        let caps = mutated
            .container_mut()
            .expect("container")
            .security_context
            .as_mut()
            .and_then(|s| s.capabilities.as_mut())
            .expect("capabilities");
        caps.add.as_mut().expect("add").retain(|c| c != capability);
        let bundle = pod.bundle(&mutated, &settings).expect("bundle");
        let mut want = set(&[
            "/process/capabilities/bounding",
            "/process/capabilities/effective",
            "/process/capabilities/permitted",
        ]);
        if seccomp_changes {
            // Without CAP_BPF, containerd's profile drops its bpf rule.
            want.insert("/linux/seccomp/syscalls".to_owned());
        }
        assert_eq!(differences(&shipped, &bundle), want, "without {capability}");

        let bundle = pod.standalone_bundle(&mutated, "caps").expect("bundle");
        let (status, _, log) = Container::run_to_end(runtime, &bundle, BOUND).expect("runs");
        assert!(!status.success(), "without {capability}: {status}\n{log}");
        assert!(
            log.contains(named),
            "without {capability}, the log names {named}:\n{log}"
        );
        assert!(!log.contains("imds-guard is enforcing"), "{log}");
        // Nothing was attached.
        let blocked = pod.attempt(&pod.blocked, &tcp_to_metadata());
        assert_eq!(
            blocked.outcome,
            Outcome::Reached,
            "without {capability}: {blocked:?}"
        );
    }
}

fn root_and_propagation_mutations_change_what_the_container_can_do(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let manifest = base();
    let settings = pod.settings("mutate");

    // readOnlyRootFilesystem: false → only root.readonly changes, and the
    // container may write its root.
    let mut writable = manifest.clone();
    writable
        .container_mut()
        .expect("container")
        .security_context
        .as_mut()
        .expect("securityContext")
        .read_only_root_filesystem = Some(false);
    let mut shipped = pod.bundle(&manifest, &settings).expect("bundle");
    let mut mutated = pod.bundle(&writable, &settings).expect("bundle");
    assert_eq!(differences(&shipped, &mutated), set(&["/root/readonly"]));
    assert_eq!(
        mkdir_inside(runtime, &mut shipped, &["/"]),
        [("/".to_owned(), EROFS.to_owned())],
        "the shipped root is read-only"
    );
    assert_eq!(
        mkdir_inside(runtime, &mut mutated, &["/"]),
        [("/".to_owned(), "outcome=written".to_owned())],
        "readOnlyRootFilesystem: false"
    );

    // mountPropagation None on the bpffs volume: private, and what the
    // node mounts there later no longer shows inside.
    let mut private = manifest.clone();
    volume_mount(&mut private, "bpffs").mount_propagation = Some("None".to_owned());
    let shipped = pod.bundle(&manifest, &settings).expect("bundle");
    let mutated = pod.bundle(&private, &settings).expect("bundle");
    let index = shipped
        .spec()
        .mounts
        .iter()
        .position(|m| m.destination == Path::new("/host/sys/fs/bpf"))
        .expect("bpffs mount");
    assert_eq!(
        differences(&shipped, &mutated),
        set(&[
            &format!("/mounts/{index}/options/1"),
            "/linux/rootfsPropagation"
        ])
    );
    assert_eq!(mutated.spec().mounts[index].options[1], "rprivate");
    for (manifest, shows) in [(&manifest, true), (&private, false)] {
        let bundle = pod
            .standalone_bundle(manifest, "propagation")
            .expect("bundle");
        let daemon = pod.start_daemon(&bundle).expect("enforces");
        let late = pod.pins.path().join("late");
        let _mount = LateMount::new(&late);
        let inside = bundle.container_path(&late).expect("inside");
        let needle = format!(" {} ", inside.display());
        let seen = daemon.mountinfo().expect("mountinfo").contains(&needle);
        assert_eq!(
            seen,
            shows,
            "a later node mount at {} inside: {seen}",
            late.display()
        );
    }

    // Bidirectional: refused for an unprivileged container.
    let mut bidirectional = manifest.clone();
    volume_mount(&mut bidirectional, "bpffs").mount_propagation = Some("Bidirectional".to_owned());
    let refused = pod
        .bundle(&bidirectional, &settings)
        .err()
        .expect("refused");
    assert!(
        refused
            .to_string()
            .contains("Bidirectional mount propagation is available only to privileged containers"),
        "{refused}"
    );
}

fn a_seccomp_profile_without_bpf_is_named_as_the_cause(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let mut bundle = pod.standalone_bundle(&base(), "seccomp").expect("bundle");
    // containerd's profile for a process without CAP_BPF: no bpf rule, as
    // CRI-O's default profile gives a process with it.
    let without_bpf =
        seccomp::runtime_default(&["CAP_NET_ADMIN".to_owned()], pod.node.kernel).expect("profile");
    bundle.replace_seccomp(without_bpf).expect("bundle");
    let (status, _, log) = Container::run_to_end(runtime, &bundle, BOUND).expect("runs");
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("seccomp filter refuses the bpf system call"),
        "the log names seccomp:\n{log}"
    );
    assert!(!log.contains("missing capabilities"), "{log}");
}

/// A tmpfs the node mounts after the container started; removed on drop.
struct LateMount {
    path: PathBuf,
}

impl LateMount {
    fn new(path: &Path) -> LateMount {
        std::fs::create_dir_all(path).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .expect("mount tmpfs");
        LateMount {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for LateMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The manifest a node of this kind should get: the hybrid-cgroups overlay
/// on hybrid nodes, the base elsewhere.
fn manifest_for(node: &Node) -> Manifest {
    if node.hybrid_cgroups() {
        Manifest::render("overlays/hybrid-cgroups").expect("the hybrid overlay renders")
    } else {
        base()
    }
}

fn assert_all_read_only(lines: &[(String, String)], what: &str) {
    assert!(!lines.is_empty(), "{what}: nothing tried");
    for (dir, outcome) in lines {
        assert_eq!(outcome, EROFS, "{what}: {dir} is writable");
    }
}

/// The daemon's start-up warning about a writable cgroup mount, and the
/// error it stops with after its checks on a node without a pod subtree.
const WRITABLE_WARNING: &str = "the cgroup hierarchy is writable here";
const NO_POD_SUBTREE: &str = "no pod cgroup subtree under";

/// The daemon exactly as the manifest runs it (`run`, Kubernetes mode),
/// until it stops after its start-up checks (this node has no pod
/// subtree): its log.
fn run_as_shipped(pod: &Pod, manifest: &Manifest) -> String {
    let bundle = pod
        .bundle(manifest, &pod.settings("shipped"))
        .expect("bundle");
    let (_, _, log) = Container::run_to_end(pod.runtime, &bundle, BOUND).expect("runs");
    assert!(
        log.contains(NO_POD_SUBTREE),
        "the daemon did not get past its checks:\n{log}"
    );
    log
}

fn the_cgroup_view_for_this_node_is_read_only_all_the_way_down(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let manifest = manifest_for(&pod.node);
    let mut bundle = pod
        .bundle(&manifest, &pod.settings("cgroup-ro"))
        .expect("bundle");
    let root = manifest.arg("--cgroup-root").expect("--cgroup-root");
    let lines = mkdir_inside(runtime, &mut bundle, &["--mounts-under", &root]);
    assert_all_read_only(&lines, "the host's cgroups");

    // And the daemon enforces with it.
    let bundle = pod
        .standalone_bundle(&manifest, "cgroup-ro")
        .expect("bundle");
    let _daemon = pod.start_daemon(&bundle).expect("enforces");
    let blocked = pod.attempt(&pod.blocked, &tcp_to_metadata());
    assert_eq!(blocked.outcome, eperm(), "{blocked:?}");
    let log = run_as_shipped(&pod, &manifest);
    assert!(!log.contains(WRITABLE_WARNING), "{log}");
}

fn the_base_cgroup_mount_is_recursive_only_where_the_runtime_can(runtime: Runtime) {
    let pod = Pod::new(runtime);
    let manifest = base();
    let mut bundle = pod
        .bundle(&manifest, &pod.settings("cgroup-base"))
        .expect("bundle");
    let mount = bundle.spec().mount_at(CGROUP_MOUNT).expect("cgroup mount");
    let rro = mount.options.iter().any(|o| o == "rro");
    let asked = manifest
        .volume_mount("host-cgroup")
        .expect("volumeMount")
        .recursive_read_only
        .as_deref()
        .is_some_and(|mode| mode != "Disabled");
    assert_eq!(
        rro,
        asked && pod.features.recursive_read_only,
        "rro where the manifest asks and {} offers it",
        runtime.program()
    );
    let root = manifest.arg("--cgroup-root").expect("--cgroup-root");
    let guarded = bundle.container_path(&pod.guarded).expect("guarded inside");
    let guarded = guarded.display().to_string();
    let lines = mkdir_inside(runtime, &mut bundle, &["--mounts-under", &root, &guarded]);
    let log = run_as_shipped(&pod, &manifest);
    if rro || !pod.node.hybrid_cgroups() {
        assert_all_read_only(&lines, "the host's cgroups");
        assert!(!log.contains(WRITABLE_WARNING), "{log}");
        return;
    }
    // Hybrid node, plain read-only bind: the top is read-only, the cgroup2
    // submount is not (mkdir in the test's own cgroup works), and the
    // daemon says so, naming it.
    let outcome = |dir: &str| {
        lines
            .iter()
            .find(|(d, _)| d == dir)
            .map_or_else(|| panic!("{dir} not tried: {lines:?}"), |(_, o)| o.clone())
    };
    assert_eq!(outcome(&root), EROFS, "{lines:?}");
    assert_eq!(outcome(&guarded), "outcome=written", "{lines:?}");
    let cgroup2 = imds_guard_tests::cgroups::cgroup2_mount().expect("cgroup2");
    let unified = bundle.container_path(&cgroup2).expect("cgroup2 inside");
    let warning = log
        .lines()
        .find(|l| {
            l.contains(WRITABLE_WARNING) && l.contains(&format!("mount={} ", unified.display()))
        })
        .unwrap_or_else(|| panic!("no warning naming {}:\n{log}", unified.display()));
    assert!(warning.contains("WARN"), "{warning}");
}
