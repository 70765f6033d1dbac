//! Destination rules as people write them, their defaults, and their
//! translation to the kernel's trie entries.
//!
//! A rule reads `PREFIX [proto=LIST] [ports=LIST | except-ports=LIST]`, e.g.
//! `169.254.169.254/32 except-ports=53` or
//! `168.63.129.16/32 proto=tcp ports=80,32526`. Lists are comma-separated;
//! ports may be ranges (`8000-8100`). A pass rule is a bare prefix that is
//! never refused, even inside a broader deny (longest prefix wins).

use std::{fmt, net::IpAddr, str::FromStr};

use enforcer_common::{
    AddrBytes, DestRule, IPV4_MAPPED_PREFIX_BITS, ipv4_mapped,
    rule::{
        ACTION_DENY, MAX_PORT_RANGES, PORTS_ALL, PORTS_EXCEPT, PORTS_ONLY, PROTO_ANY, PROTO_ICMP,
        PROTO_OTHER, PROTO_TCP, PROTO_UDP, PortRange,
    },
};
use ipnet::IpNet;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("rule {rule:?}: {prefix:?} is not an IP prefix (expected e.g. 169.254.169.254/32)")]
    BadPrefix { rule: String, prefix: String },
    #[error("rule {rule:?}: {prefix} has host bits set; did you mean {network}?")]
    HostBits {
        rule: String,
        prefix: String,
        network: String,
    },
    #[error("rule {rule:?}: unknown protocol {protocol:?} (expected any, tcp, udp or icmp)")]
    UnknownProtocol { rule: String, protocol: String },
    #[error("rule {rule:?}: {port:?} is not a port or port range in 1-65535")]
    BadPort { rule: String, port: String },
    #[error("rule {rule:?}: at most {MAX_PORT_RANGES} port ranges per rule")]
    TooManyPorts { rule: String },
    #[error("rule {rule:?}: unknown setting {word:?} (expected proto=, ports= or except-ports=)")]
    UnknownSetting { rule: String, word: String },
    #[error("rule {rule:?}: ports= and except-ports= cannot be combined")]
    ConflictingPorts { rule: String },
    #[error("rule {rule:?}: {what} given twice")]
    Repeated { rule: String, what: &'static str },
    #[error("rule {rule:?} is empty")]
    Empty { rule: String },
    #[error("rule {rule:?}: the prefix /{len} is broader than the allowed /{limit}")]
    TooBroad { rule: String, len: u8, limit: u8 },
    #[error("{prefix} appears in more than one rule")]
    Duplicate { prefix: IpNet },
    #[error("no deny rule given: imds-guard would enforce nothing")]
    NoDenyRule,
}

/// What a rule does to matching traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Deny,
    /// Never refused: a carve-out inside a broader deny.
    Pass,
}

/// Which destination ports a deny rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    All,
    Only(Vec<PortRange>),
    Except(Vec<PortRange>),
}

/// One destination rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub prefix: IpNet,
    pub action: Action,
    /// Bits of `enforcer_common::rule::PROTO_*`.
    pub protocols: u32,
    pub ports: Ports,
}

