//! The egress program run by the kernel on crafted packets
//! (`BPF_PROG_TEST_RUN`), checked against a reference written in plain Rust
//! from the rule semantics, not from the eBPF code.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use enforcer_user::{
    bpf::{
        loader,
        maps::{Access, CgroupAllowMap, DestRulesMap},
    },
    config::{
        Mode,
        rules::{Action, Ports, Rule, RuleSet},
    },
};
use imds_guard_tests::require_root;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};

const PASS: u32 = 1;
const DROP: u32 = 0;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;
const GRE: u8 = 47;

/// A packet as the generator describes it; `bytes()` lays it out.
#[derive(Clone, Debug)]
struct Packet {
    dst: IpAddr,
    protocol: u8,
    dst_port: u16,
    /// IPv4 fragment offset in 8-byte units (0 for the first or only one).
    fragment_offset: u16,
    more_fragments: bool,
    /// IPv6 extension headers before the transport header, by number.
    extensions: Vec<u8>,
    /// Bytes of the transport header kept (TCP/UDP need 4 for the port).
    transport_len: usize,
    /// IPv4 header length field in 32-bit words (5 is normal).
    ihl: u8,
    /// Version nibble (4 or 6 normally).
    version: u8,
    /// Cut the packet to this many bytes after the Ethernet header (never
    /// inside the fixed IP header: the kernel's test run refuses that).
    cut_to: Option<usize>,
}

impl Packet {
    fn new(dst: impl Into<IpAddr>, protocol: u8, dst_port: u16) -> Packet {
        let dst = dst.into();
        Packet {
            dst,
            protocol,
            dst_port,
            fragment_offset: 0,
            more_fragments: false,
            extensions: Vec::new(),
            transport_len: 8,
            ihl: 5,
            version: if dst.is_ipv4() { 4 } else { 6 },
            cut_to: None,
        }
    }

    fn transport(&self) -> Vec<u8> {
        let mut t = vec![0x30, 0x39]; // source port 12345
        t.extend_from_slice(&self.dst_port.to_be_bytes());
        t.extend_from_slice(&[0; 16]);
        t.truncate(self.transport_len);
        t
    }

    /// The frame handed to the kernel: an Ethernet header, then the packet.
    fn bytes(&self) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        let (ethertype, ip) = match self.dst {
            IpAddr::V4(dst) => (0x0800u16, self.ipv4(dst)),
            IpAddr::V6(dst) => (0x86ddu16, self.ipv6(dst)),
        };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        let mut ip = ip;
        if let Some(len) = self.cut_to {
            ip.truncate(len);
        }
        frame.extend_from_slice(&ip);
        frame
    }

    fn ipv4(&self, dst: Ipv4Addr) -> Vec<u8> {
        let flags = (u16::from(self.more_fragments) << 13) | self.fragment_offset;
        let mut h = vec![(self.version << 4) | self.ihl, 0, 0, 0, 0x12, 0x34];
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&[64, self.protocol, 0, 0, 198, 18, 0, 1]);
        h.extend_from_slice(&dst.octets());
        // Options, when the header length says there are some.
        h.resize(usize::from(self.ihl.max(5)) * 4, 1);
        h.extend_from_slice(&self.transport());
        h
    }

    fn ipv6(&self, dst: Ipv6Addr) -> Vec<u8> {
        let first_next = self.extensions.first().copied().unwrap_or(self.protocol);
        let mut h = vec![self.version << 4, 0, 0, 0, 0, 0, first_next, 64];
        h.extend_from_slice(&Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 1).octets());
        h.extend_from_slice(&dst.octets());
        for (i, &ext) in self.extensions.iter().enumerate() {
            let next = self.extensions.get(i + 1).copied().unwrap_or(self.protocol);
            match ext {
                44 => {
                    let offset = (self.fragment_offset << 3) | u16::from(self.more_fragments);
                    h.extend_from_slice(&[next, 0]);
                    h.extend_from_slice(&offset.to_be_bytes());
                    h.extend_from_slice(&[0, 0, 0, 7]);
                }
                51 => {
                    // Authentication header: length in 4-byte units minus 2.
                    h.extend_from_slice(&[next, 1, 0, 0]);
                    h.extend_from_slice(&[0; 8]);
                }
                _ => {
                    // Hop-by-hop, routing, destination options: 16 bytes.
                    h.extend_from_slice(&[next, 1]);
                    h.extend_from_slice(&[0; 14]);
                }
            }
        }
        h.extend_from_slice(&self.transport());
        h
    }
}

