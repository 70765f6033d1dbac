//! One container of the DaemonSet's pod as an OCI bundle, generated the way
//! the kubelet and containerd v2.3.4 would on this node: the image's
//! entrypoint with the container's args, its environment, the capabilities
//! containerd computes from add and drop, its user, `no_new_privs` from
//! allowPrivilegeEscalation, the read-only root, each volumeMount as a bind
//! mount with its propagation and read-only mode, containerd's default
//! mounts, masked and read-only paths, namespaces and seccomp profile, and
//! the CPU and memory limits.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{
    AppArmorProfile, ConfigMapVolumeSource, Container, PodSecurityContext, PodSpec, SeccompProfile,
    SecurityContext, VolumeMount,
};

use super::{
    BundleError, Manifest, Node, Result, RuntimeFeatures, ScratchDir, io_error,
    manifest::CONTAINER,
    rootfs::{ENTRYPOINT, Rootfs},
    seccomp,
    spec::{
        Capabilities, Cpu, DeviceRule, Linux, Memory, Mount, Namespace, Process, Resources, Rlimit,
        Root, Seccomp, Spec, User,
    },
};
use crate::privileges::DEFAULT_MEMLOCK_BYTES;

/// containerd's `defaultUnixCaps` (pkg/oci/spec.go): what a container has
/// before the security context's add and drop.
const RUNTIME_DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, in number order (linux/capability.h, through
/// `CAP_CHECKPOINT_RESTORE`): what `add: [ALL]` grants.
const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The kubelet's masked and read-only /proc and /sys paths for
/// `procMount: Default` (pkg/securitycontext/util.go), which containerd
/// applies as given.
const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// containerd's `WithDefaultPathEnv`; the image sets the same.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The kubelet's CFS period (100 ms) and its floors for shares and quota
/// (`pkg/kubelet/cm/helpers_linux.go`).
const CPU_PERIOD_US: u64 = 100_000;
const MIN_SHARES: u64 = 2;
const MIN_QUOTA_US: i64 = 1_000;

/// What the kubelet decides for the pod on this node (its names, the
/// container's cgroup, the network namespace a second container joins),
/// and the node directories a test provides for hostPath volumes.
#[derive(Clone, Debug)]
pub struct PodSettings {
    pub pod_name: String,
    pub node_name: String,
    /// hostPath volumes whose node directory the test provides (volume name
    /// → directory), e.g. a bpffs directory of its own.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// Joins this network namespace (another container of the same pod).
    pub network: Option<PathBuf>,
    /// The node's network namespace, which a hostNetwork pod's containers
    /// join: in tests a node-shaped sandbox's, never this machine's own.
    /// `None` leaves the runtime's own (no network namespace in the spec),
    /// as the kubelet does on a real node.
    pub node_network: Option<PathBuf>,
    /// The container's cgroup, relative to each hierarchy's root.
    pub cgroups_path: String,
}

impl PodSettings {
    pub fn new(tag: &str) -> PodSettings {
        PodSettings {
            pod_name: format!("imds-guard-{tag}"),
            node_name: "test-node".to_owned(),
            host_paths: BTreeMap::new(),
            network: None,
            node_network: None,
            cgroups_path: format!("/{}", crate::unique_name(tag)),
        }
    }
}

/// How a volumeMount propagates, as the CRI says it. (Bidirectional is
/// for privileged containers only, which are not modelled.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Propagation {
    Private,
    HostToContainer,
}

/// The security context the kubelet applies: the container's fields, else
/// the pod's.
struct Security<'a> {
    container: Option<&'a SecurityContext>,
    pod: &'a PodSpec,
}

