//! The deny rules of the clouds we know, and the defaults used when none
//! are given.

use super::{ConfigError, named::named_values, rules::Rule};

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

/// The deny rules of the presets, merged: the same rule from two presets is
/// kept once; different rules for one prefix are a conflict.
pub fn preset_rules(presets: &[Preset]) -> Result<Vec<Rule>, ConfigError> {
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