/// What the transport header tells, as the rule semantics define it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    Known(u16),
    NotApplicable,
    Unknown,
}

/// The protocol class: ICMP only for the family's own ICMP.
fn class_of(protocol: u8, ipv6: bool) -> u32 {
    use enforcer_common::rule::{PROTO_ICMP, PROTO_OTHER, PROTO_TCP, PROTO_UDP};
    match (protocol, ipv6) {
        (TCP, _) => PROTO_TCP,
        (UDP, _) => PROTO_UDP,
        (ICMP, false) | (ICMPV6, true) => PROTO_ICMP,
        _ => PROTO_OTHER,
    }
}

fn transport_at(class: u32, port: u16, readable: bool) -> (u32, Port) {
    use enforcer_common::rule::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
    match class {
        PROTO_TCP | PROTO_UDP if readable => (class, Port::Known(port)),
        PROTO_ICMP => (class, Port::NotApplicable),
        _ => (class, Port::Unknown),
    }
}

/// The protocol class and port of a packet; `None` when its header is malformed.
fn transport(p: &Packet, ip_len: usize) -> Option<(u32, Port)> {
    match p.dst {
        IpAddr::V4(_) => {
            if p.version != 4 || p.ihl < 5 {
                return None;
            }
            let class = class_of(p.protocol, false);
            if p.fragment_offset != 0 {
                return Some((class, Port::Unknown));
            }
            let header = usize::from(p.ihl) * 4;
            Some(transport_at(class, p.dst_port, ip_len >= header + 4))
        }
        IpAddr::V6(_) => {
            if p.version != 6 {
                return None;
            }
            let mut offset = 40;
            for (i, &ext) in p.extensions.iter().enumerate() {
                if i >= 8 || ip_len < offset + 4 {
                    return None;
                }
                if ext == 44 && p.fragment_offset != 0 {
                    let next = p.extensions.get(i + 1).copied().unwrap_or(p.protocol);
                    return Some((class_of(next, true), Port::Unknown));
                }
                offset += match ext {
                    44 => 8,
                    51 => 12,
                    _ => 16,
                };
            }
            Some(transport_at(
                class_of(p.protocol, true),
                p.dst_port,
                ip_len >= offset + 4,
            ))
        }
    }
}

/// The verdict the rules call for, worked out from the packet description.
fn reference(rules: &RuleSet, p: &Packet) -> u32 {
    // The kernel's test run refuses packets shorter than the fixed header.
    let ip_len = p.bytes().len() - 14;
    // A v4-mapped IPv6 destination is the IPv4 address.
    let Some(rule) = rules.longest_match(&p.dst.to_canonical()) else {
        return PASS;
    };
    if rule.action == Action::Pass {
        return PASS;
    }
    let Some((class, port)) = transport(p, ip_len) else {
        return DROP; // malformed, to a denied destination
    };
    if rule.protocols & class == 0 {
        return PASS;
    }
    let listed = |ranges: &[enforcer_common::PortRange], port: u16| {
        ranges.iter().any(|r| (r.first..=r.last).contains(&port))
    };
    let denied = match (&rule.ports, port) {
        (Ports::All, _) | (_, Port::Unknown) | (Ports::Except(_), Port::NotApplicable) => true,
        (Ports::Only(ranges), Port::Known(x)) => listed(ranges, x),
        (Ports::Only(_), Port::NotApplicable) => false,
        (Ports::Except(ranges), Port::Known(x)) => !listed(ranges, x),
    };
    if denied { DROP } else { PASS }
}

fn rules() -> RuleSet {
    let deny = [
        "169.254.169.254/32 except-ports=53",
        "fd00:ec2::254/128",
        "168.63.129.16/32 proto=tcp ports=80,32526",
        "100.100.100.200/32 proto=udp,icmp",
        "169.254.0.0/16 ports=8000-8100",
        "fd00:ec2::/64 proto=icmp",
    ];
    let pass = ["169.254.170.23"];
    let rules = deny
        .iter()
        .map(|t| Rule::parse_deny(t))
        .chain(pass.iter().map(|t| Rule::parse_pass(t)))
        .collect::<Result<Vec<_>, _>>()
        .expect("valid rules");
    RuleSet::new(rules).expect("valid rule set")
}

struct Loaded {
    ebpf: Ebpf,
    rules: DestRulesMap,
    allow: CgroupAllowMap,
}

fn load(rules: &RuleSet) -> Loaded {
    require_root();
    let mut ebpf = loader::load(Mode::Enforce, 0, false, None).expect("load the programs");
    let mut rules_map = DestRulesMap::take(&mut ebpf).expect("rules map");
    rules_map.sync(rules).expect("write rules");
    let allow = CgroupAllowMap::take(&mut ebpf).expect("allow map");
    Loaded {
        ebpf,
        rules: rules_map,
        allow,
    }
}

