//! The configuration file (YAML, the format a Kubernetes ConfigMap carries),
//! merged under command-line flags and environment variables, and checked as
//! a whole before anything is applied.
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

use crate::{
    k8s::policy::{self, Policy},
    rules::{PrefixLimits, Rule, RuleError, RuleSet},
};

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

/// An enum of a few named values, each name written once: `as_str`,
/// `Display` and `FromStr` use it, and so do the derived clap (flags and
/// environment) and serde (configuration file) impls, so a name cannot
/// differ between them.
macro_rules! named_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Deserialize)]
        pub enum $name {
            $($(#[$variant_meta])* #[value(name = $text)] #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in the order the names are listed.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// Every name, in the same order.
            pub const NAMES: &'static [&'static str] = &[$($text,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;

            fn from_str(text: &str) -> Result<Self, UnknownName> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str() == text)
                    .ok_or_else(|| UnknownName {
                        given: text.to_owned(),
                        expected: Self::NAMES,
                    })
            }
        }
    };
}

/// A name that is none of a [`named_values!`] enum's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{given:?} is not one of {}", expected.join(", "))]
pub struct UnknownName {
    pub given: String,
    pub expected: &'static [&'static str],
}

named_values! {
    /// Whether blocked attempts are refused or only counted.
    pub enum Mode {
        Enforce = "enforce",
        Audit = "audit",
    }
}

/// Default pin root; DaemonSets mount the host's /sys/fs/bpf.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/imds-guard";

named_values! {
    /// Rule sets for the clouds we know.
    pub enum Preset {
        Aws = "aws",
        Gcp = "gcp",
        Azure = "azure",
        Alibaba = "alibaba",
        Openstack = "openstack",
    }
}

impl Preset {
    fn rules(self) -> &'static [&'static str] {
        match self {
            // IMDS on both families, and the ECS task metadata endpoint.
            Preset::Aws => &[
                "169.254.169.254/32",
                "fd00:ec2::254/128",
                "169.254.170.2/32",
            ],
            // The metadata server is also the node's DNS resolver.
            Preset::Gcp => &["169.254.169.254/32 except-ports=53"],
            // IMDS, and the WireServer's agent ports (CVE-2021-27075); its DNS,
            // DHCP and health probes stay open.
            Preset::Azure => &[
                "169.254.169.254/32",
                "168.63.129.16/32 proto=tcp ports=80,32526",
            ],
            // Inside CGNAT space, which can be pod space: the /32 only.
            Preset::Alibaba => &["100.100.100.200/32"],
            Preset::Openstack => &["169.254.169.254/32", "fd00:a9fe:a9fe::254/128"],
        }
    }
}

/// Used when neither presets nor deny rules are given: the metadata address
/// on everything but DNS (safe on every cloud, GCP included), and AWS's
/// IPv6 endpoint.
pub const DEFAULT_DENY: [&str; 2] = ["169.254.169.254/32 except-ports=53", "fd00:ec2::254/128"];

/// Never blocked unless `pass` is given: EKS Pod Identity (both families)
/// and NodeLocal DNSCache, legitimate link-local services for pods.
pub const DEFAULT_PASS: [&str; 3] = ["169.254.170.23/32", "fd00:ec2::23/128", "169.254.20.10/32"];

/// The file, as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    pub mode: Option<Mode>,
    pub presets: Option<Vec<Preset>>,
    pub deny: Option<Vec<String>>,
    pub pass: Option<Vec<String>>,
    pub limits: Option<LimitsFile>,
    pub bpffs_dir: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
    pub standalone: Option<StandaloneFile>,
    pub kubernetes: Option<KubernetesFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesFile {
    pub node_name: Option<String>,
    pub label_key: Option<String>,
    pub pod_allow_value: Option<String>,
    pub namespace_allow_value: Option<String>,
    pub allow_namespaces: Option<Vec<String>>,
    pub pod_cgroup: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsFile {
    pub min_prefix_length_v4: Option<u8>,
    pub min_prefix_length_v6: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StandaloneFile {
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub allow: Vec<PathBuf>,
    pub allow_file: Option<PathBuf>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ConfigFile::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<ConfigFile, serde_yaml_ng::Error> {
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        serde_yaml_ng::from_str(text)
    }
}

/// What the command line and environment say; each given value wins over
/// the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub mode: Option<Mode>,
    pub presets: Vec<Preset>,
    pub deny: Vec<String>,
    pub pass: Vec<String>,
    pub bpffs_dir: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
    pub cgroup: Option<PathBuf>,
    pub allow: Vec<PathBuf>,
    pub allow_file: Option<PathBuf>,
    pub node_name: Option<String>,
    pub label_key: Option<String>,
    pub pod_allow_value: Option<String>,
    pub namespace_allow_value: Option<String>,
    pub allow_namespaces: Vec<String>,
    pub pod_cgroup: Option<PathBuf>,
}

/// Where settings come from: the file, and the flags over it.
#[derive(Debug, Clone)]
pub struct Sources {
    pub config_file: Option<PathBuf>,
    pub overrides: Overrides,
}

impl Sources {
    /// The file as it is now (an empty one when none is given).
    pub fn file(&self) -> Result<ConfigFile, ConfigError> {
        match &self.config_file {
            Some(path) => ConfigFile::load(path),
            None => Ok(ConfigFile::default()),
        }
    }
}

/// A mode's own section of the settings.
pub trait ModeSettings: Sized {
    fn resolve(file: &ConfigFile, flags: &Overrides) -> Result<Self, ConfigError>;
}

/// Everything a mode runs with, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings<M> {
    pub common: Common,
    pub mode: M,
}