impl Rule {
    /// A deny rule from its textual form.
    pub fn parse_deny(text: &str) -> Result<Rule, RuleError> {
        let rule = || text.to_owned();
        let mut words = text.split_whitespace();
        let prefix_word = words
            .next()
            .ok_or_else(|| RuleError::Empty { rule: rule() })?;
        let prefix = parse_prefix(text, prefix_word)?;
        let mut protocols = None;
        let mut ports = None;
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| RuleError::UnknownSetting {
                    rule: rule(),
                    word: word.to_owned(),
                })?;
            match key {
                "proto" => {
                    if protocols.is_some() {
                        return Err(RuleError::Repeated {
                            rule: rule(),
                            what: "proto=",
                        });
                    }
                    protocols = Some(parse_protocols(text, value)?);
                }
                "ports" | "except-ports" => {
                    if ports.is_some() {
                        return Err(RuleError::ConflictingPorts { rule: rule() });
                    }
                    let ranges = parse_ports(text, value)?;
                    ports = Some(if key == "ports" {
                        Ports::Only(ranges)
                    } else {
                        Ports::Except(ranges)
                    });
                }
                _ => {
                    return Err(RuleError::UnknownSetting {
                        rule: rule(),
                        word: word.to_owned(),
                    });
                }
            }
        }
        Ok(Rule {
            prefix,
            action: Action::Deny,
            protocols: protocols.unwrap_or(PROTO_ANY),
            ports: ports.unwrap_or(Ports::All),
        })
    }

    /// A pass rule from a bare prefix.
    pub fn parse_pass(text: &str) -> Result<Rule, RuleError> {
        let prefix_word = text.trim();
        if prefix_word.is_empty() {
            return Err(RuleError::Empty {
                rule: text.to_owned(),
            });
        }
        Ok(Rule {
            prefix: parse_prefix(text, prefix_word)?,
            action: Action::Pass,
            protocols: PROTO_ANY,
            ports: Ports::All,
        })
    }

    /// The trie key (prefix length, address bytes) of this rule.
    pub fn kernel_key(&self) -> (u32, AddrBytes) {
        match self.prefix {
            IpNet::V4(net) => (
                u32::from(net.prefix_len()) + IPV4_MAPPED_PREFIX_BITS,
                ipv4_mapped(net.network().octets()),
            ),
            IpNet::V6(net) => (u32::from(net.prefix_len()), net.network().octets()),
        }
    }

    /// The trie value of this rule.
    pub fn kernel_value(&self) -> DestRule {
        if self.action == Action::Pass {
            return DestRule::PASS;
        }
        let (port_scope, ranges): (u32, &[PortRange]) = match &self.ports {
            Ports::All => (PORTS_ALL, &[]),
            Ports::Only(r) => (PORTS_ONLY, r),
            Ports::Except(r) => (PORTS_EXCEPT, r),
        };
        let mut port_ranges = [PortRange::default(); MAX_PORT_RANGES];
        port_ranges[..ranges.len()].copy_from_slice(ranges);
        DestRule {
            action: ACTION_DENY,
            protocols: self.protocols,
            port_scope,
            // At most MAX_PORT_RANGES, as the slice above requires.
            port_range_count: u32::try_from(ranges.len()).unwrap_or(u32::MAX),
            port_ranges,
        }
    }

    /// The rule a trie entry holds (the inverse of `kernel_key` and
    /// `kernel_value`); `None` for an entry no rule could have written.
    pub fn from_kernel(prefix_len: u32, addr: AddrBytes, value: &DestRule) -> Option<Rule> {
        let v6 = std::net::Ipv6Addr::from(addr);
        let prefix = match v6.to_ipv4_mapped() {
            Some(v4) if prefix_len >= IPV4_MAPPED_PREFIX_BITS => IpNet::new(
                IpAddr::V4(v4),
                u8::try_from(prefix_len - IPV4_MAPPED_PREFIX_BITS).ok()?,
            )
            .ok()?,
            _ => IpNet::new(IpAddr::V6(v6), u8::try_from(prefix_len).ok()?).ok()?,
        };
        if value.action != ACTION_DENY {
            return Some(Rule {
                prefix,
                action: Action::Pass,
                protocols: PROTO_ANY,
                ports: Ports::All,
            });
        }
        let count = (value.port_range_count as usize).min(MAX_PORT_RANGES);
        let ranges = value.port_ranges[..count].to_vec();
        let ports = match value.port_scope {
            PORTS_ONLY => Ports::Only(ranges),
            PORTS_EXCEPT => Ports::Except(ranges),
            _ => Ports::All,
        };
        Some(Rule {
            prefix,
            action: Action::Deny,
            protocols: value.protocols,
            ports,
        })
    }

    /// Whether this rule covers `addr` (prefix only).
    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.prefix.contains(addr)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.prefix)?;
        if self.action == Action::Pass {
            return write!(f, " (pass)");
        }
        if self.protocols != PROTO_ANY {
            let names: Vec<&str> = PROTOCOL_NAMES
                .iter()
                .filter(|(_, bit)| self.protocols & bit != 0)
                .map(|(name, _)| *name)
                .collect();
            write!(f, " proto={}", names.join(","))?;
        }
        let (key, ranges) = match &self.ports {
            Ports::All => return Ok(()),
            Ports::Only(r) => ("ports", r),
            Ports::Except(r) => ("except-ports", r),
        };
        let ranges: Vec<String> = ranges
            .iter()
            .map(|r| {
                if r.first == r.last {
                    r.first.to_string()
                } else {
                    format!("{}-{}", r.first, r.last)
                }
            })
            .collect();
        write!(f, " {key}={}", ranges.join(","))
    }
}