impl Loaded {
    fn verdict(&mut self, packet: &Packet) -> u32 {
        let frame = packet.bytes();
        let program = loader::egress_program(&mut self.ebpf).expect("egress program");
        program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {packet:?}: {e}"))
            .return_value
    }
}

fn md() -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 169, 254)
}

fn md6() -> Ipv6Addr {
    "fd00:ec2::254".parse().expect("address")
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn crafted_packets_get_the_verdicts_the_rules_call_for() {
    let rules = rules();
    let mut loaded = load(&rules);
    let fragment = |mut p: Packet, offset: u16| {
        p.fragment_offset = offset;
        p.more_fragments = true;
        p
    };
    let with = |mut p: Packet, f: &dyn Fn(&mut Packet)| {
        f(&mut p);
        p
    };
    let near = |last: u8| Ipv4Addr::new(169, 254, 169, last);
    let cases: Vec<(&str, Packet, u32)> = vec![
        ("tcp to metadata", Packet::new(md(), TCP, 80), DROP),
        ("udp to metadata", Packet::new(md(), UDP, 80), DROP),
        ("icmp to metadata", Packet::new(md(), ICMP, 0), DROP),
        ("gre to metadata", Packet::new(md(), GRE, 0), DROP),
        ("tcp dns to metadata", Packet::new(md(), TCP, 53), PASS),
        ("udp dns to metadata", Packet::new(md(), UDP, 53), PASS),
        ("near miss below", Packet::new(near(253), TCP, 80), PASS),
        ("near miss above", Packet::new(near(255), TCP, 80), PASS),
        (
            "ordinary",
            Packet::new(Ipv4Addr::new(198, 18, 0, 2), TCP, 80),
            PASS,
        ),
        (
            "first fragment, dns",
            fragment(Packet::new(md(), UDP, 53), 0),
            PASS,
        ),
        (
            "later fragment, ports unknown",
            fragment(Packet::new(md(), UDP, 53), 3),
            DROP,
        ),
        (
            "ipv6 later fragment, port-free rule",
            with(fragment(Packet::new(md6(), UDP, 53), 3), &|p| {
                p.extensions = vec![44];
            }),
            DROP,
        ),
        (
            "transport cut short",
            with(Packet::new(md(), UDP, 53), &|p| p.transport_len = 3),
            DROP,
        ),
        (
            "cut inside the ports",
            with(Packet::new(md(), UDP, 53), &|p| p.cut_to = Some(22)),
            DROP,
        ),
        (
            "cut after the ports",
            with(Packet::new(md(), UDP, 53), &|p| p.cut_to = Some(24)),
            PASS,
        ),
        (
            "ihl below five",
            with(Packet::new(md(), UDP, 53), &|p| p.ihl = 4),
            DROP,
        ),
        (
            "wrong version",
            with(Packet::new(md(), UDP, 53), &|p| p.version = 6),
            DROP,
        ),
        (
            "ip options before the ports",
            with(Packet::new(md(), UDP, 53), &|p| p.ihl = 7),
            PASS,
        ),
        ("ipv6 tcp to metadata", Packet::new(md6(), TCP, 80), DROP),
        (
            "ipv6 near miss",
            Packet::new("fd00:ec2::255".parse::<Ipv6Addr>().expect("addr"), TCP, 80),
            PASS,
        ),
        (
            "ipv6 icmp in the /64",
            Packet::new("fd00:ec2::1".parse::<Ipv6Addr>().expect("addr"), ICMPV6, 0),
            DROP,
        ),
        (
            "ipv6 tcp in the /64",
            Packet::new("fd00:ec2::1".parse::<Ipv6Addr>().expect("addr"), TCP, 80),
            PASS,
        ),
        (
            "ipv6 mapped destination",
            Packet::new(md().to_ipv6_mapped(), TCP, 80),
            DROP,
        ),
        (
            "ipv6 mapped dns",
            Packet::new(md().to_ipv6_mapped(), UDP, 53),
            PASS,
        ),
        (
            "wireserver agent port",
            Packet::new(Ipv4Addr::new(168, 63, 129, 16), TCP, 32526),
            DROP,
        ),
        (
            "wireserver dns",
            Packet::new(Ipv4Addr::new(168, 63, 129, 16), UDP, 53),
            PASS,
        ),
        (
            "wireserver icmp",
            Packet::new(Ipv4Addr::new(168, 63, 129, 16), ICMP, 0),
            PASS,
        ),
        (
            "wireserver later fragment",
            fragment(Packet::new(Ipv4Addr::new(168, 63, 129, 16), TCP, 80), 5),
            DROP,
        ),
        (
            "pod identity carve-out",
            Packet::new(Ipv4Addr::new(169, 254, 170, 23), TCP, 8000),
            PASS,
        ),
        (
            "link-local port range",
            Packet::new(Ipv4Addr::new(169, 254, 1, 1), TCP, 8100),
            DROP,
        ),
        (
            "link-local outside range",
            Packet::new(Ipv4Addr::new(169, 254, 1, 1), TCP, 8101),
            PASS,
        ),
        (
            "link-local icmp",
            Packet::new(Ipv4Addr::new(169, 254, 1, 1), ICMP, 0),
            PASS,
        ),
        (
            "link-local sctp",
            Packet::new(Ipv4Addr::new(169, 254, 1, 1), SCTP, 8000),
            DROP,
        ),
        (
            "icmpv6 number over ipv4 is other",
            Packet::new(Ipv4Addr::new(169, 254, 1, 1), ICMPV6, 0),
            DROP,
        ),
    ];
    let mut v6_cases = Vec::new();
    let v6_with_ext = |ext: Vec<u8>, protocol: u8, port: u16, offset: u16| {
        let mut p = Packet::new(
            "fd00:ec2::7".parse::<Ipv6Addr>().expect("addr"),
            protocol,
            port,
        );
        p.extensions = ext;
        p.fragment_offset = offset;
        p
    };
    v6_cases.push((
        "v6 hop-by-hop then icmp",
        v6_with_ext(vec![0], ICMPV6, 0, 0),
        DROP,
    ));
    v6_cases.push((
        "v6 three headers then icmp",
        v6_with_ext(vec![0, 60, 43], ICMPV6, 0, 0),
        DROP,
    ));
    v6_cases.push((
        "v6 first fragment then tcp",
        v6_with_ext(vec![44], TCP, 80, 0),
        PASS,
    ));
    v6_cases.push((
        "v6 later fragment (icmp unknown)",
        v6_with_ext(vec![44], ICMPV6, 0, 9),
        DROP,
    ));
    v6_cases.push(("v6 auth then udp", v6_with_ext(vec![51], UDP, 80, 0), PASS));
    v6_cases.push((
        "v6 eight extension headers",
        v6_with_ext(vec![60; 8], ICMPV6, 0, 0),
        DROP,
    ));
    v6_cases.push((
        "v6 eight extension headers, tcp",
        v6_with_ext(vec![60; 8], TCP, 80, 0),
        PASS,
    ));
    v6_cases.push((
        "v6 nine extension headers",
        v6_with_ext(vec![60; 9], TCP, 80, 0),
        DROP,
    ));
    v6_cases.push((
        "v6 icmp (v4 number) is other",
        v6_with_ext(vec![], ICMP, 0, 0),
        PASS,
    ));
    for (name, packet, want) in cases.into_iter().chain(v6_cases) {
        assert_eq!(
            reference(&rules, &packet),
            want,
            "reference disagrees on {name}"
        );
        assert_eq!(loaded.verdict(&packet), want, "{name}: {packet:?}");
    }
}

/// The test process's own cgroup id: the kernel's test run charges the
/// packet to a socket of the calling task's cgroup.
fn own_cgroup_id() -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let mount = imds_guard_tests::cgroups::cgroup2_mount().expect("cgroup2 mount");
    let dir: PathBuf = mount.join(relative.trim_start_matches('/'));
    std::fs::metadata(&dir).expect("stat own cgroup").ino()
}

