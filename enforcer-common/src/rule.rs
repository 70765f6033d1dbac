//! A destination rule as the kernel stores it, and the one decision made
//! from it. The eBPF programs and the daemon's tests share this code, so the
//! socket hooks and the packet hook cannot disagree on what a rule means.

/// The longest matching prefix carries this action: its traffic is refused.
pub const ACTION_DENY: u32 = 1;
/// The longest matching prefix carries this action: its traffic is never
/// refused (a carve-out inside a broader deny, e.g. EKS Pod Identity).
pub const ACTION_PASS: u32 = 2;

/// Protocol classes a rule can name, as bits.
pub const PROTO_TCP: u32 = 1 << 0;
pub const PROTO_UDP: u32 = 1 << 1;
/// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
pub const PROTO_ICMP: u32 = 1 << 2;
/// Every other IP protocol (raw sockets, SCTP, GRE, ...).
pub const PROTO_OTHER: u32 = 1 << 3;
pub const PROTO_ANY: u32 = PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_OTHER;

/// The rule applies whatever the destination port.
pub const PORTS_ALL: u32 = 0;
/// The rule applies only to the listed destination ports.
pub const PORTS_ONLY: u32 = 1;
/// The rule applies to every destination port except the listed ones.
pub const PORTS_EXCEPT: u32 = 2;

/// How many port ranges one rule can list.
pub const MAX_PORT_RANGES: usize = 8;

/// IP protocol numbers the programs classify.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An inclusive range of destination ports, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// The value stored for one destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestRule {
    /// [`ACTION_DENY`] or [`ACTION_PASS`].
    pub action: u32,
    /// Bits of `PROTO_*`.
    pub protocols: u32,
    /// [`PORTS_ALL`], [`PORTS_ONLY`] or [`PORTS_EXCEPT`].
    pub port_scope: u32,
    /// How many entries of `port_ranges` are in use.
    pub port_range_count: u32,
    pub port_ranges: [PortRange; MAX_PORT_RANGES],
}

/// What a packet or socket call tells about its destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortInfo {
    /// TCP or UDP with a readable destination port.
    Known(u16),
    /// A protocol that has no ports (ICMP).
    NotApplicable,
    /// The port exists but cannot be read: a non-first fragment, a truncated
    /// or malformed header, a protocol whose header we do not parse.
    Unknown,
}

/// Maps an IP protocol number to its `PROTO_*` class. ICMP is the family's
/// own: ICMPv6's number in an IPv4 packet is just another protocol.
#[inline(always)]
pub const fn protocol_class(ip_protocol: u8, ipv6: bool) -> u32 {
    match (ip_protocol, ipv6) {
        (IPPROTO_TCP, _) => PROTO_TCP,
        (IPPROTO_UDP, _) => PROTO_UDP,
        (IPPROTO_ICMP, false) | (IPPROTO_ICMPV6, true) => PROTO_ICMP,
        _ => PROTO_OTHER,
    }
}

impl DestRule {
    /// A rule that passes everything: the carve-out value.
    pub const PASS: DestRule = DestRule {
        action: ACTION_PASS,
        protocols: PROTO_ANY,
        port_scope: PORTS_ALL,
        port_range_count: 0,
        port_ranges: [PortRange { first: 0, last: 0 }; MAX_PORT_RANGES],
    };