impl Security<'_> {
    fn privileged(&self) -> bool {
        self.container.and_then(|s| s.privileged).unwrap_or(false)
    }

    /// The container's setting, else the pod's.
    fn either<T>(
        &self,
        container: impl Fn(&SecurityContext) -> Option<T>,
        pod: impl Fn(&PodSecurityContext) -> Option<T>,
    ) -> Option<T> {
        self.container
            .and_then(container)
            .or_else(|| self.pod.security_context.as_ref().and_then(pod))
    }

    fn run_as_user(&self) -> Option<i64> {
        self.either(|s| s.run_as_user, |s| s.run_as_user)
    }

    fn run_as_group(&self) -> Option<i64> {
        self.either(|s| s.run_as_group, |s| s.run_as_group)
    }

    fn run_as_non_root(&self) -> bool {
        self.either(|s| s.run_as_non_root, |s| s.run_as_non_root)
            .unwrap_or(false)
    }

    fn seccomp_type(&self) -> Option<String> {
        let kind = |p: &Option<SeccompProfile>| p.as_ref().map(|p| p.type_.clone());
        self.either(|s| kind(&s.seccomp_profile), |s| kind(&s.seccomp_profile))
    }

    fn apparmor_type(&self) -> Option<String> {
        let kind = |p: &Option<AppArmorProfile>| p.as_ref().map(|p| p.type_.clone());
        self.either(
            |s| kind(&s.app_armor_profile),
            |s| kind(&s.app_armor_profile),
        )
    }
}

/// Fails on what would change the container but is not modelled here.
fn check_modelled(pod: &PodSpec, security: &Security) -> Result<()> {
    let unsupported = |what: &str| Err(BundleError::Unsupported(what.to_owned()));
    if security.privileged() {
        return unsupported("privileged: true");
    }
    if let Some(sc) = security.container
        && sc.proc_mount.as_deref().is_some_and(|m| m != "Default")
    {
        return unsupported("procMount other than Default");
    }
    if pod.share_process_namespace == Some(true) {
        return unsupported("shareProcessNamespace");
    }
    if pod.host_users == Some(false) {
        return unsupported("hostUsers: false (a user namespace)");
    }
    let pod_sc = pod.security_context.as_ref();
    if pod_sc.is_some_and(|s| s.sysctls.as_ref().is_some_and(|v| !v.is_empty())) {
        return unsupported("sysctls");
    }
    if pod_sc.is_some_and(|s| {
        s.supplemental_groups
            .as_ref()
            .is_some_and(|g| !g.is_empty())
            || s.fs_group.is_some()
    }) {
        return unsupported("supplementalGroups or fsGroup");
    }
    match security.apparmor_type().as_deref() {
        None | Some("RuntimeDefault" | "Unconfined") => {}
        Some(other) => return unsupported(&format!("appArmorProfile type {other}")),
    }
    Ok(())
}

/// containerd's `WithCapabilities` and `WithoutAmbientCaps`: the default
/// set, `ALL` first, then each add and drop.
fn capabilities(security: &Security) -> Result<Capabilities> {
    let mut set: Vec<String> = RUNTIME_DEFAULT_CAPABILITIES.map(str::to_owned).to_vec();
    if let Some(caps) = security.container.and_then(|s| s.capabilities.as_ref()) {
        let add = caps.add.clone().unwrap_or_default();
        let drop = caps.drop.clone().unwrap_or_default();
        let all = |list: &[String]| list.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
        if all(&add) {
            set = ALL_CAPABILITIES.map(str::to_owned).to_vec();
        }
        if all(&drop) {
            set.clear();
        }
        let named = |list: Vec<String>| -> Result<Vec<String>> {
            list.into_iter()
                .filter(|c| !c.eq_ignore_ascii_case("ALL"))
                .map(|c| {
                    let name = format!("CAP_{}", c.to_ascii_uppercase());
                    if ALL_CAPABILITIES.contains(&name.as_str()) {
                        Ok(name)
                    } else {
                        Err(BundleError::Runtime(format!("unknown capability {name:?}")))
                    }
                })
                .collect()
        };
        for name in named(add)? {
            if !set.contains(&name) {
                set.push(name);
            }
        }
        let dropped = named(drop)?;
        set.retain(|c| !dropped.contains(c));
    }
    Ok(Capabilities {
        bounding: set.clone(),
        effective: set.clone(),
        permitted: set,
        inheritable: Vec::new(),
        ambient: Vec::new(),
    })
}

/// The container's command (else the image's entrypoint) and args.
fn process_args(container: &Container) -> Result<Vec<String>> {
    let mut args = container
        .command
        .clone()
        .unwrap_or_else(|| vec![ENTRYPOINT.to_owned()]);
    args.extend(container.args.clone().unwrap_or_default());
    if args.iter().any(|a| a.contains("$(")) {
        return Err(BundleError::Unsupported(
            "$(VAR) references in args".to_owned(),
        ));
    }
    Ok(args)
}

