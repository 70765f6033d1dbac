//! The contract between the imds-guard eBPF programs and the daemon: map
//! and program names, limits, the `#[repr(C)]` values stored in the maps
//! (with their layouts asserted), the destination rule's decision and the
//! destination pre-filter, whose reader (the programs) and writer (the
//! daemon) sit side by side in [`prefilter`].
//!
//! Every type here is shared with the kernel, so it has explicit padding and
//! no `bool`, enum or `Option` fields.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
// The programs call these on every packet and socket call; inlined, they
// cost the verifier no BPF-to-BPF calls.
#![allow(clippy::inline_always)]
// Padding is spelt out as public fields, so either side can write a whole
// value; the leading `_` says they carry nothing.
#![allow(clippy::pub_underscore_fields)]

#[cfg(feature = "std")]
pub mod mountinfo;
pub mod prefilter;
pub mod rule;

pub use prefilter::{BUCKET_COUNT, BUCKET_WORDS, IPV6_BUCKETS_START, bucket, is_ipv4_mapped};
pub use rule::{DestRule, PortInfo, PortRange};

/// Names of the maps, globals and programs in the eBPF object. They appear
/// nowhere else (the daemon's tests check the object against them).
pub mod names {
    /// LPM trie: destination prefix -> [`crate::DestRule`].
    pub const DEST_RULES: &str = "DEST_RULES";
    /// Array of `u64` words: the destination pre-filter, one bit a bucket
    /// (see [`crate::bucket`]).
    pub const DEST_BUCKETS: &str = "DEST_BUCKETS";
    /// Hash: cgroup id -> [`crate::AllowEntry`].
    pub const ALLOWED_CGROUPS: &str = "ALLOWED_CGROUPS";
    /// LRU hash: cgroup id -> [`crate::BlockCounters`].
    pub const BLOCK_COUNTERS: &str = "BLOCK_COUNTERS";
    /// Ring buffer of [`crate::BlockEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// LRU hash: cgroup id -> [`crate::EventWindow`], for the per-cgroup event rate limit.
    pub const EVENT_WINDOWS: &str = "EVENT_WINDOWS";
    /// Per-CPU array of one `u64`: events not sent (rate limit or full ring).
    pub const EVENTS_DROPPED: &str = "EVENTS_DROPPED";
    /// Per-CPU array of one 48-byte buffer the header parse reads into.
    pub const PACKET_SCRATCH: &str = "PACKET_SCRATCH";
    /// Hash: host-side interface index of an allowlisted pod -> [`crate::AllowEntry`].
    pub const ALLOWED_INTERFACES: &str = "ALLOWED_INTERFACES";
    /// Global `u32` set at load time: [`crate::MODE_ENFORCE`] or [`crate::MODE_AUDIT`].
    pub const ENFORCE_MODE: &str = "ENFORCE_MODE";
    /// Global `u64` set at load time: the guarded cgroup's id, so the node
    /// programs judge only sockets of that subtree.
    pub const GUARDED_CGROUP_ID: &str = "GUARDED_CGROUP_ID";
    /// The `cgroup_skb` egress program...
    pub const PROG_EGRESS: &str = "imds_guard_egress";
    /// ...and its variant that reads packets only through a helper, loaded
    /// in its place where the verifier refuses the in-place read. Either is
    /// the generation's egress program, pinned under [`PROG_EGRESS`]'s name.
    pub const PROG_EGRESS_COPYING: &str = "imds_guard_egress_copying";
    /// The `cgroup_sock_addr` programs.
    pub const PROG_CONNECT4: &str = "imds_guard_connect4";
    pub const PROG_CONNECT6: &str = "imds_guard_connect6";
    pub const PROG_SENDMSG4: &str = "imds_guard_sendmsg4";
    pub const PROG_SENDMSG6: &str = "imds_guard_sendmsg6";
    /// The node edge guard's tc programs: egress of the interfaces that
    /// route to denied destinations, and ingress of allowlisted pods' bridge ports.
    pub const PROG_UPLINK: &str = "imds_guard_uplink";
    pub const PROG_BRIDGE_PORT: &str = "imds_guard_bridge_port";
    /// The BPF LSM program on `socket_create`, loaded only on request (it
    /// needs `CAP_PERFMON`): `AF_PACKET` and `AF_XDP` sockets of the guarded
    /// cgroup, which skip tc with `PACKET_QDISC_BYPASS` or XDP.
    pub const PROG_SOCKET_CREATE: &str = "imds_guard_socket_create";