    /// Whether `port` falls in range `I`, which is in use.
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation, reason = "I < MAX_PORT_RANGES = 8")]
    fn slot_lists<const I: usize>(&self, port: u16) -> bool {
        let range = self.port_ranges[I];
        (I as u32) < self.port_range_count && port >= range.first && port <= range.last
    }

    /// Whether `port` falls in one of the listed ranges. Unrolled by hand,
    /// each range at a constant offset: as a loop, the compiler steps a
    /// pointer past the array's end, and without CAP_PERFMON the verifier
    /// refuses map-value pointer arithmetic out of range even when nothing
    /// is read there (kernels before 7.x).
    #[inline(always)]
    fn lists_port(&self, port: u16) -> bool {
        const _: () = assert!(MAX_PORT_RANGES == 8, "lists_port checks exactly 8 slots");
        self.slot_lists::<0>(port)
            || self.slot_lists::<1>(port)
            || self.slot_lists::<2>(port)
            || self.slot_lists::<3>(port)
            || self.slot_lists::<4>(port)
            || self.slot_lists::<5>(port)
            || self.slot_lists::<6>(port)
            || self.slot_lists::<7>(port)
    }

    /// Whether some traffic is refused by this rule (it is no carve-out).
    #[inline(always)]
    pub fn may_deny(&self) -> bool {
        self.action == ACTION_DENY
    }

    /// Whether traffic of `protocol` (a `PROTO_*` class) to `port` is refused
    /// by this rule. What cannot be read is refused (fail closed).
    #[inline(always)]
    pub fn denies(&self, protocol: u32, port: PortInfo) -> bool {
        if !self.may_deny() || self.protocols & protocol == 0 {
            return false;
        }
        match (self.port_scope, port) {
            (PORTS_ONLY, PortInfo::Known(p)) => self.lists_port(p),
            (PORTS_ONLY, PortInfo::NotApplicable) => false,
            (PORTS_EXCEPT, PortInfo::Known(p)) => !self.lists_port(p),
            // Everything else is refused: a rule for every port, a port that
            // cannot be read (fail closed), a protocol without ports under an
            // exception list, and an unknown scope (a corrupt rule).
            _ => true,
        }
    }

    /// Whether the verdict for this rule can depend on a port.
    #[inline(always)]
    pub fn depends_on_ports(&self) -> bool {
        self.port_scope != PORTS_ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(protocols: u32, port_scope: u32, ranges: &[(u16, u16)]) -> DestRule {
        let mut r = DestRule {
            action: ACTION_DENY,
            protocols,
            port_scope,
            port_range_count: u32::try_from(ranges.len()).expect("a few ranges"),
            port_ranges: [PortRange::default(); MAX_PORT_RANGES],
        };
        for (slot, &(first, last)) in r.port_ranges.iter_mut().zip(ranges) {
            *slot = PortRange { first, last };
        }
        r
    }

    #[test]
    fn decisions_over_the_default_and_provider_rules() {
        use PortInfo::{Known, NotApplicable, Unknown};
        let imds_except_dns = rule(PROTO_ANY, PORTS_EXCEPT, &[(53, 53)]);
        let wireserver = rule(PROTO_TCP, PORTS_ONLY, &[(80, 80), (32526, 32526)]);
        let whole = rule(PROTO_ANY, PORTS_ALL, &[]);
        let cases = [
            (&imds_except_dns, PROTO_TCP, Known(80), true),
            (&imds_except_dns, PROTO_TCP, Known(53), false),
            (&imds_except_dns, PROTO_UDP, Known(53), false),
            (&imds_except_dns, PROTO_UDP, Known(54), true),
            (&imds_except_dns, PROTO_ICMP, NotApplicable, true),
            (&imds_except_dns, PROTO_UDP, Unknown, true),
            (&imds_except_dns, PROTO_OTHER, Unknown, true),
            (&wireserver, PROTO_TCP, Known(80), true),
            (&wireserver, PROTO_TCP, Known(32526), true),
            (&wireserver, PROTO_TCP, Known(443), false),
            (&wireserver, PROTO_UDP, Known(80), false),
            (&wireserver, PROTO_ICMP, NotApplicable, false),
            (&wireserver, PROTO_TCP, Unknown, true),
            (&whole, PROTO_ICMP, NotApplicable, true),
            (&whole, PROTO_OTHER, Unknown, true),
            (&DestRule::PASS, PROTO_TCP, Known(80), false),
        ];
        for (i, (r, proto, port, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                r.denies(proto, port),
                want,
                "case {i}: {r:?} {proto} {port:?}"
            );
        }
    }

    #[test]
    fn port_ranges_are_inclusive_and_count_bounded() {
        let mut r = rule(PROTO_TCP, PORTS_ONLY, &[(1000, 2000)]);
        assert!(r.denies(PROTO_TCP, PortInfo::Known(1000)));
        assert!(r.denies(PROTO_TCP, PortInfo::Known(2000)));
        assert!(!r.denies(PROTO_TCP, PortInfo::Known(999)));
        assert!(!r.denies(PROTO_TCP, PortInfo::Known(2001)));
        // A stale range beyond the count is ignored.
        r.port_ranges[1] = PortRange { first: 1, last: 10 };
        assert!(!r.denies(PROTO_TCP, PortInfo::Known(5)));
    }

    #[test]
    fn protocol_numbers_map_to_classes() {
        let cases = [
            (6, false, PROTO_TCP),
            (6, true, PROTO_TCP),
            (17, true, PROTO_UDP),
            (1, false, PROTO_ICMP),
            (58, true, PROTO_ICMP),
            (58, false, PROTO_OTHER),
            (1, true, PROTO_OTHER),
            (132, false, PROTO_OTHER),
            (255, true, PROTO_OTHER),
        ];
        for (number, ipv6, class) in cases {
            assert_eq!(protocol_class(number, ipv6), class, "{number} ipv6={ipv6}");
        }
    }
}
