//! The daemon's settings: one [`Layer`] type that both the configuration
//! file (YAML, the format a Kubernetes ConfigMap carries) and the command
//! line with its environment variables fill; the flags' layer is put over
//! the file's once ([`Stack::over`]), and the result is checked once as a
//! whole ([`Settings::validate`]) before anything is applied. Nothing here
//! touches the kernel or the enforcer.
//!
//! YAML is parsed with `serde_yaml_ng`, a maintained fork of the archived
//! `serde_yaml` with the same serde model: errors carry line and column, and
//! `deny_unknown_fields` turns a misspelt key into an error naming it.
//!
//! ```yaml
//! mode: enforce            # or audit
//! presets: [aws]           # aws, gcp, azure, alibaba, openstack
//! deny:                    # more deny rules (PREFIX [proto=..] [ports=..|except-ports=..])
//!   - "100.100.100.200/32"
//! pass:                    # never refused; defaults: EKS Pod Identity, NodeLocal DNS
//!   - "169.254.170.23/32"
//! limits: { minPrefixLengthV4: 16, minPrefixLengthV6: 64 }
//! bpffsDir: /sys/fs/bpf/imds-guard
//! cgroupRoot: /sys/fs/cgroup
//! httpListen: 0.0.0.0:9464   # /metrics, /healthz, /readyz
//! statusSocket: /run/imds-guard/status.sock   # also /pods (names pods): node-local
//! nodeGuard: on              # forwarded packets and AF_PACKET frames (off: pod sockets only)
//! refusePacketSockets: off   # BPF LSM: no AF_PACKET/AF_XDP sockets (needs CAP_PERFMON)
//! standalone:
//!   cgroup: system.slice
//!   allow: [system.slice/metadata-agent.service]
//!   allowFile: /etc/imds-guard/allow
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub mod labels;
pub mod named;
pub mod presets;
pub mod rules;

pub use named::{Mode, Switch};
pub use presets::Preset;

use labels::LabelPolicy;
use presets::{DEFAULT_DENY, DEFAULT_PASS};
use rules::{PrefixLimits, Rule, RuleError, RuleSet};

/// Default pin root; DaemonSets mount the host's /sys/fs/bpf.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/imds-guard";
/// Where the DaemonSet puts the node-local socket `status` reads pod names from.
pub const DEFAULT_STATUS_SOCKET: &str = "/run/imds-guard/status.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("{field}: {source}")]
    Rule { field: String, source: RuleError },
    #[error(
        "presets {first} and {second} disagree on {prefix}: choose one, or write the rule under deny"
    )]
    PresetConflict {
        first: Preset,
        second: Preset,
        prefix: String,
    },
    #[error("limits.{field}: {value} is not a prefix length (0-{max})")]
    BadLimit {
        field: &'static str,
        value: u8,
        max: u8,
    },
    #[error("no cgroup to protect: give --cgroup or standalone.cgroup in the config file")]
    NoCgroup,
    #[error(
        "no node name: give --node-name or NODE_NAME (a DaemonSet sets it from the downward API)"
    )]
    NoNodeName,
    #[error("kubernetes.{field}: {value:?} is not a valid label {what}")]
    BadLabel {
        field: &'static str,
        value: String,
        what: &'static str,
    },
}

