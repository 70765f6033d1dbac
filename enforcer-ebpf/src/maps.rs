//! The maps, and the lookups the programs make in them.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, lpm_trie::Key,
    },
};
use enforcer_common::{
    ACCESS_ALLOW, ACCESS_AUDIT, AddrBytes, AddrWords, AllowEntry, BUCKET_WORDS, BlockCounters,
    BlockEvent, DestRule, EVENT_RING_BYTES, EVENTS_PER_CGROUP_PER_SECOND, EventWindow,
    HOOK_CONNECT, HOOK_EGRESS, HOOK_FORWARD, HOOK_PACKET_SOCKET, HOOK_SENDMSG, HOOK_SOCKET_CREATE,
    MAX_ALLOWED_CGROUPS, MAX_ALLOWED_INTERFACES, MAX_CGROUP_DEPTH, MAX_COUNTED_CGROUPS,
    MAX_DEST_RULES, MODE_AUDIT, MODE_ENFORCE, PORT_MARK_ALLOW, PORT_MARK_AUDIT, VERDICT_AUDITED,
    VERDICT_REFUSED,
};

// The statics' names are the map names in `enforcer_common::names`.
#[map]
static DEST_RULES: LpmTrie<AddrBytes, DestRule> = LpmTrie::with_max_entries(MAX_DEST_RULES, 0);

/// One bit a bucket of destinations some deny rule covers; the rest never
/// reach the trie, which is where ordinary traffic saves its time.
#[map]
static DEST_BUCKETS: Array<u64> = Array::with_max_entries(BUCKET_WORDS, 0);

#[map]
static ALLOWED_CGROUPS: HashMap<u64, AllowEntry> =
    HashMap::with_max_entries(MAX_ALLOWED_CGROUPS, 0);

#[map]
static ALLOWED_INTERFACES: HashMap<u32, AllowEntry> =
    HashMap::with_max_entries(MAX_ALLOWED_INTERFACES, 0);

/// Per CPU, so counting needs no atomics (the BPF target has no 64-bit
/// atomic read-modify-write in `core`); the daemon sums the CPUs.
#[map]
static BLOCK_COUNTERS: LruPerCpuHashMap<u64, BlockCounters> =
    LruPerCpuHashMap::with_max_entries(MAX_COUNTED_CGROUPS - BUILD_VARIANT, 0);

/// 0 normally. The upgrade tests build a second object with
/// IMDS_GUARD_EBPF_VARIANT set, whose counters map holds one entry less:
/// the two objects then differ, and nothing else changes.
const BUILD_VARIANT: u32 = match option_env!("IMDS_GUARD_EBPF_VARIANT") {
    Some(_) => 1,
    None => 0,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

#[map]
static EVENT_WINDOWS: LruHashMap<u64, EventWindow> =
    LruHashMap::with_max_entries(MAX_COUNTED_CGROUPS, 0);

#[map]
static EVENTS_DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where the header parse reads packet bytes to: map memory, not the
/// stack. Verifiers before 7.x, without CAP_PERFMON, refuse a helper's
/// write into a stack slot that held a spilled register, and which slots
/// the compiler reuses is not ours to choose.
#[map]
static PACKET_SCRATCH: PerCpuArray<[u8; PACKET_SCRATCH_BYTES]> =
    PerCpuArray::with_max_entries(1, 0);

/// The fixed IPv6 header and one small read after it.
const PACKET_SCRATCH_BYTES: usize = 48;

/// This CPU's scratch buffer.
#[inline(always)]
pub fn packet_scratch() -> Option<*mut [u8; PACKET_SCRATCH_BYTES]> {
    PACKET_SCRATCH.get_ptr_mut(0)
}

/// Set by the loader; a constant to the verifier, which prunes the other mode.
#[unsafe(no_mangle)]
static ENFORCE_MODE: u32 = MODE_ENFORCE;

/// Set by the loader: the cgroup the daemon guards. The node programs
/// judge only sockets at or below it.
#[unsafe(no_mangle)]
static GUARDED_CGROUP_ID: u64 = 0;

#[inline(always)]
pub fn audit_mode() -> bool {
    // SAFETY: a plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(&ENFORCE_MODE) == MODE_AUDIT }
}

/// The rule of the longest prefix containing `destination`, if any. A
/// destination in a bucket no deny rule touches has none that can refuse it.
#[inline(always)]
pub fn rule_for(destination: AddrWords) -> Option<&'static DestRule> {
    let bucket = destination.bucket();
    // A missing word cannot happen (the array is fixed); treat it as set.
    let word = DEST_BUCKETS.get(bucket / 64).copied().unwrap_or(u64::MAX);
    if word & (1 << (bucket % 64)) == 0 {
        return None;
    }
    // The key as three whole-word stores, not a packed struct filled piece
    // by piece (see AddrWords).
    let key = destination.trie_key(128);
    // SAFETY: `Key<AddrBytes>` is packed, 20 bytes; the words hold exactly
    // its bytes and 4 more.
    DEST_RULES.get(unsafe { &*key.as_ptr().cast::<Key<AddrBytes>>() })
}