impl<M: ModeSettings> Settings<M> {
    /// Reads the file now and merges the flags over it. Run before anything
    /// touches the kernel, so a bad configuration changes nothing.
    pub fn resolve(sources: &Sources) -> Result<Settings<M>, ConfigError> {
        let file = sources.file()?;
        Ok(Settings {
            common: Common::resolve(&file, &sources.overrides)?,
            mode: M::resolve(&file, &sources.overrides)?,
        })
    }
}

/// Settings shared by every mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Common {
    pub mode: Mode,
    pub rules: RuleSet,
    pub bpffs_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub http_listen: Option<SocketAddr>,
}

/// Standalone mode's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standalone {
    pub cgroup: PathBuf,
    pub allow: Vec<PathBuf>,
    pub allow_file: Option<PathBuf>,
}

/// The first non-empty of the flag list and the file list.
fn chosen<T: Clone>(flags: &[T], file: Option<&Vec<T>>) -> Option<Vec<T>> {
    if flags.is_empty() {
        file.cloned()
    } else {
        Some(flags.to_vec())
    }
}

fn limits(file: Option<&LimitsFile>) -> Result<PrefixLimits, ConfigError> {
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

/// The deny rules of the presets, merged: the same rule from two presets is
/// kept once; different rules for one prefix are a conflict.
fn preset_rules(presets: &[Preset]) -> Result<Vec<Rule>, ConfigError> {
    let mut merged: Vec<(Preset, Rule)> = Vec::new();
    for &preset in presets {
        for text in preset.rules() {
            let rule = Rule::parse_deny(text).map_err(|source| ConfigError::Rule {
                field: format!("presets: {preset}"),
                source,
            })?;
            match merged.iter().find(|(_, r)| r.prefix == rule.prefix) {
                Some((_, same)) if *same == rule => {}
                Some((first, _)) => {
                    return Err(ConfigError::PresetConflict {
                        first: *first,
                        second: preset,
                        prefix: rule.prefix.to_string(),
                    });
                }
                None => merged.push((preset, rule)),
            }
        }
    }
    Ok(merged.into_iter().map(|(_, r)| r).collect())
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

impl Common {
    /// Merges flags over the file and checks the rules as a whole.
    pub fn resolve(file: &ConfigFile, flags: &Overrides) -> Result<Common, ConfigError> {
        let presets = chosen(&flags.presets, file.presets.as_ref()).unwrap_or_default();
        let deny_texts = chosen(&flags.deny, file.deny.as_ref()).unwrap_or_default();
        let mut rules = preset_rules(&presets)?;
        rules.extend(parse_list("deny", &deny_texts, Rule::parse_deny)?);
        if presets.is_empty() && deny_texts.is_empty() {
            let defaults: Vec<String> = DEFAULT_DENY.iter().map(|s| (*s).to_owned()).collect();
            rules.extend(parse_list("default deny", &defaults, Rule::parse_deny)?);
        }
        let pass_texts = chosen(&flags.pass, file.pass.as_ref())
            .unwrap_or_else(|| DEFAULT_PASS.iter().map(|s| (*s).to_owned()).collect());
        rules.extend(parse_list("pass", &pass_texts, Rule::parse_pass)?);
        let rules =
            RuleSet::with_limits(rules, limits(file.limits.as_ref())?).map_err(|source| {
                ConfigError::Rule {
                    field: "rules".to_owned(),
                    source,
                }
            })?;
        Ok(Common {
            mode: flags.mode.or(file.mode).unwrap_or(Mode::Enforce),
            rules,
            bpffs_dir: flags
                .bpffs_dir
                .clone()
                .or_else(|| file.bpffs_dir.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)),
            cgroup_root: flags
                .cgroup_root
                .clone()
                .or_else(|| file.cgroup_root.clone()),
            http_listen: flags.http_listen.or(file.http_listen),
        })
    }
}

impl Common {
    /// Applies a reloaded configuration's rules; the settings that shape the
    /// loaded programs keep their running values until the next start.
    pub async fn reload(
        &self,
        new: Common,
        handle: &crate::bpf::owner::EnforcerHandle,
    ) -> Result<Common, crate::bpf::owner::EnforcerError> {
        let at_restart = [
            ("mode", new.mode != self.mode),
            ("bpffsDir", new.bpffs_dir != self.bpffs_dir),
            ("cgroupRoot", new.cgroup_root != self.cgroup_root),
            ("httpListen", new.http_listen != self.http_listen),
        ];
        for (field, changed) in at_restart {
            if changed {
                tracing::warn!(
                    field,
                    "changed in the configuration: it takes effect at the next start"
                );
            }
        }
        if new.rules != self.rules {
            handle.set_rules(new.rules.clone()).await?;
        }
        Ok(Common {
            rules: new.rules,
            ..self.clone()
        })
    }
}

impl ModeSettings for Standalone {
    fn resolve(file: &ConfigFile, flags: &Overrides) -> Result<Standalone, ConfigError> {
        let section = file.standalone.as_ref();
        let cgroup = flags
            .cgroup
            .clone()
            .or_else(|| section.and_then(|s| s.cgroup.clone()))
            .ok_or(ConfigError::NoCgroup)?;
        Ok(Standalone {
            cgroup,
            allow: chosen(&flags.allow, section.map(|s| &s.allow)).unwrap_or_default(),
            allow_file: flags
                .allow_file
                .clone()
                .or_else(|| section.and_then(|s| s.allow_file.clone())),
        })
    }
}

/// Kubernetes mode's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub node_name: String,
    pub policy: Policy,
    /// The pod cgroup subtree, when not found by probing the known layouts.
    pub pod_cgroup: Option<PathBuf>,
}