/// PATH, HOSTNAME (containerd), then the container's variables with the
/// downward API fields a DaemonSet can use.
fn environment(
    container: &Container,
    settings: &PodSettings,
    namespace: &str,
) -> Result<Vec<String>> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOSTNAME".to_owned(), settings.pod_name.clone()),
    ];
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(BundleError::Unsupported("envFrom".to_owned()));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                match field {
                    Some("spec.nodeName") => settings.node_name.clone(),
                    Some("metadata.name") => settings.pod_name.clone(),
                    Some("metadata.namespace") => namespace.to_owned(),
                    _ => {
                        return Err(BundleError::Unsupported(format!(
                            "the source of environment variable {}",
                            var.name
                        )));
                    }
                }
            }
            (value, None) => value.clone().unwrap_or_default(),
        };
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// A Kubernetes quantity in thousandths (`10m` → 10, `2` → 2000) or in
/// units (`128Mi` → 134217728), for the suffixes a pod's resources use.
fn quantity(text: &str, milli: bool) -> Result<i64> {
    let bad = || BundleError::Unsupported(format!("the quantity {text:?}"));
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let value = number * factor * if milli { 1000.0 } else { 1.0 };
    #[allow(
        clippy::cast_possible_truncation,
        reason = "a saturating cast, and a pod's quantities are far from i64::MAX"
    )]
    let value = value.ceil() as i64;
    Ok(value)
}

/// The kubelet's conversion of requests and limits (CPU shares from the
/// request, CFS quota from the limit, the memory limit).
fn resources(container: &Container) -> Result<Resources> {
    let requirements = container.resources.clone().unwrap_or_default();
    let requests = requirements.requests.unwrap_or_default();
    let limits = requirements.limits.unwrap_or_default();
    for name in requests.keys().chain(limits.keys()) {
        if name != "cpu" && name != "memory" {
            return Err(BundleError::Unsupported(format!("the resource {name}")));
        }
    }
    let cpu_limit = limits
        .get("cpu")
        .map(|q| quantity(&q.0, true))
        .transpose()?;
    // An absent request defaults to the limit (API defaulting).
    let cpu_request = match requests.get("cpu") {
        Some(q) => Some(quantity(&q.0, true)?),
        None => cpu_limit,
    };
    let cpu = Cpu {
        shares: cpu_request.map(|m| (m.max(0).cast_unsigned() * 1024 / 1000).max(MIN_SHARES)),
        quota: cpu_limit.map(|m| (m * CPU_PERIOD_US.cast_signed() / 1000).max(MIN_QUOTA_US)),
        period: cpu_limit.map(|_| CPU_PERIOD_US),
    };
    let memory = limits
        .get("memory")
        .map(|q| quantity(&q.0, false))
        .transpose()?
        .map(|limit| Memory { limit });
    Ok(Resources {
        devices: vec![DeviceRule {
            allow: false,
            access: "rwm".to_owned(),
        }],
        memory,
        cpu: (cpu != Cpu::default()).then_some(cpu),
    })
}

/// containerd's `defaultMounts` without /run (`WithoutRunMount`), and the
/// container's cgroup filesystem at /sys/fs/cgroup, read-only.
fn default_mounts(node: &Node, cgroup_namespace: bool) -> Vec<Mount> {
    let mount = |destination: &str, kind: &str, source: &str, options: &[&str]| Mount {
        destination: destination.into(),
        kind: kind.to_owned(),
        source: source.into(),
        options: options.iter().map(|o| (*o).to_owned()).collect(),
    };
    let mut cgroup = mount(
        "/sys/fs/cgroup",
        "cgroup",
        "cgroup",
        &["nosuid", "noexec", "nodev", "relatime", "ro"],
    );
    // Sharing the host's cgroup namespace means sharing its cgroup2
    // superblock: containerd keeps these options so the mount does not
    // strip them.
    if !cgroup_namespace && let Some(host) = node.mount_of(Path::new("/sys/fs/cgroup")) {
        for option in host.super_options.split(',') {
            if option == "nsdelegate" || option == "memory_recursiveprot" {
                cgroup.options.push(option.to_owned());
            }
        }
    }
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        cgroup,
    ]
}

