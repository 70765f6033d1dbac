//! The node edge guard: what reaches a denied destination without passing
//! a pod socket's cgroup hooks. Forwarded packets (a pod's `AF_PACKET`
//! frames, Services DNATed to a metadata address, overlay-decapsulated
//! packets) carry no socket at the node; they are judged on egress of the
//! interfaces that route to denied destinations, after DNAT and
//! decapsulation, by the interface they entered the node on. A pod cannot
//! forge that: it only ever sends into its own veth.
//!
//! Past a bridge the input interface is the bridge, shared by every pod on
//! it, so allowlisted pods' bridge ports mark what they send
//! ([`imds_guard_bridge_port`]); the namespace crossing clears any mark a
//! pod set itself.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_sk_fullsock,
    macros::{classifier, lsm},
    programs::{LsmContext, TcContext},
};
use enforcer_common::{ACCESS_ALLOW, ACCESS_AUDIT, rule::PROTO_ANY};

use crate::{
    Attempt, Sender,
    maps::{self, Hook, Subject},
    packet::{self, NetworkHeader},
    refuses,
};

/// No opinion: the next tc program (a CNI's) decides, as if we were not there.
const NEXT: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;
/// `AF_PACKET`: its frames pass no cgroup socket hook.
const AF_PACKET: u32 = 17;

/// tc egress of an interface that routes to a denied destination.
#[classifier]
pub fn imds_guard_uplink(ctx: TcContext) -> i32 {
    // A packet whose destination cannot be read has no destination to deny.
    try_imds_guard_uplink(&ctx).unwrap_or(NEXT)
}

fn try_imds_guard_uplink(ctx: &TcContext) -> Result<i32, aya_ebpf::cty::c_long> {
    let packet = NetworkHeader(ctx);
    let destination = packet::read_destination(&packet)?;
    let Some(rule) = maps::rule_for(destination) else {
        return Ok(NEXT);
    };
    let skb = ctx.skb.skb;
    // SAFETY: the program's own context.
    let (ingress_ifindex, mark) = unsafe { ((*skb).ingress_ifindex, (*skb).mark) };
    // One call to `refuses`, its sender chosen first: with a call on each
    // branch the compiler outlined the shared closure into a BPF-to-BPF
    // call whose result it wrote through a stack pointer, field by field,
    // which verifiers before 7.x refuse without CAP_PERFMON.
    let (hook, sender) = if ingress_ifindex == 0 {
        // Sent from this namespace: sockets of the guarded cgroup met its
        // hooks, except AF_PACKET ones.
        (Hook::PacketSocket, packet_socket_sender(ctx))
    } else {
        let access = maps::interface_access(ingress_ifindex, mark);
        (
            Hook::Forward,
            Some(Sender::of_interface(ingress_ifindex, access)),
        )
    };
    let refused = refuses(
        rule,
        hook,
        || sender,
        || Attempt::from_packet(&packet, destination),
    );
    Ok(if refused { DROP } else { NEXT })
}

/// The sender of a frame from this namespace, if it is an `AF_PACKET`
/// socket's in the guarded cgroup.
#[inline(always)]
fn packet_socket_sender(ctx: &TcContext) -> Option<Sender> {
    let skb = ctx.skb.skb;
    // SAFETY: the program's own context; the kernel checks the socket pointers.
    let family = unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return None;
        }
        (*full).family
    };
    if family != AF_PACKET {
        return None;
    }
    let subject = Subject::Skb(skb);
    let access = maps::guarded_access(&subject)?;
    Some(Sender::of_cgroup(&subject, access))
}

/// tc ingress of an allowlisted pod's bridge port: marks what the pod sends.
#[classifier]
pub fn imds_guard_bridge_port(ctx: TcContext) -> i32 {
    // SAFETY: the program's own context.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    let bit = maps::port_mark(ifindex);
    if bit != 0 {
        ctx.set_mark(mark | bit);
    }
    NEXT
}

/// `AF_XDP`: its frames skip tc entirely.
const AF_XDP: i32 = 44;
const EPERM: i32 = 1;

/// The BPF LSM on `socket_create`: an `AF_PACKET` or `AF_XDP` socket of
/// the guarded cgroup, unless allowlisted, is refused (`EPERM`). Those
/// are the frames no tc program sees (`PACKET_QDISC_BYPASS`, XDP); the
/// daemon loads this only when asked (it needs CAP_PERFMON).
#[lsm(hook = "socket_create")]
pub fn imds_guard_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then
    // the verdict of the BPF LSM programs before this one.
    let (family, kern, previous): (i32, i32, i32) = (ctx.arg(0), ctx.arg(3), ctx.arg(4));
    if previous != 0 {
        return previous;
    }
    if kern != 0 || (family != AF_PACKET as i32 && family != AF_XDP) {
        return 0;
    }
    let subject = Subject::Current;
    let Some(access) = maps::guarded_access(&subject) else {
        return 0;
    };
    if access == ACCESS_ALLOW {
        return 0;
    }
    let key = subject.leaf_cgroup_id();
    maps::count_block(key, Hook::SocketCreate);
    let audited = maps::audit_mode() || access == ACCESS_AUDIT;
    // A port of 0 next to a zero address would be one zeroing `memset`.
    let none = crate::stores::no_address();
    maps::send_event(
        key,
        none,
        none.hi as u16,
        PROTO_ANY,
        Hook::SocketCreate,
        audited,
    );
    if audited { 0 } else { -EPERM }
}