    /// Every map of the object: one generation pins each of them.
    pub const MAPS: [&str; 9] = [
        DEST_RULES,
        DEST_BUCKETS,
        ALLOWED_CGROUPS,
        BLOCK_COUNTERS,
        EVENTS,
        EVENT_WINDOWS,
        EVENTS_DROPPED,
        ALLOWED_INTERFACES,
        PACKET_SCRATCH,
    ];
    /// The `cgroup_sock_addr` programs, which share one attach call.
    pub const SOCK_ADDR_PROGRAMS: [&str; 4] =
        [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6];
    /// Every program, egress first; one generation pins a link to each.
    pub const PROGRAMS: [&str; 5] = [
        PROG_EGRESS,
        SOCK_ADDR_PROGRAMS[0],
        SOCK_ADDR_PROGRAMS[1],
        SOCK_ADDR_PROGRAMS[2],
        SOCK_ADDR_PROGRAMS[3],
    ];
    /// The node edge guard's programs: one generation pins each program
    /// (not a link: they are attached per interface, as interfaces come).
    pub const NODE_PROGRAMS: [&str; 2] = [PROG_UPLINK, PROG_BRIDGE_PORT];
}

/// Blocked attempts are refused.
pub const MODE_ENFORCE: u32 = 0;
/// Blocked attempts are counted and let through.
pub const MODE_AUDIT: u32 = 1;

/// Capacity of the destination rule trie.
pub const MAX_DEST_RULES: u32 = 4096;
/// Capacity of the allow map (pods on a node, with room to spare).
pub const MAX_ALLOWED_CGROUPS: u32 = 65536;
/// Capacity of the allowlisted pods' interfaces.
pub const MAX_ALLOWED_INTERFACES: u32 = 16384;
/// Capacity of the per-cgroup counters (least recently used entries go first).
pub const MAX_COUNTED_CGROUPS: u32 = 16384;
/// How many cgroup levels, from the root down, are checked against the allow
/// map. A real node puts a pod's cgroup at level 3 or 4, kind's nested
/// systemd layout at about 8 (6 below the node container's own cgroup).
/// Deeper levels are never matched: their processes stay refused. Not more:
/// without CAP_PERFMON, verifiers before 7.x explore each iteration's
/// speculative branches too, and 32 levels exceeded their limit of 8192
/// pending branches.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Key data of the destination trie: an IPv6 address in network byte order.
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), with 96 added to
/// the prefix length, so that one longest-prefix lookup serves both families.
pub type AddrBytes = [u8; 16];

/// Prefix length added to an IPv4 prefix stored IPv4-mapped.
pub const IPV4_MAPPED_PREFIX_BITS: u32 = 96;

/// Builds the IPv4-mapped IPv6 form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn ipv4_mapped(octets: [u8; 4]) -> AddrBytes {
    AddrWords::ipv4_mapped(octets).bytes()
}

/// Bytes of the event ring buffer (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;
/// Events a cgroup may send per second; the rest are counted as dropped.
pub const EVENTS_PER_CGROUP_PER_SECOND: u32 = 20;

