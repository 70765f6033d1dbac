//! Loading and attaching the eBPF programs, and typed access to their maps.
//! Map and program names come from `enforcer_common::names` only.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader, include_bytes_aligned,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        RingBuf, lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError},
    },
};
use enforcer_common::{
    AddrBytes, AllowEntry, BUCKET_WORDS, BlockCounters, BlockEvent, DestRule, MODE_AUDIT,
    MODE_ENFORCE, names,
};

use crate::{
    host::{
        cgroup::CgroupDir,
        memlock::{self, MemlockError},
        preflight,
    },
    rules::RuleSet,
};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-guard-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object failed: {source}")]
    Load { source: EbpfError },
    #[error("the kernel refused to create map {name} ({errno}): {cause}")]
    MapRefused {
        name: String,
        errno: std::io::Error,
        cause: String,
    },
    #[error(transparent)]
    Memlock(#[from] MemlockError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the kernel's verifier refused program {name} ({errno}){}: {}. \
         The whole verifier log is logged at debug level (IMDS_GUARD_LOG=debug)",
        summary.failing_instruction.as_ref().map(|i| format!(" at instruction {i}")).unwrap_or_default(),
        summary.last_lines.join(" / ")
    )]
    ProgramRefused {
        name: &'static str,
        errno: std::io::Error,
        summary: VerifierSummary,
    },
    #[error("loading program {name} failed: {source}")]
    ProgramLoad {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching {name} to {cgroup} failed: {source}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("pinning {name} at {path}: {reason}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Whether blocked attempts are refused or only counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    fn kernel_value(self) -> u32 {
        match self {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        }
    }
}

/// A fingerprint of the eBPF object built into this binary: pinned
/// generations of another object are upgraded, not adopted.
pub fn object_fingerprint() -> u64 {
    crate::pins::fingerprint(EBPF_OBJECT)
}

/// Loads the object and every program into the kernel, unattached. The mode
/// is a load-time constant, so the verifier drops the other mode's path.
/// With `map_pins`, each map is created pinned at the path it gives.
pub fn load(mode: Mode, map_pins: Option<&dyn Fn(&str) -> PathBuf>) -> Result<Ebpf, BpfError> {
    let mode_value = mode.kernel_value();
    let mut loader = EbpfLoader::new();
    loader.override_global(names::ENFORCE_MODE, &mode_value, true);
    let pin_paths: Vec<(&str, PathBuf)> = map_pins
        .map(|pin| names::MAPS.iter().map(|&m| (m, pin(m))).collect())
        .unwrap_or_default();
    for (map, path) in &pin_paths {
        loader.map_pin_path(map, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(load_error)?;
    let egress: &mut CgroupSkb = program(&mut ebpf, names::PROG_EGRESS)?;
    egress
        .load()
        .map_err(|source| program_error(names::PROG_EGRESS, source))?;
    for name in names::SOCK_ADDR_PROGRAMS {
        let hook: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        hook.load().map_err(|source| program_error(name, source))?;
    }
    Ok(ebpf)
}

/// What the kernel needs of RLIMIT_MEMLOCK for one generation's maps, on
/// kernels that charge it: checked (and raised where allowed) before any
/// map exists, so a refusal leaves nothing behind.
pub fn ensure_memlock() -> Result<memlock::Memlock, BpfError> {
    let shapes = memlock::shapes(EBPF_OBJECT).map_err(|e| BpfError::Load {
        source: EbpfError::ParseError(e),
    })?;
    let cpus = possible_cpus();
    memlock::ensure(&kernel_release(), memlock::need(&shapes, cpus), cpus).map_err(BpfError::from)
}

fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1, |n| n as u64)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Names the cause of a failed object load where it can be told: a map the
/// kernel refused to create is a seccomp filter, the memlock limit, or a
/// security module, and each has its own fix.
fn load_error(source: EbpfError) -> BpfError {
    let EbpfError::MapError(MapError::CreateError { name, io_error }) = source else {
        return BpfError::Load { source };
    };
    let cause = if io_error.raw_os_error() == Some(libc::EPERM) {
        refusal_cause()
    } else {
        "this kernel may lack the map type or feature it needs".to_owned()
    };
    BpfError::MapRefused {
        name,
        errno: io_error,
        cause,
    }
}

/// Why the kernel said EPERM to a process that holds CAP_BPF (privileges
/// are checked before loading).
fn refusal_cause() -> String {
    if bpf_syscall_filtered() {
        let seccomp = std::fs::read_to_string("/proc/self/status")
            .ok()
            .is_some_and(|s| seccomp_filtering(&s));
        return if seccomp {
            "this process's seccomp filter refuses the bpf system call. The container \
             runtime's profile must allow bpf for a process with CAP_BPF (containerd's \
             default profile does from 1.7 and 1.6.13, Docker's from 23.0); CRI-O's \
             default allows it only with CAP_SYS_ADMIN: use a Localhost profile that \
             allows bpf"
                .to_owned()
        } else {
            "something refuses the bpf system call before the kernel reads it (a \
             security module such as SELinux or Lockdown)"
                .to_owned()
        };
    }
    let release = kernel_release();
    if preflight::kernel_version(&release).is_some_and(|v| v < memlock::FIRST_MEMCG_KERNEL) {
        let need = memlock::shapes(EBPF_OBJECT)
            .map(|s| memlock::need(&s, possible_cpus()))
            .unwrap_or(0);
        return format!(
            "kernel {release} charges BPF maps to RLIMIT_MEMLOCK and the limit is too low \
             (the maps need about {} with {} possible CPUs; other processes of this user \
             count too): grant CAP_SYS_RESOURCE or raise the memlock limit",
            memlock::human(need),
            possible_cpus()
        );
    }
    "the kernel refused although this process holds CAP_BPF: a security module \
     (SELinux, AppArmor, Lockdown) may forbid BPF maps here"
        .to_owned()
}

/// Whether a `bpf()` call the kernel would reject as malformed (EINVAL) is
/// refused with EPERM instead: then something in front of the kernel, a
/// seccomp filter or a security module, refuses every `bpf()` call.
fn bpf_syscall_filtered() -> bool {
    // No such command: the kernel answers EINVAL once it gets to look.
    const NO_SUCH_COMMAND: libc::c_long = 0x7fff;
    // SAFETY: a null attribute pointer with size 0 is never dereferenced.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            NO_SUCH_COMMAND,
            std::ptr::null::<u8>(),
            0usize,
        )
    };
    ret < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether /proc/PID/status text says a seccomp filter is installed (mode 2).
