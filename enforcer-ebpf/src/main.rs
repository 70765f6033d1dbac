//! imds-guard's kernel side: one cgroup_skb egress program and four
//! cgroup_sock_addr programs on the guarded cgroup, and the node edge
//! guard's two tc programs (`node`), all deciding from the same destination
//! rules.
//!
//! Every program decides on the destination first and only then asks about
//! cgroups, so traffic to ordinary destinations costs one trie lookup.
#![no_std]
#![no_main]

mod maps;
mod node;
mod packet;
mod stores;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    cty::c_long,
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use enforcer_common::{
    ACCESS_ALLOW, ACCESS_AUDIT, AddrWords, DestRule, FORWARDED_KEY, PortInfo,
    rule::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, protocol_class},
};

use crate::{
    maps::{Hook, Subject},
    packet::IpPacket,
};

/// Return value of every program: let the packet or call through.
const ALLOW: i32 = 1;
/// Return value of every program: drop the packet, or fail the call with EPERM.
const REFUSE: i32 = 0;

/// What an attempt is: where to, which protocol class and port.
struct Attempt {
    destination: AddrWords,
    protocol: u32,
    port: PortInfo,
}

/// Who made an attempt: what it may do with a denied destination
/// ([`ACCESS_ALLOW`], [`ACCESS_AUDIT`] or `maps::UNLISTED`), and the key its
/// refusals are counted and reported under (a cgroup id, or
/// [`FORWARDED_KEY`] with an interface index). Two whole words, no
/// pointer: kept on the stack across the packet reads, a spilled pointer
/// next to a helper's buffer is what verifiers before 7.x refuse without
/// CAP_PERFMON ("attempt to corrupt spilled pointer on stack").
pub struct Sender {
    access: u64,
    key: u64,
}

impl Sender {
    /// A cgroup's: the subject's, with what its nearest listed ancestor may
    /// do. An allowed one needs no key.
    #[inline(always)]
    fn of_cgroup(subject: &Subject, access: u32) -> Sender {
        let key = if access == ACCESS_ALLOW {
            0
        } else {
            subject.leaf_cgroup_id()
        };
        Sender {
            access: u64::from(access),
            key,
        }
    }

    /// Whatever entered the node on `ifindex`.
    #[inline(always)]
    fn of_interface(ifindex: u32, access: u32) -> Sender {
        Sender {
            access: u64::from(access),
            key: FORWARDED_KEY | u64::from(ifindex),
        }
    }
}

/// Decides for a destination that has a rule: carve-outs and allowed
/// senders pass, then traffic the rule does not deny; the rest is counted,
/// reported and refused (or passed in audit mode, or from a sender listed
/// for audit). `sender` gives the sender and what it may do, or `None`
/// when the attempt is not this program's to judge.
///
/// The sender (a cgroup walk) comes before `attempt` reads the transport
/// header: the verifier then walks the ancestor loop once per path into it
/// rather than once per parse path, which kernels before 7.x, without
/// CAP_PERFMON and so exploring speculative branches too, give up on ("the
/// sequence of 8193 jumps is too complex"). Allowed senders also skip the parse.
#[inline(always)]
fn refuses(
    rule: &DestRule,
    hook: Hook,
    sender: impl FnOnce() -> Option<Sender>,
    attempt: impl FnOnce() -> Result<Attempt, c_long>,
) -> bool {
    if !rule.may_deny() {
        return false;
    }
    let Some(sender) = sender() else {
        return false;
    };
    if sender.access == u64::from(ACCESS_ALLOW) {
        return false;
    }
    // A packet whose header cannot be read has no transport to deny.
    let Ok(attempt) = attempt() else {
        return false;
    };
    if !rule.denies(attempt.protocol, attempt.port) {
        return false;
    }
    let key = sender.key;
    maps::count_block(key, hook);
    let port = match attempt.port {
        PortInfo::Known(port) => port,
        PortInfo::NotApplicable | PortInfo::Unknown => 0,
    };
    let audited = maps::audit_mode() || sender.access == u64::from(ACCESS_AUDIT);
    maps::send_event(
        key,
        attempt.destination,
        port,
        attempt.protocol,
        hook,
        audited,
    );
    !audited
}

