//! The peer: what a user would deploy instead of imds-guard to keep a
//! cgroup subtree from the same destinations, nftables rules matching the
//! sending socket's cgroup (`socket cgroupv2`) in the client namespace's
//! output hook, with the same deny list and allow list and a reject target.
//!
//! `socket cgroupv2 level N` compares one ancestor of the socket's cgroup,
//! the one at depth N below the cgroup2 root, with a given cgroup. Our
//! allow list covers an allowlisted cgroup and everything below it: a
//! socket's cgroup is inside allowlisted cgroup A, at depth d, exactly when
//! its ancestor at level d is A. So the peer groups the allow list by
//! depth, and for each depth with an entry has one `accept` rule matching
//! that level against the set of entries at that depth (a set so 10,000
//! entries cost a lookup, not 10,000 rules); a socket shallower than d has
//! no ancestor at level d and matches nothing. Those rules come first; then
//! the guarded cgroup, at its level, jumps to the deny rules.
//!
//! For forwarded traffic (the node edge guard's figures) the same deny
//! rules sit in the node's forward hook instead, for packets leaving the
//! uplink, as an iptables-based CNI judges pod traffic in its FORWARD chain.
//!
//! The deny rules take the bench's own forms only, `PREFIX` and `PREFIX
//! except-ports=LIST`: port exceptions return before the deny sets, which
//! matches our longest-prefix semantics as long as no other deny rule
//! covers a prefix with exceptions (true of the bench's lists). Denied TCP
//! gets a reset (the connect fails with ECONNREFUSED at once); everything
//! else an ICMP administratively-prohibited, which fails a send at once too.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use imds_guard_tests::{TempFile, cgroups::cgroup2_mount, netns::Netns};

/// The peer's own table, so removing it removes exactly what it added.
const TABLE: &str = "imds_guard_peer";
/// nft names a cgroup by its path below this directory, whatever the cgroup2
/// mount point (on a hybrid host, `unified/...`).
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup as a `socket cgroupv2` match names it: its level and nft path.
fn nft_cgroup(cgroup2: &Path, dir: &Path) -> anyhow::Result<(usize, String)> {
    let level = dir
        .strip_prefix(cgroup2)
        .with_context(|| format!("{} is outside {}", dir.display(), cgroup2.display()))?
        .components()
        .count();
    let path = dir.strip_prefix(NFT_CGROUP_ROOT).with_context(|| {
        format!(
            "nft names cgroups below {NFT_CGROUP_ROOT} only, not {}",
            dir.display()
        )
    })?;
    Ok((level, format!("{:?}", path.display().to_string())))
}

/// One deny rule of the forms the bench uses.
struct Deny {
    prefix: String,
    v6: bool,
    except_ports: Option<String>,
}

fn parse_deny(rule: &str) -> anyhow::Result<Deny> {
    let mut words = rule.split_whitespace();
    let prefix = words.next().context("an empty deny rule")?.to_owned();
    let address = prefix.split('/').next().unwrap_or_default();
    let v6 = address
        .parse::<IpAddr>()
        .with_context(|| format!("deny rule {rule:?}: no address"))?
        .is_ipv6();
    let except_ports = match words.next() {
        None => None,
        Some(word) => Some(
            word.strip_prefix("except-ports=")
                .with_context(|| format!("deny rule {rule:?}: the peer knows except-ports= only"))?
                .to_owned(),
        ),
    };
    ensure!(
        words.next().is_none(),
        "deny rule {rule:?}: one setting at most"
    );
    Ok(Deny {
        prefix,
        v6,
        except_ports,
    })
}

/// What the peer's rules judge, and so where they hook in.
pub enum Judged<'a> {
    /// Local sockets in `guarded`'s subtree, in the output hook, with the
    /// allow list by cgroup.
    Sockets {
        guarded: &'a Path,
        allow: &'a [PathBuf],
    },
    /// Packets the node forwards out of `uplink`, in the forward hook, as
    /// an iptables-based CNI's network policies judge pod traffic.
    Forwarded { uplink: &'a str },
}

