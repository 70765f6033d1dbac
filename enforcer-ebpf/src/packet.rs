//! Reading destinations and ports from the IP packet itself, so raw sockets
//! and IPv4-mapped IPv6 sockets are judged by what goes on the wire.
//!
//! cgroup_skb programs see the packet from its IP header; tc programs from
//! the link-layer header, whatever its length, so they read relative to the
//! network header the kernel recorded ([`NetworkHeader`]).

use crate::maps;
use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    cty::c_long,
    helpers::{bpf_skb_load_bytes, bpf_skb_load_bytes_relative},
    programs::{SkBuffContext, TcContext},
};
use enforcer_common::{
    AddrWords, PortInfo,
    rule::{PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP, protocol_class},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// IPv4 fragment offset bits of the flags-and-offset field.
const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// IPv6 fragment header offset bits (the low three bits are flags).
const IPV6_FRAGMENT_OFFSET_MASK: u16 = 0xfff8;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AUTH: u8 = 51;
const NEXT_DEST_OPTIONS: u8 = 60;
/// Extension headers walked before a packet counts as malformed.
const MAX_IPV6_EXTENSION_HEADERS: u32 = 8;

/// The fixed IP header, by family, where [`read_ip_header`] put it.
pub enum IpHeader {
    V4(&'static [u8; IPV4_HEADER_LEN]),
    V6(&'static [u8; IPV6_HEADER_LEN]),
}

/// What packet bytes may be read as: any bit pattern is a valid value.
pub trait AnyBits: Copy {}
impl AnyBits for [u8; 4] {}
impl AnyBits for [u64; 2] {}

/// A packet read from its IP header on.
pub trait IpPacket {
    /// `skb->protocol`, host byte order.
    fn ethertype(&self) -> u16;
    /// Copies `len` bytes from `offset` past the start of the IP header to
    /// `to`; 0 or a negative error, as the helpers return.
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> c_long;
    /// Reads a `T` at `offset` past the start of the IP header straight
    /// from the packet, without a helper call, where the packet's linear
    /// part starts at that header and holds those bytes; `None` otherwise.
    fn in_place<T: AnyBits>(&self, offset: usize) -> Option<T>;
}

impl IpPacket for SkBuffContext {
    #[inline(always)]
    fn ethertype(&self) -> u16 {
        u16::from_be(self.skb.protocol() as u16)
    }

    #[inline(always)]
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> c_long {
        // SAFETY: the program's own context; `to` holds `len` bytes.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), offset, to.cast(), len) }
    }

    /// A cgroup_skb program's packet data starts at the IP header. Only a
    /// constant `offset` passes verifiers without CAP_PERFMON, which refuse
    /// variable offsets into packets (and before 5.11 any packet pointer
    /// comparison: [`Copied`] is for those).
    #[inline(always)]
    fn in_place<T: AnyBits>(&self, offset: usize) -> Option<T> {
        // SAFETY: the program's own context.
        let (data, end) = unsafe {
            (
                (*self.skb.skb).data as usize,
                (*self.skb.skb).data_end as usize,
            )
        };
        if data + offset + size_of::<T>() > end {
            return None;
        }
        // SAFETY: within the packet's linear part, checked just above.
        Some(unsafe { ((data + offset) as *const T).read_unaligned() })
    }
}

/// A cgroup_skb program's packet, read only through the helper.
pub struct Copied<'a>(pub &'a SkBuffContext);

impl IpPacket for Copied<'_> {
    #[inline(always)]
    fn ethertype(&self) -> u16 {
        self.0.ethertype()
    }

    #[inline(always)]
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> c_long {
        self.0.copy(offset, to, len)
    }

    #[inline(always)]
    fn in_place<T: AnyBits>(&self, _offset: usize) -> Option<T> {
        None
    }
}

/// A tc program's packet, read relative to its network header: Ethernet,
/// no link header (tunnels, WireGuard) and raw `AF_PACKET` frames alike.
pub struct NetworkHeader<'a>(pub &'a TcContext);

impl IpPacket for NetworkHeader<'_> {
    #[inline(always)]
    fn ethertype(&self) -> u16 {
        u16::from_be(self.0.skb.protocol() as u16)
    }

    #[inline(always)]
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> c_long {
        // SAFETY: the program's own context; `to` holds `len` bytes.
        unsafe {
            bpf_skb_load_bytes_relative(
                self.0.skb.skb.cast(),
                offset,
                to.cast(),
                len,
                BPF_HDR_START_NET,
            )
        }
    }

    /// A tc program's packet data starts at the link layer, whose length
    /// only the kernel's network-header offset knows.
    #[inline(always)]
    fn in_place<T: AnyBits>(&self, _offset: usize) -> Option<T> {
        None
    }
}

/// Reads a `T`, in place where the packet allows it (no helper call: the
/// cost every ordinary packet pays), else onto the stack. Only for a
/// program's first read (the destination): a helper's write into a stack
/// slot that held a spilled register is refused by verifiers before 7.x
/// without CAP_PERFMON, and before anything else nothing is spilled.
#[inline(always)]
fn load_first<T: AnyBits>(ctx: &impl IpPacket, offset: u32) -> Result<T, c_long> {
    if let Some(value) = ctx.in_place(offset as usize) {
        return Ok(value);
    }
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    let result = ctx.copy(offset, value.as_mut_ptr().cast(), size_of::<T>() as u32);
    if result == 0 {
        // SAFETY: filled by the helper.
        Ok(unsafe { value.assume_init() })
    } else {
        Err(result)
    }
}

/// Where in the scratch buffer small reads (extension headers, ports) go:
/// after the fixed header, which stays where the parse reads it.
const SMALL_READ_AT: usize = IPV6_HEADER_LEN;