/// A cgroup program's sender: the subject's cgroup, with what its nearest
/// listed ancestor may do.
#[inline(always)]
fn cgroup_sender(subject: &Subject) -> Option<Sender> {
    let access = maps::cgroup_access(subject);
    Some(Sender::of_cgroup(subject, access))
}

/// A cgroup program's return value for a decision.
#[inline(always)]
fn cgroup_verdict(refused: bool) -> i32 {
    if refused { REFUSE } else { ALLOW }
}

#[cgroup_skb(egress)]
pub fn imds_guard_egress(ctx: SkBuffContext) -> i32 {
    // A packet whose destination cannot be read has no destination to deny.
    try_imds_guard_egress(&ctx, &ctx).unwrap_or(ALLOW)
}

/// The same program, every read through a helper, for verifiers that
/// refuse the in-place read's packet pointer comparison without
/// CAP_PERFMON (Linux 5.10's): the loader falls back to it.
#[cgroup_skb(egress)]
pub fn imds_guard_egress_copying(ctx: SkBuffContext) -> i32 {
    try_imds_guard_egress(&ctx, &packet::Copied(&ctx)).unwrap_or(ALLOW)
}

#[inline(always)]
fn try_imds_guard_egress(ctx: &SkBuffContext, packet: &impl IpPacket) -> Result<i32, c_long> {
    let destination = packet::read_destination(packet)?;
    let Some(rule) = maps::rule_for(destination) else {
        return Ok(ALLOW);
    };
    let subject = Subject::Skb(ctx.skb.skb);
    let sender = || cgroup_sender(&subject);
    Ok(cgroup_verdict(refuses(rule, Hook::Egress, sender, || {
        Attempt::from_packet(packet, destination)
    })))
}

impl Attempt {
    /// Reads a packet's protocol class and port, its destination read already.
    #[inline(always)]
    fn from_packet(packet: &impl IpPacket, destination: AddrWords) -> Result<Attempt, c_long> {
        let header = packet::read_ip_header(packet)?;
        let (protocol, port) = packet::transport(packet, &header);
        Ok(Attempt {
            destination,
            protocol,
            port,
        })
    }

    /// Reads a socket call's destination. `ipv6` selects `user_ip6` over `user_ip4`.
    #[inline(always)]
    fn from_sock_addr(ctx: &SockAddrContext, ipv6: bool) -> Attempt {
        // SAFETY: the kernel hands every cgroup_sock_addr program a valid context.
        let addr: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
        let destination = if ipv6 {
            // `::ffff:a.b.c.d` already has the trie's IPv4-mapped form, so a
            // mapped destination meets the IPv4 rules with no extra step.
            AddrWords::from_user_ip6(addr.user_ip6)
        } else {
            AddrWords::ipv4_mapped(addr.user_ip4.to_ne_bytes())
        };
        // user_port holds the port in network byte order in its low 16 bits.
        let port_number = u16::from_be(addr.user_port as u16);
        let ip_protocol = addr.protocol as u8;
        // ICMP is told by the socket's family (ICMPv6 sockets are AF_INET6).
        let protocol = protocol_class(ip_protocol, ipv6);
        let port = match protocol {
            PROTO_TCP | PROTO_UDP => PortInfo::Known(port_number),
            PROTO_ICMP => PortInfo::NotApplicable,
            // Raw sockets: whatever they carry, its port is not ours to read.
            _ => PortInfo::Unknown,
        };
        Attempt {
            destination,
            protocol,
            port,
        }
    }
}

#[inline(always)]
fn try_sock_addr(ctx: &SockAddrContext, ipv6: bool, hook: Hook) -> i32 {
    let attempt = Attempt::from_sock_addr(ctx, ipv6);
    match maps::rule_for(attempt.destination) {
        None => ALLOW,
        // Inlined: an outlined closure hands its result back through a
        // stack pointer, field by field (see node.rs).
        Some(rule) => cgroup_verdict(refuses(
            rule,
            hook,
            #[inline(always)]
            || cgroup_sender(&Subject::Current),
            || Ok(attempt),
        )),
    }
}

#[cgroup_sock_addr(connect4)]
pub fn imds_guard_connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, false, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn imds_guard_connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, true, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn imds_guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, false, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn imds_guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, true, Hook::Sendmsg)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