/// The kubelet's `resolveRecursiveReadOnly` after the API server's
/// validation: whether the mount becomes `rro`.
fn recursive_read_only(mount: &VolumeMount, field: &str, runtime_has_rro: bool) -> Result<bool> {
    let mode = mount.recursive_read_only.as_deref().unwrap_or("Disabled");
    let forbidden = |reason: &str| BundleError::Forbidden {
        field: format!("{field}.recursiveReadOnly"),
        reason: reason.to_owned(),
    };
    match mode {
        "Disabled" => return Ok(false),
        "IfPossible" | "Enabled" => {}
        other => return Err(forbidden(&format!("Unsupported value: {other:?}"))),
    }
    if mount.read_only != Some(true) {
        return Err(forbidden("may only be specified when readOnly is true"));
    }
    if mount
        .mount_propagation
        .as_deref()
        .is_some_and(|p| p != "None")
    {
        return Err(forbidden(
            "may only be specified when mountPropagation is None or not specified",
        ));
    }
    if mode == "Enabled" && !runtime_has_rro {
        return Err(BundleError::Kubelet(format!(
            "failed to resolve recursive read-only mode: volume {:?} requested recursive \
             read-only mode, but it is not supported by the runtime",
            mount.name
        )));
    }
    Ok(runtime_has_rro)
}

/// containerd's `ensureSharedOrSlave` on the mount that holds `source`:
/// HostToContainer needs events from the host to reach the container.
fn check_shared_or_slave(node: &Node, source: &Path) -> Result<()> {
    let mount = node.mount_of(source);
    let propagates = mount.is_some_and(|m| {
        m.propagation
            .iter()
            .any(|o| o.starts_with("shared:") || o.starts_with("master:"))
    });
    if propagates {
        return Ok(());
    }
    Err(BundleError::Propagation {
        path: source.to_path_buf(),
        mount_point: mount.map(|m| m.point.clone()).unwrap_or_default(),
        wanted: "shared or slave",
    })
}

/// The kubelet's check of a hostPath volume's `type`.
fn host_path_source(path: &Path, kind: Option<&str>) -> Result<PathBuf> {
    match kind.unwrap_or("") {
        "" => {}
        "Directory" => {
            if !path.is_dir() {
                return Err(BundleError::Kubelet(format!(
                    "hostPath type check failed: {} is not a directory",
                    path.display()
                )));
            }
        }
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(path).map_err(io_error("creating", path))?;
        }
        other => return Err(BundleError::Unsupported(format!("hostPath type {other}"))),
    }
    // containerd binds the target of a symbolic link.
    path.canonicalize().map_err(io_error("resolving", path))
}

/// A configMap volume as the kubelet lays it out: the data in a
/// timestamped directory, `..data` linking to it, and each key a link
/// through `..data`, so that an update swaps one link.
fn config_map_volume(
    manifest: &Manifest,
    source: &ConfigMapVolumeSource,
    dir: &Path,
) -> Result<PathBuf> {
    if source.items.is_some() {
        return Err(BundleError::Unsupported(
            "configMap volume items".to_owned(),
        ));
    }
    let config_map = manifest.config_map(&source.name)?;
    let mode = source.default_mode.unwrap_or(0o644).cast_unsigned();
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io_error("removing", dir))?;
    }
    let data_dir = dir.join("..2000_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&data_dir).map_err(io_error("creating", &data_dir))?;
    let mut files: Vec<(&String, &[u8])> = Vec::new();
    for (key, value) in config_map.data.iter().flatten() {
        files.push((key, value.as_bytes()));
    }
    for (key, value) in config_map.binary_data.iter().flatten() {
        files.push((key, value.0.as_slice()));
    }
    for (key, bytes) in files {
        let file = data_dir.join(key);
        std::fs::write(&file, bytes).map_err(io_error("writing", &file))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
            .map_err(io_error("chmod", &file))?;
        let link = dir.join(key);
        std::os::unix::fs::symlink(Path::new("..data").join(key), &link)
            .map_err(io_error("linking", &link))?;
    }
    let data_link = dir.join("..data");
    let target = data_dir.file_name().map(PathBuf::from).unwrap_or_default();
    std::os::unix::fs::symlink(target, &data_link).map_err(io_error("linking", &data_link))?;
    Ok(dir.to_path_buf())
}