/// Reads `N` bytes at `offset` into the per-CPU scratch buffer at `at`
/// (see `maps::packet_scratch`), never onto the stack.
#[inline(always)]
fn read_scratch<const N: usize>(
    ctx: &impl IpPacket,
    offset: usize,
    at: usize,
) -> Result<&'static [u8; N], c_long> {
    let scratch = maps::packet_scratch().ok_or(0)?;
    // SAFETY: `at + N` is within the buffer for every caller (the fixed
    // header at 0, four bytes at SMALL_READ_AT); a live map value.
    unsafe {
        let to = scratch.cast::<u8>().add(at);
        let result = ctx.copy(offset as u32, to, N as u32);
        if result == 0 {
            Ok(&*to.cast::<[u8; N]>())
        } else {
            Err(result)
        }
    }
}

/// Offsets of the destination address in the fixed headers.
const IPV4_DESTINATION_AT: u32 = 16;
const IPV6_DESTINATION_AT: u32 = 24;

/// Reads only the destination, in the trie's key form, for the family
/// that `skb->protocol` names (never the socket's family: a v4-mapped IPv6
/// socket sends IPv4 packets). Ordinary traffic reads nothing more.
#[inline(always)]
pub fn read_destination(ctx: &impl IpPacket) -> Result<AddrWords, c_long> {
    match ctx.ethertype() {
        ETH_P_IP => load_first::<[u8; 4]>(ctx, IPV4_DESTINATION_AT).map(AddrWords::ipv4_mapped),
        // Loaded as two words, the bytes in memory order: AddrWords' form.
        ETH_P_IPV6 => {
            load_first::<[u64; 2]>(ctx, IPV6_DESTINATION_AT).map(|[hi, lo]| AddrWords { hi, lo })
        }
        _ => Err(0),
    }
}

/// Reads the fixed header of the family that `skb->protocol` names.
#[inline(always)]
pub fn read_ip_header(ctx: &impl IpPacket) -> Result<IpHeader, c_long> {
    match ctx.ethertype() {
        ETH_P_IP => read_scratch(ctx, 0, 0).map(IpHeader::V4),
        ETH_P_IPV6 => read_scratch(ctx, 0, 0).map(IpHeader::V6),
        _ => Err(0),
    }
}

/// A header we cannot make sense of: it matches every protocol class and no
/// port can be trusted, so any deny rule for its destination refuses it.
const MALFORMED: (u32, PortInfo) = (PROTO_ANY, PortInfo::Unknown);

/// The protocol class and destination port of the packet, after its IP
/// header. Called only for destinations that have a rule.
#[inline(always)]
pub fn transport(ctx: &impl IpPacket, header: &IpHeader) -> (u32, PortInfo) {
    match header {
        IpHeader::V4(h) => ipv4_transport(ctx, h),
        IpHeader::V6(h) => ipv6_transport(ctx, h),
    }
}

#[inline(always)]
fn ipv4_transport(ctx: &impl IpPacket, h: &[u8; IPV4_HEADER_LEN]) -> (u32, PortInfo) {
    let version = h[0] >> 4;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    if version != 4 || header_len < IPV4_HEADER_LEN {
        return MALFORMED;
    }
    let protocol = h[9];
    let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & IPV4_FRAGMENT_OFFSET_MASK;
    if fragment_offset != 0 {
        // Not the first fragment: no transport header to read.
        return (protocol_class(protocol, false), PortInfo::Unknown);
    }
    port_at(ctx, protocol_class(protocol, false), header_len)
}

#[inline(always)]
fn ipv6_transport(ctx: &impl IpPacket, h: &[u8; IPV6_HEADER_LEN]) -> (u32, PortInfo) {
    if h[0] >> 4 != 6 {
        return MALFORMED;
    }
    let mut next = h[6];
    let mut offset = IPV6_HEADER_LEN;
    let mut walked = 0;
    // One pass more than the limit: it may only find the transport header.
    while walked <= MAX_IPV6_EXTENSION_HEADERS {
        let step = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTIONS | NEXT_AUTH | NEXT_FRAGMENT => next,
            _ => return port_at(ctx, protocol_class(next, true), offset),
        };
        if walked == MAX_IPV6_EXTENSION_HEADERS {
            return MALFORMED;
        }
        // The first four bytes of every extension header we walk hold the
        // next header, the length, and for fragments the offset.
        let Ok(ext) = read_scratch::<4>(ctx, offset, SMALL_READ_AT) else {
            return MALFORMED;
        };
        offset += match step {
            NEXT_AUTH => (usize::from(ext[1]) + 2) * 4,
            NEXT_FRAGMENT => {
                let fragment_offset =
                    u16::from_be_bytes([ext[2], ext[3]]) & IPV6_FRAGMENT_OFFSET_MASK;
                if fragment_offset != 0 {
                    // Not the first fragment: no transport header to read.
                    return (protocol_class(ext[0], true), PortInfo::Unknown);
                }
                8
            }
            _ => (usize::from(ext[1]) + 1) * 8,
        };
        next = ext[0];
        walked += 1;
    }
    MALFORMED
}

/// Reads the destination port of a TCP or UDP header at `offset`.
#[inline(always)]
fn port_at(ctx: &impl IpPacket, protocol: u32, offset: usize) -> (u32, PortInfo) {
    match protocol {
        PROTO_TCP | PROTO_UDP => match read_scratch::<4>(ctx, offset, SMALL_READ_AT) {
            Ok(ports) => (
                protocol,
                PortInfo::Known(u16::from_be_bytes([ports[2], ports[3]])),
            ),
            Err(_) => (protocol, PortInfo::Unknown),
        },
        PROTO_ICMP => (protocol, PortInfo::NotApplicable),
        _ => (protocol, PortInfo::Unknown),
    }
}