/// One source of settings: the configuration file, or the command line
/// with the environment. Every field is optional (a flag's absence leaves
/// the file's value); the field docs are the flags' help.
#[allow(
    clippy::doc_markdown,
    reason = "field docs are --help text, printed as written"
)]
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Layer {
    /// enforce refuses; audit only counts and reports.
    #[arg(long, value_enum, env = "IMDS_GUARD_MODE")]
    pub mode: Option<Mode>,
    /// Deny rules of a cloud provider. Repeatable.
    #[arg(long = "preset", value_name = "PRESET", value_enum)]
    pub presets: Option<Vec<Preset>>,
    /// Deny rule `PREFIX [proto=LIST] [ports=LIST|except-ports=LIST]`. Repeatable;
    /// with neither presets nor deny rules: 169.254.169.254/32 except-ports=53, fd00:ec2::254/128.
    #[arg(long)]
    pub deny: Option<Vec<String>>,
    /// Prefix never refused, even inside a deny rule (longest prefix wins). Repeatable;
    /// default: 169.254.170.23/32, fd00:ec2::23/128 (EKS Pod Identity), 169.254.20.10/32 (NodeLocal DNS).
    #[arg(long)]
    pub pass: Option<Vec<String>>,
    /// The broadest deny rules accepted (file only).
    #[arg(skip)]
    pub limits: Option<LimitsSection>,
    /// bpffs directory where programs, links and maps are pinned.
    #[arg(long, env = "IMDS_GUARD_BPFFS_DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// Mount point of the cgroup v2 hierarchy (detected when absent).
    #[arg(long, env = "IMDS_GUARD_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Address to serve /metrics, /healthz and /readyz on (e.g. 0.0.0.0:9464).
    #[arg(long, env = "IMDS_GUARD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Node-local (unix) socket that also serves /pods, which names this
    /// node's pods: for `imds-guard status`, not for the network.
    #[arg(long, env = "IMDS_GUARD_STATUS_SOCKET")]
    pub status_socket: Option<PathBuf>,
    /// The node edge guard: tc programs in this network namespace that drop
    /// forwarded packets and AF_PACKET frames to denied destinations (default on).
    #[arg(long, value_enum, env = "IMDS_GUARD_NODE_GUARD")]
    pub node_guard: Option<Switch>,
    /// The BPF LSM on socket creation: refuse AF_PACKET and AF_XDP sockets in
    /// the protected subtree, which skip tc (default off; needs CAP_PERFMON and
    /// the bpf LSM active: deploy/overlays/packet-socket-lsm).
    #[arg(long, value_enum, env = "IMDS_GUARD_REFUSE_PACKET_SOCKETS")]
    pub refuse_packet_sockets: Option<Switch>,
    /// Standalone mode's section; on the command line, the `standalone`
    /// command's own flags.
    #[arg(skip)]
    pub standalone: Option<StandaloneSection>,
    /// Kubernetes mode's section; on the command line, the `run` command's
    /// own flags.
    #[arg(skip)]
    pub kubernetes: Option<KubernetesSection>,
}

/// `limits:` in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsSection {
    pub min_prefix_length_v4: Option<u8>,
    pub min_prefix_length_v6: Option<u8>,
}

/// `standalone:` in the file, or the `standalone` command's flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StandaloneSection {
    /// Cgroup v2 directory whose processes lose metadata access
    /// (absolute, or relative to the cgroup2 mount).
    #[arg(long, env = "IMDS_GUARD_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Cgroup directory that keeps metadata access, with its subtree. Repeatable.
    #[arg(long)]
    pub allow: Option<Vec<PathBuf>>,
    /// File listing allowlisted cgroup directories, one a line; reloaded like the config.
    #[arg(long, env = "IMDS_GUARD_ALLOW_FILE")]
    pub allow_file: Option<PathBuf>,
    /// Cgroup directory whose attempts, with its subtree's, are reported as
    /// audited and let through while the rest enforces (allow wins). Repeatable.
    #[arg(long)]
    pub audit: Option<Vec<PathBuf>>,
}

/// `kubernetes:` in the file, or the `run` command's flags.
#[allow(
    clippy::doc_markdown,
    reason = "field docs are --help text, printed as written"
)]
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesSection {
    /// This node's name (the DaemonSet sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Namespace whose pods may ask for access whatever its labels.
    /// Repeatable; default: kube-system.
    #[arg(long = "allow-namespace", value_name = "ALLOW_NAMESPACE")]
    pub allow_namespaces: Option<Vec<String>>,
    /// Label key on pods and namespaces (default imds-guard.io/metadata-access).
    #[arg(long)]
    pub label_key: Option<String>,
    /// Pod label value that asks for access (default allow).
    #[arg(long)]
    pub pod_allow_value: Option<String>,
    /// Namespace label value that permits its pods to ask (default allow-pods).
    #[arg(long)]
    pub namespace_allow_value: Option<String>,
    /// Pod cgroup subtree, when not one of the known kubelet layouts.
    #[arg(long)]
    pub pod_cgroup: Option<PathBuf>,
    /// Namespace label key whose value `audit` makes that namespace's pods
    /// audited rather than refused (default imds-guard.io/mode).
    #[arg(long)]
    pub mode_label_key: Option<String>,
    /// Kubeconfig file to reach the API server with (default: in-cluster,
    /// or KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Key of the node taint the kubelet registers the node with and the
    /// daemon removes once it enforces (imds-guard.io/not-ready in the
    /// startup-taint component; default: none, taints are left alone).
    #[arg(long)]
    pub startup_taint: Option<String>,
}