impl FromStr for Rule {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rule::parse_deny(s)
    }
}

const PROTOCOL_NAMES: [(&str, u32); 4] = [
    ("tcp", PROTO_TCP),
    ("udp", PROTO_UDP),
    ("icmp", PROTO_ICMP),
    ("other", PROTO_OTHER),
];

fn parse_prefix(rule: &str, word: &str) -> Result<IpNet, RuleError> {
    let bad = || RuleError::BadPrefix {
        rule: rule.to_owned(),
        prefix: word.to_owned(),
    };
    // A bare address means the single host.
    let net = match word.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(word.parse::<IpAddr>().map_err(|_| bad())?),
    };
    if net.trunc() != net {
        return Err(RuleError::HostBits {
            rule: rule.to_owned(),
            prefix: word.to_owned(),
            network: net.trunc().to_string(),
        });
    }
    Ok(net)
}

fn parse_protocols(rule: &str, list: &str) -> Result<u32, RuleError> {
    let mut bits = 0;
    for name in list.split(',') {
        let name = name.trim().to_ascii_lowercase();
        bits |= match name.as_str() {
            "any" | "all" => PROTO_ANY,
            "icmpv6" => PROTO_ICMP,
            _ => PROTOCOL_NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, bit)| *bit)
                .ok_or_else(|| RuleError::UnknownProtocol {
                    rule: rule.to_owned(),
                    protocol: name.clone(),
                })?,
        };
    }
    Ok(bits)
}