/// Which hook counted an attempt.
#[derive(Clone, Copy)]
pub enum Hook {
    Connect,
    Sendmsg,
    Egress,
    /// The node edge guard: a forwarded packet.
    Forward,
    /// The node edge guard: an `AF_PACKET` frame leaving an uplink.
    PacketSocket,
    /// The BPF LSM: an `AF_PACKET` or `AF_XDP` socket being made.
    SocketCreate,
}

impl Hook {
    /// The counter this hook's attempts go to.
    #[inline(always)]
    fn field(self, counters: &mut BlockCounters) -> &mut u64 {
        match self {
            Hook::Connect => &mut counters.connect,
            Hook::Sendmsg => &mut counters.sendmsg,
            // The guard's packets are on the wire too; forwarded ones are
            // counted under their interface's key, not a cgroup's.
            Hook::Egress | Hook::Forward | Hook::PacketSocket | Hook::SocketCreate => {
                &mut counters.egress
            }
        }
    }

    fn code(self) -> u8 {
        match self {
            Hook::Connect => HOOK_CONNECT,
            Hook::Sendmsg => HOOK_SENDMSG,
            Hook::Egress => HOOK_EGRESS,
            Hook::Forward => HOOK_FORWARD,
            Hook::PacketSocket => HOOK_PACKET_SOCKET,
            Hook::SocketCreate => HOOK_SOCKET_CREATE,
        }
    }
}

/// Whose cgroup a decision is about: a packet's socket, or the calling task.
pub enum Subject {
    Skb(*mut __sk_buff),
    Current,
}

impl Subject {
    #[inline(always)]
    pub fn leaf_cgroup_id(&self) -> u64 {
        // SAFETY: helper calls on the program's own context.
        unsafe {
            match self {
                Subject::Skb(skb) => bpf_skb_cgroup_id(*skb),
                Subject::Current => bpf_get_current_cgroup_id(),
            }
        }
    }

    /// The id of the ancestor at `level` (0 is the root), or 0 past the leaf.
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        // SAFETY: helper calls on the program's own context.
        unsafe {
            match self {
                Subject::Skb(skb) => bpf_skb_ancestor_cgroup_id(*skb, level),
                Subject::Current => bpf_get_current_ancestor_cgroup_id(level),
            }
        }
    }
}

/// What the nearest listed ancestor of the subject's cgroup (itself
/// included) may do, so a pod's entry covers its containers:
/// [`enforcer_common::ACCESS_ALLOW`], [`enforcer_common::ACCESS_AUDIT`], or
/// [`UNLISTED`].
#[inline(always)]
pub fn cgroup_access(subject: &Subject) -> u32 {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = subject.ancestor_cgroup_id(level);
        if id == 0 {
            return UNLISTED;
        }
        if let Some(entry) = ALLOWED_CGROUPS.get_ptr(id) {
            // SAFETY: a live map value.
            return unsafe { (*entry).access };
        }
        level += 1;
    }
    UNLISTED
}

/// No ancestor is listed: the load-time mode decides.
pub const UNLISTED: u32 = u32::MAX;

/// What the subject's cgroup may do ([`cgroup_access`]), if it is the
/// guarded cgroup or below it; `None` for every other cgroup. One walk, by
/// id rather than by level: the guarded cgroup's level depends on the
/// cgroup namespace the daemon saw it from.
#[inline(always)]
pub fn guarded_access(subject: &Subject) -> Option<u32> {
    // SAFETY: a plain read of a global the loader initialised.
    let guarded_id = unsafe { core::ptr::read_volatile(&GUARDED_CGROUP_ID) };
    let mut guarded = false;
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = subject.ancestor_cgroup_id(level);
        if id == 0 {
            break;
        }
        guarded |= id == guarded_id;
        if guarded && let Some(entry) = ALLOWED_CGROUPS.get_ptr(id) {
            // SAFETY: a live map value.
            return Some(unsafe { (*entry).access });
        }
        level += 1;
    }
    guarded.then_some(UNLISTED)
}