/// Settings that stack: the top layer's value wins wherever it has one.
pub trait Stack {
    #[must_use]
    fn over(self, under: Self) -> Self;
}

impl<T: Stack> Stack for Option<T> {
    fn over(self, under: Self) -> Self {
        match (self, under) {
            (Some(top), Some(under)) => Some(top.over(under)),
            (top, under) => top.or(under),
        }
    }
}

/// Implements [`Stack`] for a struct of optional fields: a plain field
/// keeps the top value when it is given, a section stacks in turn. Every
/// field must be listed (the struct expression checks it).
macro_rules! stack_fields {
    ($type:ident { $($field:ident),* } sections { $($section:ident),* }) => {
        impl Stack for $type {
            fn over(self, under: Self) -> Self {
                $type {
                    $($field: self.$field.or(under.$field),)*
                    $($section: self.$section.over(under.$section),)*
                }
            }
        }
    };
}

stack_fields!(Layer {
    mode, presets, deny, pass, limits, bpffs_dir, cgroup_root, http_listen, status_socket,
    node_guard, refuse_packet_sockets
} sections { standalone, kubernetes });
stack_fields!(StandaloneSection { cgroup, allow, allow_file, audit } sections {});
stack_fields!(KubernetesSection {
    node_name, allow_namespaces, label_key, pod_allow_value, namespace_allow_value, pod_cgroup,
    mode_label_key, kubeconfig, startup_taint
} sections {});

impl Layer {
    /// Reads the configuration file.
    pub fn load(path: &Path) -> Result<Layer, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Layer::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses configuration file text; an empty file sets nothing.
    pub fn parse(text: &str) -> Result<Layer, serde_yaml_ng::Error> {
        if text.trim().is_empty() {
            return Ok(Layer::default());
        }
        serde_yaml_ng::from_str(text)
    }
}

/// Where settings come from: the file, and the flags over it.
#[derive(Clone, Debug)]
pub struct Sources {
    pub config_file: Option<PathBuf>,
    pub flags: Layer,
}

impl Sources {
    /// The flags over the file as it is now (an empty one when none is given).
    pub fn merged(&self) -> Result<Layer, ConfigError> {
        let file = match &self.config_file {
            Some(path) => Layer::load(path)?,
            None => Layer::default(),
        };
        Ok(self.flags.clone().over(file))
    }
}

/// A mode's own settings, checked.
pub trait ModeSettings: Sized + Clone {
    /// Checks this mode's section of merged settings, filling in defaults.
    fn validate(layer: &Layer) -> Result<Self, ConfigError>;

    /// The settings, by file key, that shape what is loaded and attached
    /// and that `new` changes: they take effect at the next start.
    fn changed_at_restart(&self, new: &Self) -> Vec<&'static str>;

    /// `new`, with the settings that take effect at the next start kept
    /// at their running values.
    #[must_use]
    fn reloaded(&self, new: Self) -> Self;
}

/// Everything a mode runs with, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings<M> {
    pub common: Common,
    pub mode: M,
}

impl<M: ModeSettings> Settings<M> {
    /// Checks merged settings as a whole.
    pub fn validate(layer: &Layer) -> Result<Settings<M>, ConfigError> {
        Ok(Settings {
            common: Common::validate(layer)?,
            mode: M::validate(layer)?,
        })
    }