fn parse_ports(rule: &str, ports: &str) -> Result<Vec<PortRange>, RuleError> {
    let ranges = ports
        .split(',')
        .map(|item| {
            let bad = || RuleError::BadPort {
                rule: rule.to_owned(),
                port: item.to_owned(),
            };
            let port = |s: &str| match s.trim().parse::<u16>() {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(bad()),
            };
            let (first, last) = if let Some((a, b)) = item.split_once('-') {
                (port(a)?, port(b)?)
            } else {
                let p = port(item)?;
                (p, p)
            };
            if first > last {
                return Err(bad());
            }
            Ok(PortRange { first, last })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ranges.len() > MAX_PORT_RANGES {
        return Err(RuleError::TooManyPorts {
            rule: rule.to_owned(),
        });
    }
    Ok(ranges)
}

/// The deny and pass rules imds-guard enforces, checked as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

/// The broadest deny rules accepted: anything broader is almost certainly a
/// mistake (a /0 deny would cut the node off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixLimits {
    pub min_len_v4: u8,
    pub min_len_v6: u8,
}

impl Default for PrefixLimits {
    fn default() -> Self {
        PrefixLimits {
            min_len_v4: 16,
            min_len_v6: 64,
        }
    }
}

impl RuleSet {
    /// [`RuleSet::with_limits`] with the default limits (/16 and /64).
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleError> {
        RuleSet::with_limits(rules, PrefixLimits::default())
    }

    /// Checks a whole set: at least one deny rule, no prefix twice (a deny
    /// and a pass for the same prefix contradict), no deny broader than
    /// `limits`.
    pub fn with_limits(rules: Vec<Rule>, limits: PrefixLimits) -> Result<RuleSet, RuleError> {
        if !rules.iter().any(|r| r.action == Action::Deny) {
            return Err(RuleError::NoDenyRule);
        }
        for (i, rule) in rules.iter().enumerate() {
            if rules[..i].iter().any(|r| r.prefix == rule.prefix) {
                return Err(RuleError::Duplicate {
                    prefix: rule.prefix,
                });
            }
            let limit = match rule.prefix {
                IpNet::V4(_) => limits.min_len_v4,
                IpNet::V6(_) => limits.min_len_v6,
            };
            if rule.action == Action::Deny && rule.prefix.prefix_len() < limit {
                return Err(RuleError::TooBroad {
                    rule: rule.to_string(),
                    len: rule.prefix.prefix_len(),
                    limit,
                });
            }
        }
        Ok(RuleSet { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The pre-filter's words: one bit for every bucket a deny rule covers.
    pub fn bucket_words(&self) -> Vec<u64> {
        enforcer_common::prefilter::bucket_words(
            self.rules
                .iter()
                .filter(|r| r.action == Action::Deny)
                .map(Rule::kernel_key),
        )
    }

    /// The rule of the longest prefix containing `addr`, as the kernel picks it.
    pub fn longest_match(&self, addr: &IpAddr) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.contains(addr))
            .max_by_key(|r| r.prefix.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parses_real_world_rules() {
        let cases: [(&str, Rule); 6] = [
            (
                "169.254.169.254/32 except-ports=53",
                Rule {
                    prefix: "169.254.169.254/32".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_ANY,
                    ports: Ports::Except(vec![r(53, 53)]),
                },
            ),
            (
                "168.63.129.16/32 proto=tcp ports=80,32526",
                Rule {
                    prefix: "168.63.129.16/32".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_TCP,
                    ports: Ports::Only(vec![r(80, 80), r(32526, 32526)]),
                },
            ),
            (
                "fd00:ec2::254",
                Rule {
                    prefix: "fd00:ec2::254/128".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_ANY,
                    ports: Ports::All,
                },
            ),
            (
                "100.100.100.200/32 proto=TCP,udp",
                Rule {
                    prefix: "100.100.100.200/32".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_TCP | PROTO_UDP,
                    ports: Ports::All,
                },
            ),
            (
                "  169.254.0.0/16   ports=8000-8100,80  ",
                Rule {
                    prefix: "169.254.0.0/16".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_ANY,
                    ports: Ports::Only(vec![r(8000, 8100), r(80, 80)]),
                },
            ),
            (
                "fd00:a9fe:a9fe::254/128 proto=icmpv6",
                Rule {
                    prefix: "fd00:a9fe:a9fe::254/128".parse().unwrap(),
                    action: Action::Deny,
                    protocols: PROTO_ICMP,
                    ports: Ports::All,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Rule::parse_deny(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_rules_naming_the_problem() {
        let cases = [
            ("", "is empty"),
            ("169.254.169.256/32", "is not an IP prefix"),
            ("169.254.169.254/33", "is not an IP prefix"),
            (
                "169.254.169.254/16",
                "has host bits set; did you mean 169.254.0.0/16",
            ),
            ("169.254.169.254 proto=sctp", "unknown protocol \"sctp\""),
            ("169.254.169.254 ports=0", "\"0\" is not a port"),
            ("169.254.169.254 ports=65536", "\"65536\" is not a port"),
            ("169.254.169.254 ports=90-80", "\"90-80\" is not a port"),
            ("169.254.169.254 ports=http", "\"http\" is not a port"),
            (
                "169.254.169.254 ports=80 except-ports=53",
                "cannot be combined",
            ),
            ("169.254.169.254 proto=tcp proto=udp", "proto= given twice"),
            ("169.254.169.254 tcp", "unknown setting \"tcp\""),
            (
                "169.254.169.254 ports=1,2,3,4,5,6,7,8,9",
                "at most 8 port ranges",
            ),
        ];
        for (text, want) in cases {
            let err = Rule::parse_deny(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn rule_sets_are_checked_as_a_whole() {
        let deny = |t: &str| Rule::parse_deny(t).unwrap();
        let pass = |t: &str| Rule::parse_pass(t).unwrap();
        assert_eq!(RuleSet::new(vec![]), Err(RuleError::NoDenyRule));
        assert_eq!(
            RuleSet::new(vec![pass("169.254.170.23")]),
            Err(RuleError::NoDenyRule)
        );
        assert!(matches!(
            RuleSet::new(vec![
                deny("169.254.169.254"),
                deny("169.254.169.254/32 proto=tcp")
            ]),
            Err(RuleError::Duplicate { .. })
        ));
        assert!(matches!(
            RuleSet::new(vec![deny("0.0.0.0/0")]),
            Err(RuleError::TooBroad {
                len: 0,
                limit: 16,
                ..
            })
        ));
        assert!(matches!(
            RuleSet::new(vec![deny("fd00::/8")]),
            Err(RuleError::TooBroad {
                len: 8,
                limit: 64,
                ..
            })
        ));
        // A pass rule may be broad: it only ever narrows what is refused.
        assert!(RuleSet::new(vec![deny("169.254.0.0/16"), pass("169.254.20.0/24")]).is_ok());
        let narrow = PrefixLimits {
            min_len_v4: 32,
            min_len_v6: 128,
        };
        assert!(matches!(
            RuleSet::with_limits(vec![deny("169.254.0.0/16")], narrow),
            Err(RuleError::TooBroad {
                len: 16,
                limit: 32,
                ..
            })
        ));
    }

    #[test]
    fn longest_prefix_wins() {
        let set = RuleSet::new(vec![
            Rule::parse_deny("169.254.0.0/16").unwrap(),
            Rule::parse_pass("169.254.170.23").unwrap(),
        ])
        .unwrap();
        let hit = |a: &str| set.longest_match(&a.parse().unwrap()).map(|r| r.action);
        assert_eq!(hit("169.254.169.254"), Some(Action::Deny));
        assert_eq!(hit("169.254.170.23"), Some(Action::Pass));
        assert_eq!(hit("169.255.0.1"), None);
    }

    #[test]
    fn kernel_form_maps_ipv4_into_ipv6() {
        let rule = Rule::parse_deny("169.254.169.254/32 except-ports=53").unwrap();
        let (len, bytes) = rule.kernel_key();
        assert_eq!(len, 128);
        assert_eq!(&bytes[10..], &[0xff, 0xff, 169, 254, 169, 254]);
        let value = rule.kernel_value();
        assert_eq!(value.port_scope, PORTS_EXCEPT);
        assert_eq!(value.port_range_count, 1);
        assert_eq!(value.port_ranges[0], r(53, 53));
        let v6 = Rule::parse_deny("fd00:ec2::/32").unwrap();
        assert_eq!(v6.kernel_key().0, 32);
    }

    #[test]
    fn kernel_entries_read_back_as_the_rules_that_wrote_them() {
        for text in [
            "169.254.169.254/32 except-ports=53",
            "168.63.129.16/32 proto=tcp ports=80,32526",
            "169.254.0.0/16 proto=udp,icmp ports=8000-8100",
            "fd00:ec2::254/128",
            "fd00:ec2::/64",
        ] {
            let rule = Rule::parse_deny(text).unwrap();
            let (len, addr) = rule.kernel_key();
            assert_eq!(
                Rule::from_kernel(len, addr, &rule.kernel_value()),
                Some(rule),
                "{text}"
            );
        }
        let pass = Rule::parse_pass("169.254.170.23").unwrap();
        let (len, addr) = pass.kernel_key();
        assert_eq!(
            Rule::from_kernel(len, addr, &pass.kernel_value()),
            Some(pass)
        );
    }

    /// Whether the pre-filter lets `addr` through to the trie.
    fn passes_filter(words: &[u64], addr: IpAddr) -> bool {
        let key = match addr {
            IpAddr::V4(a) => ipv4_mapped(a.octets()),
            IpAddr::V6(a) => a.octets(),
        };
        let b = enforcer_common::bucket(&key);
        words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    #[test]
    fn the_prefilter_covers_every_denied_address_and_little_else() {
        let set = RuleSet::with_limits(
            vec![
                Rule::parse_deny("169.254.169.254/32").unwrap(),
                Rule::parse_deny("100.64.0.0/10").unwrap(),
                Rule::parse_deny("fd00:ec2::254/128").unwrap(),
                Rule::parse_deny("fe80::/10").unwrap(),
                Rule::parse_pass("10.0.0.0/8").unwrap(),
            ],
            PrefixLimits {
                min_len_v4: 8,
                min_len_v6: 8,
            },
        )
        .unwrap();
        let words = set.bucket_words();
        let cases = [
            ("169.254.169.254", true),
            ("169.254.1.1", true), // same /16: to the trie, which passes it
            ("169.255.0.1", false),
            ("100.64.0.1", true),
            ("100.127.255.255", true),
            ("100.128.0.1", false),
            ("10.1.2.3", false), // pass rules need no bucket
            ("198.18.0.2", false),
            ("fd00:ec2::254", true),
            ("fd00:ec3::1", true), // same first 16 bits
            ("fd01::1", false),
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", false),
            ("::1", false),
            ("::ffff:169.254.169.254", true),
            ("::ffff:198.18.0.2", false),
        ];
        for (addr, want) in cases {
            assert_eq!(passes_filter(&words, addr.parse().unwrap()), want, "{addr}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "169.254.169.254/32 except-ports=53",
            "168.63.129.16/32 proto=tcp ports=80,32526",
            "169.254.0.0/16 proto=udp,icmp ports=8000-8100",
            "fd00:ec2::254/128",
        ] {
            assert_eq!(Rule::parse_deny(text).unwrap().to_string(), text);
        }
    }
}