fn seccomp_filtering(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .is_some_and(|mode| mode.trim() == "2")
}

/// The parts of a verifier log that explain a refusal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifierSummary {
    /// The last instruction the verifier printed before refusing.
    pub failing_instruction: Option<String>,
    /// Its last lines, without the statistics it ends with.
    pub last_lines: Vec<String>,
}

/// How many of the verifier's last lines an error carries.
const VERIFIER_LINES_SHOWN: usize = 3;

/// Picks the failing instruction and the closing lines out of a log.
pub fn summarize_verifier_log(log: &str) -> VerifierSummary {
    let is_statistics = |line: &str| {
        ["verification time", "stack depth", "processed "]
            .iter()
            .any(|p| line.starts_with(p))
    };
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_statistics(l) && !l.starts_with(';'))
        .collect();
    let is_instruction = |line: &str| {
        line.split_once(": (")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let failing_instruction = lines.iter().rev().find(|l| is_instruction(l)).map(|l| {
        // Drop the register state the verifier prints after `;`.
        l.split_once(" ; ")
            .map_or(*l, |(insn, _)| insn)
            .trim()
            .to_owned()
    });
    let tail = lines.len().saturating_sub(VERIFIER_LINES_SHOWN);
    VerifierSummary {
        failing_instruction,
        last_lines: lines[tail..]
            .iter()
            .filter(|l| !is_instruction(l))
            .map(|l| (*l).to_owned())
            .collect(),
    }
}

/// A refused program load, with its verifier log shortened for the error
/// and kept whole at debug level (logged once, here).
fn program_error(name: &'static str, source: ProgramError) -> BpfError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!(program = name, log = %log, "the verifier's whole log");
            BpfError::ProgramRefused {
                name,
                errno: io_error,
                summary: summarize_verifier_log(&log),
            }
        }
        source => BpfError::ProgramLoad { name, source },
    }
}