/// Label keys are `[prefix/]name`, values at most 63 characters of
/// alphanumerics, `-`, `_` and `.`, beginning and ending alphanumeric.
fn valid_label_value(value: &str) -> bool {
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    value.len() <= 63
        && ends_ok(value.chars().next())
        && ends_ok(value.chars().last())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or(("", key), |(p, n)| (p, n));
    let prefix_ok = prefix.len() <= 253
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'));
    prefix_ok && valid_label_value(name)
}

impl ModeSettings for Kubernetes {
    fn resolve(file: &ConfigFile, flags: &Overrides) -> Result<Kubernetes, ConfigError> {
        let section = file.kubernetes.as_ref();
        let pick = |flag: &Option<String>, from_file: Option<&Option<String>>, default: &str| {
            flag.clone()
                .or_else(|| from_file.and_then(Clone::clone))
                .unwrap_or_else(|| default.to_owned())
        };
        let node_name = flags
            .node_name
            .clone()
            .or_else(|| section.and_then(|s| s.node_name.clone()))
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::NoNodeName)?;
        let label_key = pick(
            &flags.label_key,
            section.map(|s| &s.label_key),
            policy::DEFAULT_LABEL_KEY,
        );
        let pod_allow_value = pick(
            &flags.pod_allow_value,
            section.map(|s| &s.pod_allow_value),
            policy::DEFAULT_POD_ALLOW_VALUE,
        );
        let namespace_allow_value = pick(
            &flags.namespace_allow_value,
            section.map(|s| &s.namespace_allow_value),
            policy::DEFAULT_NAMESPACE_ALLOW_VALUE,
        );
        if !valid_label_key(&label_key) {
            return Err(ConfigError::BadLabel {
                field: "labelKey",
                value: label_key,
                what: "key",
            });
        }
        for (field, value) in [
            ("podAllowValue", &pod_allow_value),
            ("namespaceAllowValue", &namespace_allow_value),
        ] {
            if !valid_label_value(value) {
                return Err(ConfigError::BadLabel {
                    field,
                    value: value.clone(),
                    what: "value",
                });
            }
        }
        let allow_namespaces = chosen(
            &flags.allow_namespaces,
            section.and_then(|s| s.allow_namespaces.as_ref()),
        )
        .unwrap_or_else(|| {
            policy::DEFAULT_ALLOW_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        });
        Ok(Kubernetes {
            node_name,
            policy: Policy {
                label_key,
                pod_allow_value,
                namespace_allow_value,
                allow_namespaces: allow_namespaces.into_iter().collect(),
            },
            pod_cgroup: flags
                .pod_cgroup
                .clone()
                .or_else(|| section.and_then(|s| s.pod_cgroup.clone())),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::rules::Action;

    fn resolve(yaml: &str, flags: &Overrides) -> Result<Common, ConfigError> {
        Common::resolve(&ConfigFile::parse(yaml).expect("yaml"), flags)
    }

    fn prefixes(common: &Common, action: Action) -> Vec<String> {
        common
            .rules
            .rules()
            .iter()
            .filter(|r| r.action == action)
            .map(|r| r.to_string())
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
        let common = resolve("", &Overrides::default()).unwrap();
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
            let common = resolve(yaml, &Overrides::default()).unwrap();
            assert_eq!(prefixes(&common, Action::Deny), want, "{yaml}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let yaml = "mode: audit\ndeny: [\"169.254.169.254/32\"]\nbpffsDir: /sys/fs/bpf/from-file";
        let flags = Overrides {
            mode: Some(Mode::Enforce),
            deny: vec!["100.100.100.200/32".to_owned()],
            bpffs_dir: Some("/sys/fs/bpf/from-flag".into()),
            ..Overrides::default()
        };
        let common = resolve(yaml, &flags).unwrap();
        assert_eq!(common.mode, Mode::Enforce);
        assert_eq!(prefixes(&common, Action::Deny), ["100.100.100.200/32"]);
        assert_eq!(common.bpffs_dir, PathBuf::from("/sys/fs/bpf/from-flag"));
        let file_only = resolve(yaml, &Overrides::default()).unwrap();
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
            let parsed = ConfigFile::parse(yaml);
            let result = match parsed {
                Err(err) => Err(err.to_string()),
                Ok(file) => {
                    Common::resolve(&file, &Overrides::default()).map_err(|e| e.to_string())
                }
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
        let file = ConfigFile::parse(
            "standalone:\n  cgroup: system.slice\n  allow: [a, b]\n  allowFile: /etc/allow\n",
        )
        .unwrap();
        let from_file = Standalone::resolve(&file, &Overrides::default()).unwrap();
        assert_eq!(from_file.cgroup, PathBuf::from("system.slice"));
        assert_eq!(from_file.allow, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(from_file.allow_file, Some(PathBuf::from("/etc/allow")));
        let flags = Overrides {
            cgroup: Some("docker".into()),
            allow: vec!["c".into()],
            ..Overrides::default()
        };
        let merged = Standalone::resolve(&file, &flags).unwrap();
        assert_eq!(merged.cgroup, PathBuf::from("docker"));
        assert_eq!(merged.allow, [PathBuf::from("c")]);
        assert!(matches!(
            Standalone::resolve(&ConfigFile::default(), &Overrides::default()),
            Err(ConfigError::NoCgroup)
        ));
    }

    #[test]
    fn kubernetes_section_defaults_flags_and_errors() {
        let flags = Overrides {
            node_name: Some("node-1".to_owned()),
            ..Overrides::default()
        };
        let k = Kubernetes::resolve(&ConfigFile::default(), &flags).unwrap();
        assert_eq!(k.node_name, "node-1");
        assert_eq!(k.policy, Policy::default());
        let file = ConfigFile::parse(
            "kubernetes:\n  nodeName: from-file\n  labelKey: example.com/imds\n  allowNamespaces: [infra]\n",
        )
        .unwrap();
        let k = Kubernetes::resolve(&file, &flags).unwrap();
        assert_eq!(k.node_name, "node-1");
        assert_eq!(k.policy.label_key, "example.com/imds");
        assert_eq!(
            k.policy.allow_namespaces,
            BTreeSet::from(["infra".to_owned()])
        );
        let no_node = Kubernetes::resolve(&ConfigFile::default(), &Overrides::default());
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
            let err = match ConfigFile::parse(yaml) {
                Err(e) => e.to_string(),
                Ok(file) => Kubernetes::resolve(&file, &Overrides::default())
                    .expect_err(yaml)
                    .to_string(),
            };
            assert!(err.contains(want), "{yaml}: {err} lacks {want}");
        }
    }
}