/// The CRI mount of one volumeMount, as containerd's `WithMounts` makes it.
fn volume_mount(
    manifest: &Manifest,
    node: &Node,
    features: RuntimeFeatures,
    settings: &PodSettings,
    volumes_dir: &Path,
    (index, mount): (usize, &VolumeMount),
) -> Result<Mount> {
    let pod = manifest.pod()?;
    let container_index = pod
        .containers
        .iter()
        .position(|c| c.name == CONTAINER)
        .unwrap_or(0);
    let field = format!("spec.template.spec.containers[{container_index}].volumeMounts[{index}]");
    if mount.sub_path.is_some() || mount.sub_path_expr.is_some() {
        return Err(BundleError::Unsupported("subPath".to_owned()));
    }
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .ok_or_else(|| BundleError::Missing(format!("volume {}", mount.name)))?;
    let source = if let Some(host_path) = &volume.host_path {
        let path = settings
            .host_paths
            .get(&volume.name)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&host_path.path));
        host_path_source(&path, host_path.type_.as_deref())?
    } else if let Some(config_map) = &volume.config_map {
        config_map_volume(manifest, config_map, &volumes_dir.join(&volume.name))?
    } else {
        return Err(BundleError::Unsupported(format!(
            "volume {} (only hostPath and configMap volumes are)",
            volume.name
        )));
    };
    let forbidden = |reason: String| BundleError::Forbidden {
        field: format!("{field}.mountPropagation"),
        reason,
    };
    let propagation = match mount.mount_propagation.as_deref() {
        None | Some("None") => Propagation::Private,
        Some("HostToContainer") => Propagation::HostToContainer,
        // The API server's check against the container's privileged flag.
        Some("Bidirectional") => {
            return Err(forbidden(
                "Bidirectional mount propagation is available only to privileged containers"
                    .to_owned(),
            ));
        }
        Some(other) => return Err(forbidden(format!("Unsupported value: {other:?}"))),
    };
    let rro = recursive_read_only(mount, &field, features.recursive_read_only)?;
    if propagation == Propagation::HostToContainer {
        check_shared_or_slave(node, &source)?;
    }
    let mut options = vec![
        "rbind".to_owned(),
        match propagation {
            Propagation::Private => "rprivate",
            Propagation::HostToContainer => "rslave",
        }
        .to_owned(),
    ];
    options.push(
        match (mount.read_only == Some(true), rro) {
            (true, true) => "rro",
            (true, false) => "ro",
            (false, _) => "rw",
        }
        .to_owned(),
    );
    Ok(Mount {
        destination: PathBuf::from(&mount.mount_path),
        kind: "bind".to_owned(),
        source,
        options,
    })
}