/// The eBPF object built into this binary.
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// Attaches every program to `cgroup` and pins each link at the path
/// `link_pin` gives, so enforcement outlives this process. Links are pinned
/// last: a generation with all its links pinned is complete.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    cgroup: &CgroupDir,
    link_pin: &dyn Fn(&str) -> PathBuf,
) -> Result<(), BpfError> {
    let attach_err = |name, source| BpfError::Attach {
        name,
        cgroup: cgroup.path().to_path_buf(),
        source,
    };
    let pin_err = |name, source: String| BpfError::Pin {
        name,
        path: link_pin(name),
        reason: source,
    };
    // `Single` links: AllowMultiple is refused (EINVAL) with link-based attach
    // here, and single links of other owners (or of our previous generation,
    // during an upgrade) still coexist on the cgroup, their verdicts AND-ed.
    let egress: &mut CgroupSkb = program(ebpf, names::PROG_EGRESS)?;
    let id = egress
        .attach(
            cgroup.file(),
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(|e| attach_err(names::PROG_EGRESS, e))?;
    let link: FdLink = egress
        .take_link(id)
        .map_err(|e| attach_err(names::PROG_EGRESS, e))?
        .try_into()
        .map_err(|e: LinkError| pin_err(names::PROG_EGRESS, e.to_string()))?;
    link.pin(link_pin(names::PROG_EGRESS))
        .map_err(|e| pin_err(names::PROG_EGRESS, e.to_string()))?;
    for name in names::SOCK_ADDR_PROGRAMS {
        let hook: &mut CgroupSockAddr = program(ebpf, name)?;
        let id = hook
            .attach(cgroup.file(), CgroupAttachMode::Single)
            .map_err(|e| attach_err(name, e))?;
        let link: FdLink = hook
            .take_link(id)
            .map_err(|e| attach_err(name, e))?
            .try_into()
            .map_err(|e: LinkError| pin_err(name, e.to_string()))?;
        link.pin(link_pin(name))
            .map_err(|e| pin_err(name, e.to_string()))?;
    }
    Ok(())
}

/// The egress program, for `BPF_PROG_TEST_RUN`.
pub fn egress_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, BpfError> {
    program(ebpf, names::PROG_EGRESS)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    let missing = || BpfError::Missing {
        kind: "program",
        name,
    };
    ebpf.program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())
}

fn take_map<M: TryFrom<Map>>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, BpfError> {
    let missing = || BpfError::Missing { kind: "map", name };
    ebpf.take_map(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())
}

/// Opens the map pinned at `path`, which must be of the type of `name`.
fn open_pinned<M: TryFrom<Map>>(path: &Path, name: &'static str) -> Result<M, BpfError> {
    let data = MapData::from_pin(path).map_err(map_err(name))?;
    Map::from_map_data(data)
        .map_err(map_err(name))?
        .try_into()
        .map_err(|_| BpfError::Missing { kind: "map", name })
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// The destination rule trie.
/// The destination rules: the trie, and the pre-filter of buckets that
/// lets ordinary destinations skip it.
pub struct DestRulesMap {
    trie: LpmTrie<MapData, AddrBytes, DestRule>,
    buckets: Array<MapData, u64>,
}

impl DestRulesMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        Ok(DestRulesMap {
            trie: take_map(ebpf, names::DEST_RULES)?,
            buckets: take_map(ebpf, names::DEST_BUCKETS)?,
        })
    }

    /// Opens the pinned maps; `pin` gives each map's pin path.
    pub fn from_pins(pin: &dyn Fn(&str) -> PathBuf) -> Result<Self, BpfError> {
        Ok(DestRulesMap {
            trie: open_pinned(&pin(names::DEST_RULES), names::DEST_RULES)?,
            buckets: open_pinned(&pin(names::DEST_BUCKETS), names::DEST_BUCKETS)?,
        })
    }

    /// Every entry: (prefix length, address, rule value).
    pub fn entries(&self) -> Result<Vec<(u32, AddrBytes, DestRule)>, BpfError> {
        self.trie
            .iter()
            .map(|entry| entry.map(|(key, value)| (key.prefix_len(), key.data(), value)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DEST_RULES))
    }

    fn write_buckets(&mut self, words: &[u64], present: &[u64]) -> Result<(), BpfError> {
        let err = map_err(names::DEST_BUCKETS);
        for (index, (&word, &now)) in words.iter().zip(present).enumerate() {
            if word != now {
                self.buckets.set(index as u32, word, 0).map_err(&err)?;
            }
        }
        Ok(())
    }

    /// Makes the maps hold exactly `rules`. Buckets are opened before the
    /// rules that need them go in, and closed after the rules that needed
    /// them are gone; new and changed trie entries are written before stale
    /// ones go. No moment has fewer rules in force than either set.
    pub fn sync(&mut self, rules: &RuleSet) -> Result<(), BpfError> {
        let err = map_err(names::DEST_RULES);
        let present_words: Vec<u64> = (0..BUCKET_WORDS)
            .map(|i| self.buckets.get(&i, 0))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DEST_BUCKETS))?;
        let words = rules.bucket_words();
        let union: Vec<u64> = words
            .iter()
            .zip(&present_words)
            .map(|(a, b)| a | b)
            .collect();
        self.write_buckets(&union, &present_words)?;
        let wanted: BTreeMap<(u32, AddrBytes), DestRule> = rules
            .rules()
            .iter()
            .map(|r| (r.kernel_key(), r.kernel_value()))
            .collect();
        for (&(len, addr), value) in &wanted {
            self.trie
                .insert(&Key::new(len, addr), value, 0)
                .map_err(&err)?;
        }
        let present: Vec<Key<AddrBytes>> =
            self.trie.keys().collect::<Result<_, _>>().map_err(&err)?;
        for key in present {
            if !wanted.contains_key(&(key.prefix_len(), key.data())) {
                self.trie.remove(&key).map_err(&err)?;
            }
        }
        self.write_buckets(&words, &union)
    }
}