/// Which hook saw an attempt.
pub const HOOK_CONNECT: u8 = 1;
pub const HOOK_SENDMSG: u8 = 2;
pub const HOOK_EGRESS: u8 = 3;
/// The node edge guard: a forwarded packet (its `cgroup_id` is
/// [`FORWARDED_KEY`] plus the interface it came in on).
pub const HOOK_FORWARD: u8 = 4;
/// The node edge guard: a frame of an `AF_PACKET` socket leaving an uplink.
pub const HOOK_PACKET_SOCKET: u8 = 5;
/// The BPF LSM: an `AF_PACKET` or `AF_XDP` socket being made (no
/// destination yet: the event's is all zeros).
pub const HOOK_SOCKET_CREATE: u8 = 6;

/// Set in the counter and event keys of forwarded packets, whose low 32
/// bits are then an interface index, not a cgroup id (cgroup ids are inode
/// numbers, far below 2^63).
pub const FORWARDED_KEY: u64 = 1 << 63;

/// Mark bits the bridge-port program sets on what an allowlisted pod sends
/// into a bridge: past the bridge, the packet's input interface is the
/// bridge, shared by every pod on it, so the port's verdict travels in the
/// mark. Crossing into the node's namespace clears the mark, so a pod
/// cannot set these itself. Bits no common CNI or kube-proxy uses
/// (kube-proxy 0xc000, Calico 0xffff0000, Cilium 0x0f00 and 0xf000).
pub const PORT_MARK_ALLOW: u32 = 0x0000_0080;
pub const PORT_MARK_AUDIT: u32 = 0x0000_0040;

/// What happened to it.
pub const VERDICT_REFUSED: u8 = 1;
/// Audit mode: it would have been refused, and was let through.
pub const VERDICT_AUDITED: u8 = 2;