#[test]
fn an_allowlisted_cgroup_or_ancestor_passes_denied_packets() {
    let rules = rules();
    let mut loaded = load(&rules);
    let denied = Packet::new(md(), TCP, 80);
    assert_eq!(loaded.verdict(&denied), DROP);
    let own = own_cgroup_id();
    loaded
        .allow
        .sync(&[(own, Access::Allow)].into())
        .expect("allow own cgroup");
    assert_eq!(loaded.verdict(&denied), PASS);
    // An entry for some other cgroup does not help.
    loaded
        .allow
        .sync(&[(own + 1_000_000, Access::Allow)].into())
        .expect("allow another");
    assert_eq!(loaded.verdict(&denied), DROP);
    // An audit entry lets the packet through in an enforcing build (and
    // counts it, as an audited attempt).
    loaded
        .allow
        .sync(&[(own, Access::Audit)].into())
        .expect("audit own cgroup");
    assert_eq!(loaded.verdict(&denied), PASS);
    loaded.allow.sync(&[].into()).expect("empty");
    assert_eq!(loaded.verdict(&denied), DROP);
}

#[test]
fn random_packets_match_the_reference() {
    const PACKETS: usize = 20_000;
    let rules = rules();
    let mut loaded = load(&rules);
    let seed: u64 = std::env::var("IMDS_GUARD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let v4_targets: Vec<Ipv4Addr> = [
        "169.254.169.254",
        "169.254.169.253",
        "169.254.169.255",
        "169.254.170.23",
        "169.254.1.1",
        "169.255.0.1",
        "168.63.129.16",
        "168.63.129.17",
        "100.100.100.200",
        "100.100.100.201",
        "198.18.0.2",
    ]
    .iter()
    .map(|a| a.parse().expect("address"))
    .collect();
    let v6_targets: Vec<Ipv6Addr> = [
        "fd00:ec2::254",
        "fd00:ec2::255",
        "fd00:ec2::1",
        "fd00:ec3::254",
        "::ffff:169.254.169.254",
        "::ffff:169.254.169.253",
        "fd99:1::2",
    ]
    .iter()
    .map(|a| a.parse().expect("address"))
    .collect();
    let protocols = [TCP, UDP, ICMP, ICMPV6, SCTP, GRE];
    let ports = [53, 80, 443, 8000, 8100, 8101, 32526, 32527];
    let mut drops = 0;
    for i in 0..PACKETS {
        let v4 = rng.random_bool(0.5);
        let dst: IpAddr = if v4 {
            (*v4_targets.choose(&mut rng).expect("non-empty")).into()
        } else {
            (*v6_targets.choose(&mut rng).expect("non-empty")).into()
        };
        let port = if rng.random_bool(0.8) {
            *ports.choose(&mut rng).expect("non-empty")
        } else {
            rng.random()
        };
        let mut p = Packet::new(dst, *protocols.choose(&mut rng).expect("non-empty"), port);
        if rng.random_bool(0.2) {
            p.more_fragments = rng.random_bool(0.5);
            p.fragment_offset = if rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(1..0x1fff)
            };
        }
        if !v4 {
            let count = rng.random_range(0..4);
            p.extensions = (0..count)
                .map(|_| *[0u8, 60, 43, 51].choose(&mut rng).expect("non-empty"))
                .collect();
            if p.fragment_offset != 0 || p.more_fragments {
                p.extensions.push(44);
            }
            if rng.random_bool(0.02) {
                p.extensions = vec![60; 9];
            }
        }
        if rng.random_bool(0.1) {
            p.transport_len = rng.random_range(0..4);
        }
        if v4 && rng.random_bool(0.05) {
            p.ihl = rng.random_range(0..16);
        }
        if rng.random_bool(0.03) {
            p.version = rng.random_range(0..16);
        }
        if rng.random_bool(0.03) {
            let fixed = if v4 { 20 } else { 40 };
            p.cut_to = Some(rng.random_range(fixed..fixed + 40));
        }
        let want = reference(&rules, &p);
        let got = loaded.verdict(&p);
        assert_eq!(
            got, want,
            "packet {i} (seed {seed}; rerun with IMDS_GUARD_SEED={seed}): {p:?}"
        );
        drops += usize::from(got == DROP);
    }
    // The generator must exercise both verdicts, or the test proves little.
    assert!(
        drops > PACKETS / 10 && drops < PACKETS * 9 / 10,
        "{drops} drops of {PACKETS}"
    );
}

#[test]
fn changing_the_rules_moves_the_prefilter_with_them() {
    let deny = |texts: &[&str]| {
        RuleSet::new(
            texts
                .iter()
                .map(|t| Rule::parse_deny(t).expect("rule"))
                .collect(),
        )
        .expect("rule set")
    };
    let first = deny(&["169.254.169.254/32"]);
    let mut loaded = load(&first);
    let wireserver = Ipv4Addr::new(168, 63, 129, 16);
    assert_eq!(loaded.verdict(&Packet::new(md(), TCP, 80)), DROP);
    assert_eq!(loaded.verdict(&Packet::new(wireserver, TCP, 80)), PASS);
    loaded
        .rules
        .sync(&deny(&["168.63.129.16/32"]))
        .expect("second set");
    assert_eq!(loaded.verdict(&Packet::new(md(), TCP, 80)), PASS);
    assert_eq!(loaded.verdict(&Packet::new(wireserver, TCP, 80)), DROP);
}