/// The allowlisted cgroup ids.
pub struct AllowMap(HashMap<MapData, u64, AllowEntry>);

impl AllowMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::ALLOWED_CGROUPS).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::ALLOWED_CGROUPS).map(Self)
    }

    pub fn ids(&self) -> Result<BTreeSet<u64>, BpfError> {
        self.0
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::ALLOWED_CGROUPS))
    }

    /// Makes the map hold exactly `wanted`, by difference: entries that stay
    /// are never removed, not even for an instant.
    pub fn sync(&mut self, wanted: &BTreeSet<u64>) -> Result<(), BpfError> {
        let err = map_err(names::ALLOWED_CGROUPS);
        let present = self.ids()?;
        for id in wanted.difference(&present) {
            self.0.insert(id, AllowEntry::default(), 0).map_err(&err)?;
        }
        for id in present.difference(wanted) {
            self.0.remove(id).map_err(&err)?;
        }
        Ok(())
    }
}

/// Per-cgroup counts of refused (or audited) attempts.
pub struct CountersMap(PerCpuHashMap<MapData, u64, BlockCounters>);

impl CountersMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::BLOCK_COUNTERS).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::BLOCK_COUNTERS).map(Self)
    }

    /// Adds `totals` to the counters (on CPU 0), for carrying counts over
    /// from a previous generation.
    pub fn add(&mut self, totals: &BTreeMap<u64, BlockCounters>) -> Result<(), BpfError> {
        let err = map_err(names::BLOCK_COUNTERS);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(MapError::IoError(e)))?;
        let present = self.read()?;
        for (id, carried) in totals {
            let mut sum = present.get(id).copied().unwrap_or_default();
            sum.connect += carried.connect;
            sum.sendmsg += carried.sendmsg;
            sum.egress += carried.egress;
            let mut per_cpu = vec![BlockCounters::default(); cpus];
            per_cpu[0] = sum;
            let values = PerCpuValues::try_from(per_cpu).map_err(|e| err(MapError::IoError(e)))?;
            self.0.insert(id, values, 0).map_err(&err)?;
        }
        Ok(())
    }

    /// The counters of every cgroup, summed over CPUs.
    pub fn read(&self) -> Result<BTreeMap<u64, BlockCounters>, BpfError> {
        let mut totals = BTreeMap::new();
        for entry in self.0.iter() {
            let (id, per_cpu) = entry.map_err(map_err(names::BLOCK_COUNTERS))?;
            let total: &mut BlockCounters = totals.entry(id).or_default();
            for c in per_cpu.iter() {
                total.connect += c.connect;
                total.sendmsg += c.sendmsg;
                total.egress += c.egress;
            }
        }
        Ok(totals)
    }
}

/// The ring buffer the programs send [`BlockEvent`]s through.
pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::EVENTS).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::EVENTS).map(Self)
    }

    /// The events waiting in the ring, oldest first (none past `limit`).
    pub fn drain(&mut self, limit: usize) -> Vec<BlockEvent> {
        let mut events = Vec::new();
        while events.len() < limit {
            let Some(item) = self.0.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<BlockEvent>() {
                // SAFETY: the programs write whole `BlockEvent`s; the read
                // is unaligned-safe.
                events
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<BlockEvent>()) });
            }
        }
        events
    }
}

impl std::os::fd::AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// How many events the programs could not send (rate limit, full ring).
pub struct DroppedEvents(PerCpuArray<MapData, u64>);