/// The ruleset judging `judged` by these deny rules.
pub fn ruleset(judged: &Judged, deny: &[String]) -> anyhow::Result<String> {
    let mut by_level: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    if let Judged::Sockets { allow, .. } = judged {
        let cgroup2 = cgroup2_mount()?;
        for dir in *allow {
            let (level, path) = nft_cgroup(&cgroup2, dir)?;
            by_level.entry(level).or_default().push(path);
        }
    }
    let rules = deny
        .iter()
        .map(|rule| parse_deny(rule))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prefixes = |v6: bool| -> Vec<&str> {
        rules
            .iter()
            .filter(|rule| rule.v6 == v6)
            .map(|rule| rule.prefix.as_str())
            .collect()
    };

    let mut text = format!("table inet {TABLE} {{\n");
    for (level, paths) in &by_level {
        writeln!(
            text,
            "  set allow_level_{level} {{ type cgroupsv2; elements = {{ {} }} }}",
            paths.join(", ")
        )?;
    }
    for (name, kind, v6) in [
        ("deny_v4", "ipv4_addr", false),
        ("deny_v6", "ipv6_addr", true),
    ] {
        let elements = prefixes(v6);
        if !elements.is_empty() {
            writeln!(
                text,
                "  set {name} {{ type {kind}; flags interval; elements = {{ {} }} }}",
                elements.join(", ")
            )?;
        }
    }
    match judged {
        Judged::Sockets { guarded, .. } => {
            text.push_str(
                "  chain output {\n    type filter hook output priority filter; policy accept;\n",
            );
            for level in by_level.keys() {
                writeln!(
                    text,
                    "    socket cgroupv2 level {level} @allow_level_{level} accept"
                )?;
            }
            let (guarded_level, guarded_path) = nft_cgroup(&cgroup2_mount()?, guarded)?;
            writeln!(
                text,
                "    socket cgroupv2 level {guarded_level} {guarded_path} jump guarded\n  }}"
            )?;
        }
        Judged::Forwarded { uplink } => writeln!(
            text,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
             oifname {uplink:?} jump guarded\n  }}"
        )?,
    }
    text.push_str("  chain guarded {\n");
    for rule in &rules {
        if let Some(ports) = &rule.except_ports {
            let family = if rule.v6 { "ip6" } else { "ip" };
            writeln!(
                text,
                "    {family} daddr {} meta l4proto {{ tcp, udp }} th dport {{ {ports} }} return",
                rule.prefix
            )?;
        }
    }
    for (family, set, v6) in [("ip", "deny_v4", false), ("ip6", "deny_v6", true)] {
        if !prefixes(v6).is_empty() {
            writeln!(text, "    {family} daddr @{set} jump refuse")?;
        }
    }
    text.push_str(
        "  }\n  chain refuse {\n    meta l4proto tcp reject with tcp reset\n    \
         reject with icmpx admin-prohibited\n  }\n}\n",
    );
    Ok(text)
}

/// The peer's table in a namespace, deleted on drop.
pub struct Peer {
    netns: String,
}

impl Peer {
    /// Loads `ruleset` (from [`ruleset`]) into `netns`'s nftables.
    pub fn apply(netns: &Netns, ruleset: &str) -> anyhow::Result<Peer> {
        let file = TempFile::new("bench-peer", ruleset)?;
        // nsenter, not `ip netns exec`: that remounts /sys, and nft reads
        // the cgroups' paths below /sys/fs/cgroup.
        let netns = format!("--net={}", netns.path().display());
        // `nft -f` is atomic: when it fails there is nothing to delete.
        if let Err(err) = imds_guard_tests::run("nsenter", &[&netns, "nft", "-f", &file.arg()]) {
            bail!("loading the nftables peer: {err}");
        }
        Ok(Peer { netns })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Err(err) = imds_guard_tests::run(
            "nsenter",
            &[&self.netns, "nft", "delete", "table", "inet", TABLE],
        ) {
            eprintln!("cleanup: cannot delete the nftables table {TABLE}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_rules_of_the_bench_parse() {
        let rule = parse_deny("169.254.169.254/32 except-ports=53").unwrap();
        assert_eq!(rule.prefix, "169.254.169.254/32");
        assert!(!rule.v6);
        assert_eq!(rule.except_ports.as_deref(), Some("53"));
        assert!(parse_deny("fd00:ec2::254/128").unwrap().v6);
        assert!(parse_deny("169.254.169.254/32 proto=tcp").is_err());
    }

    #[test]
    fn the_forward_peer_judges_what_leaves_the_uplink() {
        let deny = ["169.254.169.254/32 except-ports=53", "fd00:ec2::254/128"].map(str::to_owned);
        let text = ruleset(&Judged::Forwarded { uplink: "uplink" }, &deny).unwrap();
        for line in [
            "type filter hook forward priority filter; policy accept;",
            "oifname \"uplink\" jump guarded",
            "ip daddr 169.254.169.254/32 meta l4proto { tcp, udp } th dport { 53 } return",
            "set deny_v6 { type ipv6_addr; flags interval; elements = { fd00:ec2::254/128 } }",
            "ip6 daddr @deny_v6 jump refuse",
            "meta l4proto tcp reject with tcp reset",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(!text.contains("cgroupv2"), "{text}");
    }
}