/// The OCI configuration of the DaemonSet's container on `node` under a
/// runtime with `features`; configMap volumes are written below
/// `volumes_dir`.
#[allow(
    clippy::too_many_lines,
    reason = "the spec section by section, in the order containerd builds it"
)]
pub fn generate(
    manifest: &Manifest,
    node: &Node,
    features: RuntimeFeatures,
    settings: &PodSettings,
    rootfs: &Path,
    volumes_dir: &Path,
) -> Result<Spec> {
    let pod = manifest.pod()?;
    let container = manifest.container()?;
    let security = Security {
        container: container.security_context.as_ref(),
        pod,
    };
    check_modelled(pod, &security)?;
    if node.apparmor && security.apparmor_type().as_deref() != Some("Unconfined") {
        return Err(BundleError::Unsupported(
            "AppArmor on this host (containerd would load its cri-containerd.apparmor.d profile)"
                .to_owned(),
        ));
    }
    let uid = security.run_as_user().unwrap_or(0);
    if security.run_as_non_root() && uid == 0 {
        return Err(BundleError::Kubelet(
            "container has runAsNonRoot and image will run as root".to_owned(),
        ));
    }
    let to_id =
        |id: i64| u32::try_from(id).map_err(|_| BundleError::Unsupported(format!("id {id}")));
    let capabilities = capabilities(&security)?;
    let seccomp = match security.seccomp_type().as_deref() {
        Some("RuntimeDefault") => Some(seccomp::runtime_default(
            &capabilities.bounding,
            node.kernel,
        )?),
        None | Some("Unconfined") => None,
        Some(other) => return Err(BundleError::Unsupported(format!("seccompProfile {other}"))),
    };

    let cgroup_namespace = node.unified_cgroups();
    let mut cri_mounts = container
        .volume_mounts
        .iter()
        .flatten()
        .enumerate()
        .map(|m| volume_mount(manifest, node, features, settings, volumes_dir, m))
        .collect::<Result<Vec<Mount>>>()?;
    // containerd's orderedMounts: fewer path parts first, so that a mount
    // never hides one below it.
    cri_mounts.sort_by_key(|m| m.destination.components().count());
    let mut mounts: Vec<Mount> = default_mounts(node, cgroup_namespace)
        .into_iter()
        .filter(|d| {
            !cri_mounts.iter().any(|c| {
                c.destination == d.destination
                    || (c.destination == Path::new("/dev") && d.destination.starts_with("/dev"))
            })
        })
        .collect();
    // HostToContainer makes the root rslave, as containerd does.
    let rootfs_propagation = cri_mounts
        .iter()
        .any(|m| m.options.iter().any(|o| o == "rslave"))
        .then(|| "rslave".to_owned());
    mounts.extend(cri_mounts);

    // containerd's defaults, less those the pod shares with the host (in a
    // pod, network, IPC and UTS are the sandbox's, new for the pod: the
    // same for a pod of one container); a cgroup namespace only on unified
    // hosts, as containerd gives none on hybrid or v1 ones.
    let mut namespaces = Vec::new();
    if pod.host_pid != Some(true) {
        namespaces.push(Namespace::new("pid"));
    }
    if pod.host_ipc != Some(true) {
        namespaces.push(Namespace::new("ipc"));
    }
    namespaces.extend([Namespace::new("uts"), Namespace::new("mount")]);
    if pod.host_network != Some(true) {
        namespaces.push(Namespace {
            kind: "network".to_owned(),
            path: settings.network.clone(),
        });
    } else if let Some(node) = &settings.node_network {
        namespaces.push(Namespace {
            kind: "network".to_owned(),
            path: Some(node.clone()),
        });
    }
    if cgroup_namespace {
        namespaces.push(Namespace::new("cgroup"));
    }

    let namespace = manifest
        .daemonset
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Ok(Spec {
        oci_version: "1.0.2".to_owned(),
        process: Process {
            terminal: false,
            user: User {
                uid: to_id(uid)?,
                gid: to_id(security.run_as_group().unwrap_or(0))?,
            },
            args: process_args(container)?,
            env: environment(container, settings, &namespace)?,
            cwd: container
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
            capabilities,
            // containerd's CRI sets no rlimits: the container inherits the
            // runtime's, which the node's service manager decides. This is
            // the smallest one hands out (the kernel's default, and
            // systemd's before 253), so what passes here passes anywhere.
            rlimits: vec![Rlimit {
                kind: "RLIMIT_MEMLOCK".to_owned(),
                hard: DEFAULT_MEMLOCK_BYTES,
                soft: DEFAULT_MEMLOCK_BYTES,
            }],
            no_new_privileges: security
                .container
                .and_then(|s| s.allow_privilege_escalation)
                == Some(false),
        },
        root: Root {
            path: rootfs.to_path_buf(),
            readonly: security
                .container
                .and_then(|s| s.read_only_root_filesystem)
                .unwrap_or(false),
        },
        hostname: settings.pod_name.clone(),
        mounts,
        linux: Linux {
            namespaces,
            cgroups_path: settings.cgroups_path.clone(),
            resources: resources(container)?,
            rootfs_propagation,
            masked_paths: MASKED_PATHS.map(str::to_owned).to_vec(),
            readonly_paths: READONLY_PATHS.map(str::to_owned).to_vec(),
            seccomp,
        },
    })
}

/// A bundle directory: config.json and the configMap volumes; removed on
/// drop.
pub struct Bundle {
    dir: ScratchDir,
    spec: Spec,
}

impl Bundle {
    pub fn create(
        manifest: &Manifest,
        node: &Node,
        features: RuntimeFeatures,
        settings: &PodSettings,
        rootfs: &Rootfs,
    ) -> Result<Bundle> {
        let dir = ScratchDir::new("bundle")?;
        let spec = generate(
            manifest,
            node,
            features,
            settings,
            rootfs.path(),
            &dir.path().join("volumes"),
        )?;
        let bundle = Bundle { dir, spec };
        bundle.write()?;
        Ok(bundle)
    }

    fn write(&self) -> Result<()> {
        let config = self.dir().join("config.json");
        let text = serde_json::to_string_pretty(&self.spec)
            .map_err(|e| BundleError::Runtime(format!("serializing config.json: {e}")))?;
        std::fs::write(&config, text).map_err(io_error("writing", &config))
    }