impl DroppedEvents {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::EVENTS_DROPPED).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::EVENTS_DROPPED).map(Self)
    }

    pub fn total(&self) -> Result<u64, BpfError> {
        let per_cpu = self.0.get(&0, 0).map_err(map_err(names::EVENTS_DROPPED))?;
        Ok(per_cpu.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of the log kernel 6.18 gave for the padding memset that
    /// CAP_PERFMON-less loaders were refused over.
    const REFUSED_MEMSET: &str = "\
1081: frame1: R1=ringbuf_mem(ref_obj_id=85,off=37,sz=48) R2=0 R3=7 R10=fp0 refs=85
; if self.start < self.end { @ range.rs:900
1081: (15) if r3 == 0x0 goto pc+6     ; frame1: R3=7 refs=85
1082: (b7) r4 = 0                     ; frame1: R4=0 refs=85
; unsafe { intrinsics::offset(self, count) } @ mut_ptr.rs:961
1083: (bf) r5 = r1                    ; frame1: R1=ringbuf_mem(ref_obj_id=85,off=37,sz=48) R5=ringbuf_mem(ref_obj_id=85,off=37,sz=48) refs=85
1084: (0f) r5 += r4
R5 has pointer with unsupported alu operation, pointer arithmetic with it prohibited for !root
verification time 3834 usec
stack depth 152+0
processed 924 insns (limit 1000000) max_states_per_insn 4 total_states 32 peak_states 32 mark_read 0
";

    #[test]
    fn verifier_logs_shrink_to_the_refusal() {
        let cases = [
            (
                REFUSED_MEMSET,
                Some("1084: (0f) r5 += r4"),
                vec![
                    "R5 has pointer with unsupported alu operation, pointer arithmetic with it \
                     prohibited for !root",
                ],
            ),
            (
                "0: (b7) r0 = 0 ; R0=0\n1: (95) exit\nR0 leaks addr as return value\n",
                Some("1: (95) exit"),
                vec!["R0 leaks addr as return value"],
            ),
            ("", None, vec![]),
            (
                "unknown func bpf_ringbuf_reserve#131\n",
                None,
                vec!["unknown func bpf_ringbuf_reserve#131"],
            ),
        ];
        for (log, instruction, lines) in cases {
            let summary = summarize_verifier_log(log);
            assert_eq!(summary.failing_instruction.as_deref(), instruction, "{log}");
            assert_eq!(summary.last_lines, lines, "{log}");
        }
    }

    #[test]
    fn refusal_message_names_program_instruction_and_reason_once() {
        let err = BpfError::ProgramRefused {
            name: names::PROG_EGRESS,
            errno: std::io::Error::from_raw_os_error(libc::EACCES),
            summary: summarize_verifier_log(REFUSED_MEMSET),
        }
        .to_string();
        assert!(err.contains("imds_guard_egress"), "{err}");
        assert!(err.contains("at instruction 1084: (0f) r5 += r4"), "{err}");
        assert_eq!(err.matches("prohibited for !root").count(), 1, "{err}");
        assert!(
            !err.contains("5.7"),
            "no hint unrelated to the failure: {err}"
        );
    }

    /// The programs' calls to compiler-builtins' memory functions: their
    /// byte loops need CAP_PERFMON to pass the verifier (enforcer-ebpf's
    /// `stores` module says how the programs avoid them).
    #[test]
    fn programs_call_no_memory_builtins() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];
        let file = object::File::parse(EBPF_OBJECT).expect("the eBPF object parses");
        let mut calls = Vec::new();
        for section in file.sections() {
            let section_name = section.name().unwrap_or_default();
            if section_name.starts_with(".debug") || section_name.starts_with(".BTF") {
                continue;
            }
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(index).expect("relocation symbol");
                let name = symbol.name().unwrap_or_default();
                if BUILTINS.contains(&name) {
                    calls.push(format!("{section_name}+{offset:#x} calls {name}"));
                }
            }
        }
        assert!(calls.is_empty(), "{calls:#?}");
    }

    /// The object defines exactly the maps and programs the contract names:
    /// pins, health and status go by those lists.
    #[test]
    fn the_object_defines_the_contracts_maps_and_programs() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the eBPF object parses");
        // Globals live in maps named after their sections (.rodata, .bss).
        let maps: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.'))
            .collect();
        assert_eq!(maps, BTreeSet::from(names::MAPS));
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        assert_eq!(programs, BTreeSet::from(names::PROGRAMS));
    }

    #[test]
    fn seccomp_mode_from_status() {
        assert!(seccomp_filtering(
            "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n"
        ));
        assert!(!seccomp_filtering("Seccomp:\t0\n"));
        assert!(!seccomp_filtering("Name:\tx\n"));
    }
}