    /// Reads the file now, puts the flags over it and checks the result.
    /// Run before anything touches the kernel, so a bad configuration
    /// changes nothing.
    pub fn resolve(sources: &Sources) -> Result<Settings<M>, ConfigError> {
        Settings::validate(&sources.merged()?)
    }

    /// What a reloaded configuration changes: the settings to run with, and
    /// the changed ones (by file key) that only take effect at the next start.
    #[must_use]
    pub fn reloaded(&self, new: Settings<M>) -> (Settings<M>, Vec<&'static str>) {
        let mut at_restart = self.mode.changed_at_restart(&new.mode);
        at_restart.extend(self.common.changed_at_restart(&new.common));
        let settings = Settings {
            common: Common {
                rules: new.common.rules,
                ..self.common.clone()
            },
            mode: self.mode.reloaded(new.mode),
        };
        (settings, at_restart)
    }
}

/// Settings shared by every mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Common {
    pub mode: Mode,
    pub rules: RuleSet,
    pub bpffs_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// Where `/pods` is served too, node-local, if anywhere.
    pub status_socket: Option<PathBuf>,
    pub node_guard: Switch,
    pub refuse_packet_sockets: Switch,
}

fn limits(file: Option<&LimitsSection>) -> Result<PrefixLimits, ConfigError> {
    let default = PrefixLimits::default();
    let check = |field: &'static str, value: Option<u8>, default: u8, max: u8| {
        let value = value.unwrap_or(default);
        if value > max {
            return Err(ConfigError::BadLimit { field, value, max });
        }
        Ok(value)
    };
    Ok(PrefixLimits {
        min_len_v4: check(
            "minPrefixLengthV4",
            file.and_then(|l| l.min_prefix_length_v4),
            default.min_len_v4,
            32,
        )?,
        min_len_v6: check(
            "minPrefixLengthV6",
            file.and_then(|l| l.min_prefix_length_v6),
            default.min_len_v6,
            128,
        )?,
    })
}

fn parse_list(
    field: &str,
    texts: &[String],
    parse: fn(&str) -> Result<Rule, RuleError>,
) -> Result<Vec<Rule>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            parse(text).map_err(|source| ConfigError::Rule {
                field: format!("{field}[{i}]"),
                source,
            })
        })
        .collect()
}

fn owned(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|s| (*s).to_owned()).collect()
}

impl Common {
    /// Checks the shared settings, the rules as a whole.
    pub fn validate(layer: &Layer) -> Result<Common, ConfigError> {
        let presets = layer.presets.as_deref().unwrap_or_default();
        let deny_texts = layer.deny.as_deref().unwrap_or_default();
        let mut rules = presets::preset_rules(presets)?;
        rules.extend(parse_list("deny", deny_texts, Rule::parse_deny)?);
        if presets.is_empty() && deny_texts.is_empty() {
            rules.extend(parse_list(
                "default deny",
                &owned(&DEFAULT_DENY),
                Rule::parse_deny,
            )?);
        }
        let pass_texts = layer.pass.clone().unwrap_or_else(|| owned(&DEFAULT_PASS));
        rules.extend(parse_list("pass", &pass_texts, Rule::parse_pass)?);
        let rules =
            RuleSet::with_limits(rules, limits(layer.limits.as_ref())?).map_err(|source| {
                ConfigError::Rule {
                    field: "rules".to_owned(),
                    source,
                }
            })?;
        Ok(Common {
            mode: layer.mode.unwrap_or(Mode::Enforce),
            rules,
            bpffs_dir: layer
                .bpffs_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)),
            cgroup_root: layer.cgroup_root.clone(),
            http_listen: layer.http_listen,
            status_socket: layer.status_socket.clone(),
            node_guard: layer.node_guard.unwrap_or(Switch::On),
            refuse_packet_sockets: layer.refuse_packet_sockets.unwrap_or(Switch::Off),
        })
    }

    /// The shared settings that shape the loaded programs (or the
    /// endpoints) and that `new` changes, by file key.
    pub fn changed_at_restart(&self, new: &Common) -> Vec<&'static str> {
        [
            ("mode", new.mode != self.mode),
            ("bpffsDir", new.bpffs_dir != self.bpffs_dir),
            ("cgroupRoot", new.cgroup_root != self.cgroup_root),
            ("httpListen", new.http_listen != self.http_listen),
            ("statusSocket", new.status_socket != self.status_socket),
            ("nodeGuard", new.node_guard != self.node_guard),
            (
                "refusePacketSockets",
                new.refuse_packet_sockets != self.refuse_packet_sockets,
            ),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }
}