    /// Runs `args` after the image's entrypoint instead of the manifest's
    /// (another subcommand of the daemon); nothing else changes.
    pub fn replace_args(&mut self, args: Vec<String>) -> Result<()> {
        self.replace_command([ENTRYPOINT.to_owned()].into_iter().chain(args).collect())
    }

    /// Filters system calls with `seccomp` instead, as a runtime with
    /// another default profile would (CRI-O's allows bpf only with
    /// CAP_SYS_ADMIN).
    pub fn replace_seccomp(&mut self, seccomp: Seccomp) -> Result<()> {
        self.spec.linux.seccomp = Some(seccomp);
        self.write()
    }

    /// Runs `command` (a helper of the rootfs) instead, with the same
    /// privileges, mounts and namespaces: a container of the same spec with
    /// another command.
    pub fn replace_command(&mut self, command: Vec<String>) -> Result<()> {
        self.spec.process.args = command;
        self.write()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Where a node path shows inside the container, through the bind
    /// mount of the deepest source holding it.
    pub fn container_path(&self, node_path: &Path) -> Result<PathBuf> {
        self.spec
            .mounts
            .iter()
            .filter(|m| m.kind == "bind")
            .filter_map(|m| {
                let rest = node_path.strip_prefix(&m.source).ok()?;
                Some((m.source.components().count(), m.destination.join(rest)))
            })
            .max_by_key(|(depth, _)| *depth)
            .map(|(_, path)| path)
            .ok_or_else(|| BundleError::Missing(format!("mount showing {}", node_path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
50 42 0:39 /x /sys/fs/bpf/x rw,relatime master:12 - bpf bpf rw
51 23 0:40 / /sys/fs/fuse\\040x rw - fusectl fusectl rw
";

    #[test]
    fn propagation_is_checked_on_the_mount_holding_the_source() {
        let node = Node::from_parts(MOUNTINFO, "6.1.0-13-amd64", false);
        assert_eq!(node.kernel, (6, 1));
        assert!(node.hybrid_cgroups() && !node.unified_cgroups());
        let err = check_shared_or_slave(&node, Path::new("/sys/fs/bpf")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "path \"/sys/fs/bpf\" is mounted on \"/sys/fs/bpf\" but it is not a shared or slave mount"
        );
        check_shared_or_slave(&node, Path::new("/sys/fs/bpf/x/pins")).expect("a slave");
        check_shared_or_slave(&node, Path::new("/sys/fs/cgroup/unified")).expect("shared");
        assert!(node.mount_of(Path::new("/sys/fs/fuse x")).is_some());
    }

    #[test]
    fn quantities_and_cpu_conversion() {
        assert_eq!(quantity("10m", true).unwrap(), 10);
        assert_eq!(quantity("1.5", true).unwrap(), 1500);
        assert_eq!(quantity("128Mi", false).unwrap(), 134_217_728);
        assert_eq!(quantity("1G", false).unwrap(), 1_000_000_000);
        assert!(quantity("3Zi", false).is_err());
    }

    #[test]
    fn recursive_read_only_follows_the_kubelet() {
        let mount = |rro: &str, read_only: bool, propagation: Option<&str>| VolumeMount {
            name: "v".to_owned(),
            mount_path: "/v".to_owned(),
            read_only: Some(read_only),
            recursive_read_only: Some(rro.to_owned()),
            mount_propagation: propagation.map(str::to_owned),
            ..VolumeMount::default()
        };
        let f = "f";
        assert!(!recursive_read_only(&mount("IfPossible", true, None), f, false).unwrap());
        assert!(recursive_read_only(&mount("IfPossible", true, None), f, true).unwrap());
        assert!(recursive_read_only(&mount("Enabled", true, None), f, true).unwrap());
        let unsupported = recursive_read_only(&mount("Enabled", true, None), f, false);
        assert!(unsupported.unwrap_err().to_string().contains(
            "requested recursive read-only mode, but it is not supported by the runtime"
        ));
        assert!(recursive_read_only(&mount("Enabled", false, None), f, true).is_err());
        let slave = mount("IfPossible", true, Some("HostToContainer"));
        assert!(recursive_read_only(&slave, f, true).is_err());
    }
}