/// One refused (or audited) attempt, sent to the daemon through the ring buffer.
///
/// Every byte is a named field, padding included, and the programs write it
/// with [`BlockEvent::new`]: the verifier refuses the byte-loop `memset` the
/// compiler emits for zeroing a padding array or implicit tail padding when
/// the loader lacks `CAP_PERFMON` (variable-offset pointer arithmetic on ring
/// memory), so there must be none to zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEvent {
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns`: monotonic nanoseconds since boot.
    pub timestamp_ns: u64,
    /// In the trie's key form (IPv4 as `::ffff:a.b.c.d`).
    pub destination: AddrBytes,
    /// Destination port, 0 when there is none or it cannot be read.
    pub port: u16,
    /// A `rule::PROTO_*` bit.
    pub protocol: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    pub _pad8: u8,
    pub _pad16: u16,
}

impl BlockEvent {
    /// An event with its padding zeroed (so nothing of the kernel's stack
    /// reaches the daemon), written with constant-offset stores only.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        cgroup_id: u64,
        timestamp_ns: u64,
        destination: AddrBytes,
        port: u16,
        protocol: u8,
        hook: u8,
        verdict: u8,
    ) -> BlockEvent {
        BlockEvent {
            cgroup_id,
            timestamp_ns,
            destination,
            port,
            protocol,
            hook,
            verdict,
            _pad8: 0,
            _pad16: 0,
        }
    }
}

/// Per-cgroup rate-limit state for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWindow {
    pub start_ns: u64,
    /// Whole word: a 32-bit count and its padding would be two stores
    /// into one stack slot (see [`AddrWords`]).
    pub sent: u64,
}

/// A trie-form address as two native-endian words holding its bytes in
/// memory order (bytes 0..8 and 8..16). The programs carry addresses this
/// way: built, compared and stored as whole 64-bit words, they never become
/// byte or half-word stores into a stack slot, which verifiers before 7.x
/// refuse to mix within one slot when the loader lacks CAP_PERFMON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrWords {
    pub hi: u64,
    pub lo: u64,
}

/// The IPv4-mapped prefix `::ffff:` as the low half of `AddrWords::lo`'s bytes.
const MAPPED_MARK: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl AddrWords {
    #[inline(always)]
    pub const fn from_bytes(bytes: AddrBytes) -> AddrWords {
        let [
            b0,
            b1,
            b2,
            b3,
            b4,
            b5,
            b6,
            b7,
            b8,
            b9,
            b10,
            b11,
            b12,
            b13,
            b14,
            b15,
        ] = bytes;
        AddrWords {
            hi: u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
            lo: u64::from_ne_bytes([b8, b9, b10, b11, b12, b13, b14, b15]),
        }
    }

    #[inline(always)]
    pub const fn bytes(self) -> AddrBytes {
        let [b0, b1, b2, b3, b4, b5, b6, b7] = self.hi.to_ne_bytes();
        let [b8, b9, b10, b11, b12, b13, b14, b15] = self.lo.to_ne_bytes();
        [
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
        ]
    }

    /// `::ffff:a.b.c.d` for an IPv4 address in network byte order.
    #[inline(always)]
    pub const fn ipv4_mapped(octets: [u8; 4]) -> AddrWords {
        let [a, b, c, d] = octets;
        AddrWords {
            hi: 0,
            lo: u64::from_ne_bytes([0, 0, 0xff, 0xff, a, b, c, d]),
        }
    }

    /// An IPv6 address the kernel hands over as four 32-bit words in
    /// network byte order (`bpf_sock_addr.user_ip6`).
    #[inline(always)]
    pub const fn from_user_ip6(words: [u32; 4]) -> AddrWords {
        let [a0, a1, a2, a3] = words[0].to_ne_bytes();
        let [b0, b1, b2, b3] = words[1].to_ne_bytes();
        let [c0, c1, c2, c3] = words[2].to_ne_bytes();
        let [d0, d1, d2, d3] = words[3].to_ne_bytes();
        AddrWords {
            hi: u64::from_ne_bytes([a0, a1, a2, a3, b0, b1, b2, b3]),
            lo: u64::from_ne_bytes([c0, c1, c2, c3, d0, d1, d2, d3]),
        }
    }

    /// Whether it is IPv4-mapped (`::ffff:a.b.c.d`).
    #[inline(always)]
    pub const fn is_ipv4_mapped(self) -> bool {
        let [l0, l1, l2, l3, _, _, _, _] = self.lo.to_ne_bytes();
        self.hi == 0 && u32::from_ne_bytes([l0, l1, l2, l3]) == MAPPED_MARK
    }

    /// The destination trie's key for this address (`prefix_len` then the
    /// 16 bytes: 20 bytes), as three whole words; the last 4 bytes are zero
    /// and beyond the key.
    #[inline(always)]
    pub const fn trie_key(self, prefix_len: u32) -> [u64; 3] {
        let [p0, p1, p2, p3] = prefix_len.to_ne_bytes();
        let [h0, h1, h2, h3, h4, h5, h6, h7] = self.hi.to_ne_bytes();
        let [l0, l1, l2, l3, l4, l5, l6, l7] = self.lo.to_ne_bytes();
        [
            u64::from_ne_bytes([p0, p1, p2, p3, h0, h1, h2, h3]),
            u64::from_ne_bytes([h4, h5, h6, h7, l0, l1, l2, l3]),
            u64::from_ne_bytes([l4, l5, l6, l7, 0, 0, 0, 0]),
        ]
    }
}

/// Value of the allow map: what a cgroup's subtree may do with a denied
/// destination. The nearest listed ancestor decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowEntry {
    pub generation: u32,
    /// [`ACCESS_ALLOW`] or [`ACCESS_AUDIT`]. Zero is allow, so entries of
    /// generations that predate audit entries read as they were written.
    pub access: u32,
}

/// The cgroup reaches denied destinations unreported.
pub const ACCESS_ALLOW: u32 = 0;
/// The cgroup's attempts are reported as audited and let through, whatever
/// the load-time mode (a namespace in audit mode).
pub const ACCESS_AUDIT: u32 = 1;

/// Attempts to reach a denied destination from one cgroup, by hook. In audit
/// mode they count attempts that were let through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    pub connect: u64,
    pub sendmsg: u64,
    pub egress: u64,
}

/// Fails the build, on the host and on the BPF target alike, unless `$type`
/// has exactly `$size` bytes and each field sits at its offset: the two
/// sides read each other's bytes, so the layout is part of the contract.
macro_rules! assert_layout {
    ($type:ty, $size:expr, { $($field:ident: $offset:expr),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$type>() == $size);
            $(assert!(core::mem::offset_of!($type, $field) == $offset);)*
        };
    };
}

assert_layout!(BlockEvent, 40, {
    cgroup_id: 0, timestamp_ns: 8, destination: 16, port: 32, protocol: 34,
    hook: 35, verdict: 36, _pad8: 37, _pad16: 38,
});
assert_layout!(EventWindow, 16, { start_ns: 0, sent: 8 });
assert_layout!(AllowEntry, 8, { generation: 0, access: 4 });
assert_layout!(BlockCounters, 24, { connect: 0, sendmsg: 8, egress: 16 });
assert_layout!(PortRange, 4, { first: 0, last: 2 });
assert_layout!(DestRule, 48, {
    action: 0, protocols: 4, port_scope: 8, port_range_count: 12, port_ranges: 16,
});
assert_layout!(AddrBytes, 16, {});

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, made of integers, and the layout
    // assertions above prove they have no implicit padding.
    unsafe impl aya::Pod for super::DestRule {}
    unsafe impl aya::Pod for super::AllowEntry {}
    unsafe impl aya::Pod for super::BlockCounters {}
    unsafe impl aya::Pod for super::BlockEvent {}
    unsafe impl aya::Pod for super::EventWindow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `bpf_sock_addr.user_ip6` holds for an address.
    fn user_ip6(octets: [u8; 16]) -> [u32; 4] {
        [0, 4, 8, 12]
            .map(|i| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]))
    }

    fn addresses() -> Vec<AddrBytes> {
        let v6 = |text: &str| {
            text.parse::<std::net::Ipv6Addr>()
                .expect("address")
                .octets()
        };
        let v4 = |text: &str| {
            text.parse::<std::net::Ipv4Addr>()
                .expect("address")
                .to_ipv6_mapped()
                .octets()
        };
        vec![
            v4("169.254.169.254"),
            v4("0.0.0.0"),
            v4("255.255.255.255"),
            v4("198.18.0.2"),
            v6("fd00:ec2::254"),
            v6("::"),
            v6("::1"),
            v6("::fffe:a9fe:a9fe"),
            v6("1::ffff:169.254.169.254"),
            v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ]
    }

    #[test]
    fn words_and_bytes_are_the_same_address() {
        for bytes in addresses() {
            let words = AddrWords::from_bytes(bytes);
            assert_eq!(words.bytes(), bytes);
            assert_eq!(AddrWords::from_user_ip6(user_ip6(bytes)), words);
            let mapped = bytes[..10].iter().all(|&b| b == 0) && bytes[10..12] == [0xff, 0xff];
            assert_eq!(words.is_ipv4_mapped(), mapped, "{bytes:?}");
            let bucket = if mapped {
                (u32::from(bytes[12]) << 8) | u32::from(bytes[13])
            } else {
                IPV6_BUCKETS_START + ((u32::from(bytes[0]) << 8) | u32::from(bytes[1]))
            };
            assert_eq!(words.bucket(), bucket, "{bytes:?}");
        }
        let mapped = AddrWords::ipv4_mapped([169, 254, 169, 254]);
        assert_eq!(
            mapped.bytes(),
            std::net::Ipv4Addr::new(169, 254, 169, 254)
                .to_ipv6_mapped()
                .octets()
        );
    }

    #[test]
    fn trie_keys_are_the_prefix_then_the_address() {
        for bytes in addresses() {
            let words = AddrWords::from_bytes(bytes).trie_key(128);
            let key: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            assert_eq!(key[..4], 128u32.to_ne_bytes());
            assert_eq!(key[4..20], bytes);
            assert_eq!(key[20..], [0; 4]);
        }
    }
}