/// Standalone mode's own settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standalone {
    pub cgroup: PathBuf,
    pub allow: Vec<PathBuf>,
    pub allow_file: Option<PathBuf>,
    pub audit: Vec<PathBuf>,
}

impl ModeSettings for Standalone {
    fn validate(layer: &Layer) -> Result<Standalone, ConfigError> {
        let section = layer.standalone.clone().unwrap_or_default();
        Ok(Standalone {
            cgroup: section.cgroup.ok_or(ConfigError::NoCgroup)?,
            allow: section.allow.unwrap_or_default(),
            allow_file: section.allow_file,
            audit: section.audit.unwrap_or_default(),
        })
    }

    fn changed_at_restart(&self, new: &Standalone) -> Vec<&'static str> {
        if new.cgroup == self.cgroup {
            Vec::new()
        } else {
            vec!["cgroup"]
        }
    }

    fn reloaded(&self, new: Standalone) -> Standalone {
        Standalone {
            cgroup: self.cgroup.clone(),
            ..new
        }
    }
}

/// Kubernetes mode's own settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubernetes {
    pub node_name: String,
    pub policy: LabelPolicy,
    /// The pod cgroup subtree, when not found by probing the known layouts.
    pub pod_cgroup: Option<PathBuf>,
    /// `None`: in-cluster configuration, or KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    /// The taint key to remove from this node once enforcing; `None` leaves
    /// taints alone.
    pub startup_taint: Option<String>,
}