/// What a forwarded packet may do, by the interface it entered the node
/// on (an allowlisted pod's veth) or, past a bridge, by the mark its
/// bridge port gave it.
#[inline(always)]
pub fn interface_access(ingress_ifindex: u32, mark: u32) -> u32 {
    if let Some(entry) = ALLOWED_INTERFACES.get_ptr(ingress_ifindex) {
        // SAFETY: a live map value.
        return unsafe { (*entry).access };
    }
    if mark & PORT_MARK_ALLOW != 0 {
        ACCESS_ALLOW
    } else if mark & PORT_MARK_AUDIT != 0 {
        ACCESS_AUDIT
    } else {
        UNLISTED
    }
}

/// The mark bit an allowlisted pod's bridge port gives what it sends, or 0.
#[inline(always)]
pub fn port_mark(ifindex: u32) -> u32 {
    match ALLOWED_INTERFACES.get_ptr(ifindex) {
        // SAFETY: a live map value.
        Some(entry) => match unsafe { (*entry).access } {
            ACCESS_ALLOW => PORT_MARK_ALLOW,
            ACCESS_AUDIT => PORT_MARK_AUDIT,
            _ => 0,
        },
        None => 0,
    }
}

/// Counts one refused (or, in audit mode, audited) attempt from `cgroup_id`.
#[inline(always)]
pub fn count_block(cgroup_id: u64, hook: Hook) {
    if let Some(counters) = BLOCK_COUNTERS.get_ptr_mut(cgroup_id) {
        // SAFETY: a live value of this CPU's slot.
        *hook.field(unsafe { &mut *counters }) += 1;
        return;
    }
    let first = crate::stores::one_count(|c| hook.field(c));
    // Losing one count to a concurrent first insert is acceptable.
    let _ = BLOCK_COUNTERS.insert(cgroup_id, first, u64::from(BPF_NOEXIST));
}

/// Whether `cgroup_id` may send one more event this second. Updates race
/// across CPUs; a few events more or less is fine for a rate limit.
#[inline(always)]
fn within_rate(cgroup_id: u64, now_ns: u64) -> bool {
    const SECOND_NS: u64 = 1_000_000_000;
    if let Some(window) = EVENT_WINDOWS.get_ptr_mut(cgroup_id) {
        // SAFETY: a live map value.
        let window = unsafe { &mut *window };
        if now_ns.wrapping_sub(window.start_ns) >= SECOND_NS {
            window.start_ns = now_ns;
            window.sent = 0;
        }
        if window.sent >= u64::from(EVENTS_PER_CGROUP_PER_SECOND) {
            return false;
        }
        window.sent += 1;
        return true;
    }
    let first = EventWindow {
        start_ns: now_ns,
        sent: 1,
    };
    let _ = EVENT_WINDOWS.insert(cgroup_id, first, 0);
    true
}

fn count_dropped_event() {
    if let Some(dropped) = EVENTS_DROPPED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a one-element array.
        unsafe { *dropped += 1 };
    }
}

/// Tells the daemon about a refused (or audited) attempt, unless the
/// cgroup is over its rate or the ring is full: then it is only counted.
/// Never waits: the packet path does not slow down when the daemon lags.
#[inline(always)]
pub fn send_event(
    cgroup_id: u64,
    destination: AddrWords,
    port: u16,
    protocol: u32,
    hook: Hook,
    audited: bool,
) {
    // SAFETY: a helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    if !within_rate(cgroup_id, now_ns) {
        count_dropped_event();
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<BlockEvent>(0) else {
        count_dropped_event();
        return;
    };
    let verdict = if audited {
        VERDICT_AUDITED
    } else {
        VERDICT_REFUSED
    };
    let event = entry.as_mut_ptr();
    // Field by field into the ring's memory: a whole event built on the
    // stack first would be stored there in pieces of every width. Every
    // byte is written, padding included, so nothing stale reaches the daemon.
    // SAFETY: `event` is a reserved, 8-byte aligned BlockEvent; the two
    // address words are its `destination` bytes, at an 8-byte offset.
    unsafe {
        (&raw mut (*event).cgroup_id).write(cgroup_id);
        (&raw mut (*event).timestamp_ns).write(now_ns);
        let words = (&raw mut (*event).destination).cast::<u64>();
        words.write(destination.hi);
        words.add(1).write(destination.lo);
        (&raw mut (*event).port).write(port);
        (&raw mut (*event).protocol).write(protocol as u8);
        (&raw mut (*event).hook).write(hook.code());
        (&raw mut (*event).verdict).write(verdict);
        (&raw mut (*event)._pad8).write(0);
        (&raw mut (*event)._pad16).write(0);
    }
    entry.submit(0);
}