impl ModeSettings for Kubernetes {
    fn validate(layer: &Layer) -> Result<Kubernetes, ConfigError> {
        let section = layer.kubernetes.clone().unwrap_or_default();
        let node_name = section
            .node_name
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::NoNodeName)?;
        let label_key = section
            .label_key
            .unwrap_or_else(|| labels::DEFAULT_LABEL_KEY.to_owned());
        let pod_allow_value = section
            .pod_allow_value
            .unwrap_or_else(|| labels::DEFAULT_POD_ALLOW_VALUE.to_owned());
        let namespace_allow_value = section
            .namespace_allow_value
            .unwrap_or_else(|| labels::DEFAULT_NAMESPACE_ALLOW_VALUE.to_owned());
        let mode_label_key = section
            .mode_label_key
            .unwrap_or_else(|| labels::DEFAULT_MODE_LABEL_KEY.to_owned());
        let startup_taint = section.startup_taint.unwrap_or_default();
        for (field, key) in [
            ("labelKey", &label_key),
            ("modeLabelKey", &mode_label_key),
            ("startupTaint", &startup_taint),
        ] {
            let may_be_empty = field == "startupTaint";
            if !(labels::valid_label_key(key) || may_be_empty && key.is_empty()) {
                return Err(ConfigError::BadLabel {
                    field,
                    value: key.clone(),
                    what: "key",
                });
            }
        }
        for (field, value) in [
            ("podAllowValue", &pod_allow_value),
            ("namespaceAllowValue", &namespace_allow_value),
        ] {
            if !labels::valid_label_value(value) {
                return Err(ConfigError::BadLabel {
                    field,
                    value: value.clone(),
                    what: "value",
                });
            }
        }
        let allow_namespaces = section
            .allow_namespaces
            .unwrap_or_else(|| owned(&labels::DEFAULT_ALLOW_NAMESPACES));
        Ok(Kubernetes {
            node_name,
            policy: LabelPolicy {
                label_key,
                pod_allow_value,
                namespace_allow_value,
                allow_namespaces: allow_namespaces.into_iter().collect(),
                mode_label_key,
            },
            pod_cgroup: section.pod_cgroup,
            kubeconfig: section.kubeconfig,
            startup_taint: (!startup_taint.is_empty()).then_some(startup_taint),
        })
    }

    fn changed_at_restart(&self, new: &Kubernetes) -> Vec<&'static str> {
        [
            ("nodeName", new.node_name != self.node_name),
            ("podCgroup", new.pod_cgroup != self.pod_cgroup),
            ("kubeconfig", new.kubeconfig != self.kubeconfig),
            ("startupTaint", new.startup_taint != self.startup_taint),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }

    fn reloaded(&self, new: Kubernetes) -> Kubernetes {
        Kubernetes {
            policy: new.policy,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use rules::Action;

    /// The flags over the file, checked as the daemon does at start.
    fn resolve(yaml: &str, flags: &Layer) -> Result<Common, ConfigError> {
        Common::validate(&flags.clone().over(Layer::parse(yaml).expect("yaml")))
    }

    fn flags_for_standalone(section: StandaloneSection) -> Layer {
        Layer {
            standalone: Some(section),
            ..Layer::default()
        }
    }

    fn flags_for_kubernetes(section: KubernetesSection) -> Layer {
        Layer {
            kubernetes: Some(section),
            ..Layer::default()
        }
    }

    fn prefixes(common: &Common, action: Action) -> Vec<String> {
        common
            .rules
            .rules()
            .iter()
            .filter(|r| r.action == action)
            .map(ToString::to_string)
            .collect()
    }

    /// One name per value, the same for `as_str`, `FromStr`, the command
    /// line and the configuration file.
    #[test]
    fn named_values_read_back_the_same_everywhere() {
        fn check<T>(all: &[T])
        where
            T: Copy + std::fmt::Debug + PartialEq + std::fmt::Display + std::str::FromStr,
            T: clap::ValueEnum + serde::de::DeserializeOwned,
        {
            for &value in all {
                let name = value.to_string();
                assert_eq!(name.parse::<T>().ok(), Some(value), "{name}");
                assert_eq!(
                    <T as clap::ValueEnum>::from_str(&name, false),
                    Ok(value),
                    "{name}"
                );
                assert_eq!(
                    serde_yaml_ng::from_str::<T>(&name).ok(),
                    Some(value),
                    "{name}"
                );
            }
            assert!("no-such-name".parse::<T>().is_err());
        }
        check(Mode::ALL);
        check(Preset::ALL);
        assert_eq!(Mode::NAMES, ["enforce", "audit"]);
    }

    #[test]
    fn empty_config_gives_the_defaults() {
        let common = resolve("", &Layer::default()).unwrap();
        assert_eq!(common.mode, Mode::Enforce);
        assert_eq!(common.bpffs_dir, PathBuf::from("/sys/fs/bpf/imds-guard"));
        assert_eq!(prefixes(&common, Action::Deny), DEFAULT_DENY);
        assert_eq!(
            prefixes(&common, Action::Pass),
            [
                "169.254.170.23/32 (pass)",
                "fd00:ec2::23/128 (pass)",
                "169.254.20.10/32 (pass)"
            ]
        );
    }

    #[test]
    fn presets_expand_and_merge() {
        let cases: [(&str, &[&str]); 4] = [
            (
                "presets: [aws]",
                &[
                    "169.254.169.254/32",
                    "fd00:ec2::254/128",
                    "169.254.170.2/32",
                ],
            ),
            ("presets: [gcp]", &["169.254.169.254/32 except-ports=53"]),
            (
                "presets: [azure, openstack]",
                &[
                    "169.254.169.254/32",
                    "168.63.129.16/32 proto=tcp ports=80,32526",
                    "fd00:a9fe:a9fe::254/128",
                ],
            ),
            (
                "presets: [alibaba]\ndeny: [\"169.254.169.254/32\"]",
                &["100.100.100.200/32", "169.254.169.254/32"],
            ),
        ];
        for (yaml, want) in cases {
            let common = resolve(yaml, &Layer::default()).unwrap();
            assert_eq!(prefixes(&common, Action::Deny), want, "{yaml}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let yaml = "mode: audit\ndeny: [\"169.254.169.254/32\"]\nbpffsDir: /sys/fs/bpf/from-file";
        let flags = Layer {
            mode: Some(Mode::Enforce),
            deny: Some(vec!["100.100.100.200/32".to_owned()]),
            bpffs_dir: Some("/sys/fs/bpf/from-flag".into()),
            ..Layer::default()
        };
        let common = resolve(yaml, &flags).unwrap();
        assert_eq!(common.mode, Mode::Enforce);
        assert_eq!(prefixes(&common, Action::Deny), ["100.100.100.200/32"]);
        assert_eq!(common.bpffs_dir, PathBuf::from("/sys/fs/bpf/from-flag"));
        let file_only = resolve(yaml, &Layer::default()).unwrap();
        assert_eq!(file_only.mode, Mode::Audit);
    }

    #[test]
    fn bad_configs_name_the_field_and_value() {
        let cases = [
            ("mode: block", "unknown variant `block`"),
            (
                "deny: [\"169.254.169.254/33\"]",
                "deny[0]: rule \"169.254.169.254/33\"",
            ),
            ("deny: [\"1.2.3.4\", \"x\"]", "deny[1]: rule \"x\""),
            (
                "deny: [\"169.254.169.254 proto=sctp\"]",
                "unknown protocol \"sctp\"",
            ),
            (
                "deny: [\"169.254.169.254 ports=70000\"]",
                "\"70000\" is not a port",
            ),
            ("deny: [\"0.0.0.0/0\"]", "broader than the allowed /16"),
            ("deny: [\"10.0.0.0/8\"]\nlimits: {minPrefixLengthV4: 8}", ""),
            (
                "limits: {minPrefixLengthV4: 40}",
                "limits.minPrefixLengthV4: 40",
            ),
            ("deny: []\npresets: []\npass: []", ""),
            (
                "deny: [\"1.2.3.4\", \"1.2.3.4/32 proto=tcp\"]",
                "1.2.3.4/32 appears in more than one rule",
            ),
            (
                "pass: [\"169.254.169.254\"]",
                "169.254.169.254/32 appears in more than one rule",
            ),
            (
                "presets: [aws, gcp]",
                "presets aws and gcp disagree on 169.254.169.254/32",
            ),
            ("presets: [moon]", "unknown variant `moon`"),
            ("denny: []", "unknown field `denny`"),
            ("standalone: {cgroup: x, alow: []}", "unknown field `alow`"),
        ];
        for (yaml, want) in cases {
            let result = match Layer::parse(yaml) {
                Err(err) => Err(err.to_string()),
                Ok(file) => Common::validate(&file).map_err(|e| e.to_string()),
            };
            match (result, want) {
                (Ok(_), "") => {}
                (Ok(common), want) => panic!("{yaml:?} should fail with {want:?}, got {common:?}"),
                (Err(err), "") => panic!("{yaml:?} should pass, got {err}"),
                (Err(err), want) => assert!(err.contains(want), "{yaml:?}: {err:?} lacks {want:?}"),
            }
        }
    }

    #[test]
    fn standalone_section_and_flags() {
        let file = Layer::parse(
            "standalone:\n  cgroup: system.slice\n  allow: [a, b]\n  allowFile: /etc/allow\n",
        )
        .unwrap();
        let from_file = Standalone::validate(&file).unwrap();
        assert_eq!(from_file.cgroup, PathBuf::from("system.slice"));
        assert_eq!(from_file.allow, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(from_file.allow_file, Some(PathBuf::from("/etc/allow")));
        let flags = flags_for_standalone(StandaloneSection {
            cgroup: Some("docker".into()),
            allow: Some(vec!["c".into()]),
            ..StandaloneSection::default()
        });
        let merged = Standalone::validate(&flags.over(file)).unwrap();
        assert_eq!(merged.cgroup, PathBuf::from("docker"));
        assert_eq!(merged.allow, [PathBuf::from("c")]);
        // What the flags leave unset comes from the file's section.
        assert_eq!(merged.allow_file, Some(PathBuf::from("/etc/allow")));
        assert!(matches!(
            Standalone::validate(&Layer::default()),
            Err(ConfigError::NoCgroup)
        ));
    }

    #[test]
    fn kubernetes_section_defaults_flags_and_errors() {
        let flags = flags_for_kubernetes(KubernetesSection {
            node_name: Some("node-1".to_owned()),
            ..KubernetesSection::default()
        });
        let k = Kubernetes::validate(&flags).unwrap();
        assert_eq!(k.node_name, "node-1");
        assert_eq!(k.policy, LabelPolicy::default());
        let file = Layer::parse(
            "kubernetes:\n  nodeName: from-file\n  labelKey: example.com/imds\n  allowNamespaces: [infra]\n",
        )
        .unwrap();
        let k = Kubernetes::validate(&flags.over(file)).unwrap();
        assert_eq!(k.node_name, "node-1");
        assert_eq!(k.policy.label_key, "example.com/imds");
        assert_eq!(
            k.policy.allow_namespaces,
            BTreeSet::from(["infra".to_owned()])
        );
        let no_node = Kubernetes::validate(&Layer::default());
        assert!(matches!(no_node, Err(ConfigError::NoNodeName)));
        let cases = [
            (
                "kubernetes: {nodeName: n, labelKey: \"bad key\"}",
                "kubernetes.labelKey: \"bad key\"",
            ),
            (
                "kubernetes: {nodeName: n, podAllowValue: \"-x\"}",
                "kubernetes.podAllowValue",
            ),
            (
                "kubernetes: {nodeName: n, namespaceAllowValue: \"\"}",
                "kubernetes.namespaceAllowValue",
            ),
            (
                "kubernetes: {nodeName: n, lableKey: x}",
                "unknown field `lableKey`",
            ),
        ];
        for (yaml, want) in cases {
            let err = match Layer::parse(yaml) {
                Err(e) => e.to_string(),
                Ok(file) => Kubernetes::validate(&file).expect_err(yaml).to_string(),
            };
            assert!(err.contains(want), "{yaml}: {err} lacks {want}");
        }
    }

    #[test]
    fn a_reload_keeps_what_takes_effect_at_the_next_start() {
        let settings = |yaml: &str| -> Settings<Standalone> {
            Settings::validate(&Layer::parse(yaml).expect("yaml")).expect("valid")
        };
        let running = settings("standalone: {cgroup: a, allow: [x]}");
        let new = settings(
            "mode: audit\nbpffsDir: /other\ndeny: [\"1.2.3.4/32\"]\nstandalone: {cgroup: b, allow: [y]}",
        );
        let (reloaded, at_restart) = running.reloaded(new.clone());
        assert_eq!(at_restart, ["cgroup", "mode", "bpffsDir"]);
        assert_eq!(reloaded.common.rules, new.common.rules);
        assert_eq!(reloaded.common.mode, Mode::Enforce);
        assert_eq!(reloaded.common.bpffs_dir, running.common.bpffs_dir);
        assert_eq!(reloaded.mode.cgroup, PathBuf::from("a"));
        assert_eq!(reloaded.mode.allow, [PathBuf::from("y")]);

        let kubernetes = |yaml: &str| -> Settings<Kubernetes> {
            Settings::validate(&Layer::parse(yaml).expect("yaml")).expect("valid")
        };
        let running = kubernetes("kubernetes: {nodeName: n1}");
        let new = kubernetes("kubernetes: {nodeName: n2, podCgroup: p, labelKey: example.com/k}");
        let (reloaded, at_restart) = running.reloaded(new);
        assert_eq!(at_restart, ["nodeName", "podCgroup"]);
        assert_eq!(reloaded.mode.node_name, "n1");
        assert_eq!(reloaded.mode.pod_cgroup, None);
        assert_eq!(reloaded.mode.policy.label_key, "example.com/k");
        assert_eq!(running.reloaded(running.clone()).1, Vec::<&str>::new());
    }
}
