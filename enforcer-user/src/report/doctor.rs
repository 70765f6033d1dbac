//! `imds-guard doctor`: everything a start checks, and what the kernel
//! offers, judged line by line (ok, warn, fail, each problem with its fix)
//! before anything is loaded. [`gather`] reads the machine; [`judge`] is
//! pure, so every verdict is unit-tested from facts.

use std::path::{Path, PathBuf};

use aya::{
    maps::MapType,
    programs::{LsmAttachType, ProgramType},
};
use enforcer_common::mountinfo::{self, Mount};
use serde::Serialize;

use crate::{
    bpf::{edge::TcHook, loader},
    host::{
        kernel, memlock,
        preflight::{self, LsmFacts},
        privilege::{self, SeccompMode},
    },
};

/// The oldest kernel with `CAP_BPF` and the BPF ring buffer.
const OLDEST_KERNEL: (u32, u32) = (5, 8);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do, on every warn and fail.
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        check,
        level: Level::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn problem(
    check: &'static str,
    level: Level,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check,
        level,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// What the node is meant to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wants {
    /// The bpffs directory of the pins.
    pub pin_root: PathBuf,
    /// `refusePacketSockets`: the BPF LSM program.
    pub refuse_packet_sockets: bool,
}

/// A program or map type the kernel was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// What imds-guard uses it for.
    pub used_for: &'static str,
    /// Whether enforcement needs it (the rest are optional).
    pub required: bool,
    /// The kernel's answer, or why it could not be asked.
    pub supported: Result<bool, String>,
}

/// What the checks look at, read off the machine by [`gather`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub kernel: String,
    pub mounts: Vec<Mount>,
    /// This process's effective capabilities, if readable.
    pub effective: Option<u64>,
    pub seccomp: Option<SeccompMode>,
    /// A malformed `bpf()` call answered EPERM instead of EINVAL.
    pub bpf_refused: bool,
    pub kernel_btf: bool,
    pub active_lsms: Option<String>,
    /// `RLIMIT_MEMLOCK` (soft, hard), if readable.
    pub memlock_limits: Option<(u64, u64)>,
    /// What one generation's maps are charged on kernels before 5.11.
    pub memlock_need: u64,
    pub possible_cpus: u64,
    pub features: Vec<Feature>,
}

/// The program types imds-guard loads, and the kernel's netfilter links,
/// which it does not need: by name, use and whether enforcement needs it.
fn program_types() -> [(&'static str, &'static str, bool, ProgramType); 5] {
    [
        (
            "cgroup_skb",
            "drops denied packets on egress",
            true,
            ProgramType::CgroupSkb,
        ),
        (
            "cgroup_sock_addr",
            "refuses connect and sendmsg",
            true,
            ProgramType::CgroupSockAddr,
        ),
        (
            "sched_cls",
            "the node edge guard",
            true,
            ProgramType::SchedClassifier,
        ),
        (
            "lsm",
            "refusePacketSockets",
            false,
            ProgramType::Lsm(LsmAttachType::Mac),
        ),
        (
            "netfilter",
            "nothing (netfilter links)",
            false,
            ProgramType::Netfilter,
        ),
    ]
}

/// The map types of the eBPF object (a unit test checks the list against it).
const MAP_TYPES: [(&str, MapType); 7] = [
    ("hash", MapType::Hash),
    ("lru_hash", MapType::LruHash),
    ("lru_percpu_hash", MapType::LruPerCpuHash),
    ("lpm_trie", MapType::LpmTrie),
    ("array", MapType::Array),
    ("percpu_array", MapType::PerCpuArray),
    ("ringbuf", MapType::RingBuf),
];

/// An error and its causes, on one line (aya's syscall errors keep the
/// errno in their source).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// Asks the kernel about each program and map type (loading a trivial
/// program or creating a one-entry map, as libbpf's probes do). The LSM
/// probe reads the kernel's whole BTF, seconds on a small or emulated
/// machine: it is asked only when `refusePacketSockets` is.
fn probe_features(wants: &Wants) -> Vec<Feature> {
    let programs = program_types()
        .into_iter()
        .filter(|(name, ..)| *name != "lsm" || wants.refuse_packet_sockets)
        .map(|(name, used_for, required, program)| Feature {
            name,
            used_for,
            required,
            supported: aya::sys::is_program_supported(program).map_err(|e| with_causes(&e)),
        });
    let maps = MAP_TYPES.into_iter().map(|(name, map)| Feature {
        name,
        used_for: "the object's maps",
        required: true,
        supported: aya::sys::is_map_supported(map).map_err(|e| with_causes(&e)),
    });
    programs.chain(maps).collect()
}

/// Reads everything [`judge`] looks at from this process and machine.
pub fn gather(wants: &Wants) -> Facts {
    let possible_cpus = kernel::possible_cpus();
    let release = kernel::release();
    let memlock_limits = memlock::current_limit().ok();
    let memlock_need = loader::memlock_need(possible_cpus).unwrap_or(0);
    // The probes create maps and programs, which kernels before 5.11
    // charge to the memlock limit: raised first as a start raises it (the
    // memlock line judges the limit as it was).
    let _ = loader::ensure_memlock();
    Facts {
        kernel: release,
        mounts: mountinfo::parse(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        ),
        effective: privilege::effective().ok(),
        seccomp: privilege::seccomp_mode(),
        bpf_refused: privilege::bpf_syscall_refused(),
        kernel_btf: Path::new(preflight::KERNEL_BTF).exists(),
        active_lsms: preflight::active_lsms(),
        memlock_limits,
        memlock_need,
        possible_cpus,
        features: probe_features(wants),
    }
}

/// Every check, in the order a reader fixes them.
pub fn judge(wants: &Wants, facts: &Facts) -> Vec<Finding> {
    vec![
        kernel_version(facts),
        cgroups(facts),
        bpffs(wants, facts),
        capabilities(facts),
        seccomp(facts),
        memlock_limit(facts),
        kernel_features(facts),
        tc_hook(facts),
        btf(wants, facts),
        lsm(wants, facts),
        packet_sockets(wants, facts),
    ]
}

fn kernel_version(facts: &Facts) -> Finding {
    match kernel::version(&facts.kernel) {
        Some(version) if version >= OLDEST_KERNEL => {
            ok("kernel", format!("Linux {}", facts.kernel))
        }
        _ => problem(
            "kernel",
            Level::Fail,
            format!(
                "Linux {}: imds-guard needs 5.8 or newer (CAP_BPF, the BPF ring buffer)",
                facts.kernel
            ),
            "run a newer kernel: 5.10 is the oldest tested",
        ),
    }
}

fn cgroups(facts: &Facts) -> Finding {
    if let Err(err) = preflight::check_cgroups(&facts.mounts, &facts.kernel) {
        let fix = match err {
            preflight::PreflightError::NetClsOnOldKernel { .. } => {
                "unmount the net_cls and net_prio v1 controllers, or run Linux 5.15 or newer"
            }
            _ => "boot with the cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1)",
        };
        return problem("cgroup", Level::Fail, err.to_string(), fix);
    }
    let cgroup2 = facts
        .mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map_or_else(String::new, |m| m.point.display().to_string());
    if facts.mounts.iter().any(|m| m.fstype == "cgroup") {
        problem(
            "cgroup",
            Level::Warn,
            format!("hybrid: cgroup v2 at {cgroup2}, beside cgroup v1 controllers"),
            "in Kubernetes, use deploy/overlays/hybrid-cgroups, which mounts that \
             hierarchy read-only all the way down",
        )
    } else {
        ok("cgroup", format!("cgroup v2 (unified) at {cgroup2}"))
    }
}

fn bpffs(wants: &Wants, facts: &Facts) -> Finding {
    match preflight::check_bpffs(&facts.mounts, &wants.pin_root) {
        Ok(()) => ok("bpffs", format!("{} is on bpffs", wants.pin_root.display())),
        Err(err) => problem(
            "bpffs",
            Level::Fail,
            err.to_string(),
            "mount -t bpf bpf /sys/fs/bpf (a DaemonSet mounts the host's /sys/fs/bpf), \
             or point --bpffs-dir at a bpffs directory",
        ),
    }
}

/// The deciding capabilities held and not held, as one line.
fn capability_list(effective: u64) -> String {
    let (held, absent): (Vec<_>, Vec<_>) = privilege::DECIDING
        .iter()
        .partition(|(cap, _)| privilege::holds(effective, *cap));
    let names = |caps: Vec<&(u32, &str)>| {
        caps.iter()
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (held.is_empty(), absent.is_empty()) {
        (true, _) => format!("none of {}", names(absent)),
        (false, true) => format!("has {}", names(held)),
        (false, false) => format!("has {}; not {}", names(held), names(absent)),
    }
}

fn capabilities(facts: &Facts) -> Finding {
    let Some(effective) = facts.effective else {
        return problem(
            "capabilities",
            Level::Fail,
            "cannot read this process's capabilities (/proc/self/status)",
            "run doctor where /proc is mounted",
        );
    };
    let missing = privilege::missing_capabilities(effective);
    let held = capability_list(effective);
    if missing.is_empty() {
        ok("capabilities", held)
    } else {
        problem(
            "capabilities",
            Level::Fail,
            format!("{held}: missing {}", missing.join(" and ")),
            "add CAP_BPF and CAP_NET_ADMIN (securityContext.capabilities.add, as \
             deploy/base does), or run as root",
        )
    }
}

fn seccomp(facts: &Facts) -> Finding {
    let filtered = facts.seccomp == Some(SeccompMode::Filter);
    // Before 6.5 the kernel itself refuses every command without CAP_BPF
    // (or CAP_SYS_ADMIN) while unprivileged BPF is off; from 6.5 an EPERM
    // for an unknown command is never the kernel's.
    let may_ask = facts.effective.is_some_and(privilege::bpf_capable)
        || kernel::version(&facts.kernel).is_some_and(|v| v >= (6, 5));
    if facts.bpf_refused && may_ask {
        return problem(
            "seccomp",
            Level::Fail,
            format!(
                "mode {}: bpf() is refused before the kernel reads it",
                seccomp_name(facts.seccomp)
            ),
            privilege::bpf_refusal_cause(filtered),
        );
    }
    if facts.bpf_refused {
        return problem(
            "seccomp",
            Level::Warn,
            format!(
                "mode {}: bpf() is refused, and without CAP_BPF that may be the kernel",
                seccomp_name(facts.seccomp)
            ),
            "run doctor with the daemon's capabilities to tell",
        );
    }
    let detail = if filtered {
        "a filter is installed, and it lets bpf() through"
    } else {
        "no filter: bpf() reaches the kernel"
    };
    ok(
        "seccomp",
        format!("mode {}: {detail}", seccomp_name(facts.seccomp)),
    )
}

fn seccomp_name(mode: Option<SeccompMode>) -> &'static str {
    mode.map_or("unknown", SeccompMode::name)
}

fn memlock_limit(facts: &Facts) -> Finding {
    let limits = facts.memlock_limits.unwrap_or((0, 0));
    let may_raise = facts
        .effective
        .is_some_and(|caps| privilege::holds(caps, privilege::CAP_SYS_RESOURCE));
    let need = memlock::human(facts.memlock_need);
    match memlock::plan(
        &facts.kernel,
        facts.memlock_need,
        facts.possible_cpus,
        limits,
        may_raise,
    ) {
        Ok(memlock::Memlock::NotCharged) => ok(
            "memlock",
            "not charged: from Linux 5.11 maps are charged to memory cgroups",
        ),
        Ok(memlock::Memlock::Enough { limit, .. }) if limit == limits.0 => ok(
            "memlock",
            format!(
                "the maps need about {need}; this process may lock {}",
                memlock::human(limit)
            ),
        ),
        Ok(memlock::Memlock::Enough { limit, .. }) => ok(
            "memlock",
            format!(
                "the maps need about {need}; the start raises the limit from {} to {}",
                memlock::human(limits.0),
                memlock::human(limit)
            ),
        ),
        Err(memlock::MemlockError::TooLow { limit, .. }) => problem(
            "memlock",
            Level::Fail,
            format!(
                "Linux {} charges BPF maps to RLIMIT_MEMLOCK: they need about {need} with {} \
                 possible CPUs; this process may lock {} and cannot raise it",
                facts.kernel,
                facts.possible_cpus,
                memlock::human(limit)
            ),
            format!(
                "grant CAP_SYS_RESOURCE (deploy/overlays/kernel-5.10), or raise the \
                 memlock limit to at least {need}"
            ),
        ),
    }
}

fn kernel_features(facts: &Facts) -> Finding {
    let wanted = |f: &&Feature| f.required;
    let missing: Vec<String> = facts
        .features
        .iter()
        .filter(wanted)
        .filter(|f| f.supported == Ok(false))
        .map(|f| format!("{} ({})", f.name, f.used_for))
        .collect();
    let unknown: Vec<String> = facts
        .features
        .iter()
        .filter(wanted)
        .filter_map(|f| {
            f.supported
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", f.name))
        })
        .collect();
    let offered: Vec<&str> = facts
        .features
        .iter()
        .filter(|f| f.supported == Ok(true))
        .map(|f| f.name)
        .collect();
    if !missing.is_empty() {
        problem(
            "bpf features",
            Level::Fail,
            format!("the kernel lacks {}", missing.join(", ")),
            "run a kernel built with them (Debian's, Ubuntu's and the clouds' images are)",
        )
    } else if !unknown.is_empty() {
        let fix = if memlock::charges(&facts.kernel) {
            "run doctor with the daemon's capabilities (CAP_BPF); on this kernel a memlock \
             limit too low for the probes refuses them too (the memlock line)"
        } else {
            "run doctor with the daemon's capabilities (CAP_BPF)"
        };
        problem(
            "bpf features",
            Level::Warn,
            format!("could not ask the kernel about {}", unknown.join("; ")),
            fix,
        )
    } else {
        let not_offered: Vec<String> = facts
            .features
            .iter()
            .filter(|f| f.supported == Ok(false))
            .map(|f| format!("{} ({})", f.name, f.used_for))
            .collect();
        let detail = if not_offered.is_empty() {
            format!("offered: {}", offered.join(", "))
        } else {
            format!(
                "offered: {}; not offered: {}",
                offered.join(", "),
                not_offered.join(", ")
            )
        };
        ok("bpf features", detail)
    }
}

fn tc_hook(facts: &Facts) -> Finding {
    ok(
        "tc hook",
        match TcHook::of_kernel(&facts.kernel) {
            TcHook::Tcx => {
                "tcx links (Linux 6.6+): the node edge guard is placed first \
                            in the chain, and its links are pinned"
            }
            TcHook::Clsact => {
                "clsact filters (before Linux 6.6): the node edge guard \
                               adds its filters to the interfaces' clsact qdiscs"
            }
        },
    )
}

impl Wants {
    /// How much a missing piece of the BPF LSM weighs: a fail where
    /// refusePacketSockets is wanted, a warn otherwise.
    fn lsm_need(&self) -> Level {
        if self.refuse_packet_sockets {
            Level::Fail
        } else {
            Level::Warn
        }
    }
}

fn btf(wants: &Wants, facts: &Facts) -> Finding {
    if facts.kernel_btf {
        return ok("btf", format!("{} is present", preflight::KERNEL_BTF));
    }
    problem(
        "btf",
        wants.lsm_need(),
        format!(
            "no {}: BPF LSM programs (refusePacketSockets) cannot load",
            preflight::KERNEL_BTF
        ),
        "a kernel built with CONFIG_DEBUG_INFO_BTF, as most distributions' are",
    )
}

fn lsm(wants: &Wants, facts: &Facts) -> Finding {
    let fix = "add bpf to lsm= on the kernel command line (e.g. lsm=lockdown,yama,apparmor,bpf)";
    match &facts.active_lsms {
        Some(active) if preflight::bpf_lsm_listed(active) => ok("lsm", format!("active: {active}")),
        Some(active) => problem(
            "lsm",
            wants.lsm_need(),
            format!("active: {active}; without bpf, packet sockets cannot be refused"),
            fix,
        ),
        None => problem(
            "lsm",
            Level::Warn,
            "cannot tell which security modules are active (no securityfs, no lsm=)",
            format!("mount securityfs at /sys/kernel/security, or {fix}"),
        ),
    }
}

fn packet_sockets(wants: &Wants, facts: &Facts) -> Finding {
    let lsm_facts = LsmFacts {
        effective: facts.effective.unwrap_or(0),
        kernel: facts.kernel.clone(),
        kernel_btf: facts.kernel_btf,
        active_lsms: facts.active_lsms.clone(),
    };
    let fix = "use deploy/overlays/packet-socket-lsm on a node booted with lsm=...,bpf, \
               or turn refusePacketSockets off";
    // The probe loads and attaches an LSM program: some kernels (arm64
    // before 6.4) load one but cannot attach it.
    let probed = facts
        .features
        .iter()
        .find(|f| f.name == "lsm")
        .map(|f| f.supported.clone());
    match (wants.refuse_packet_sockets, lsm_facts.check()) {
        (true, Ok(true)) if probed == Some(Ok(false)) => problem(
            "packet sockets",
            Level::Fail,
            "the kernel refuses to attach BPF LSM programs (the lsm probe), though the bpf \
             LSM is active",
            fix,
        ),
        (true, Ok(true)) if matches!(probed, Some(Err(_))) => problem(
            "packet sockets",
            Level::Warn,
            "refusePacketSockets: the kernel could not be asked whether it attaches BPF LSM \
             programs",
            fix,
        ),
        (true, Ok(true)) => ok("packet sockets", "refusePacketSockets can be enforced here"),
        (true, Ok(false)) => problem(
            "packet sockets",
            Level::Warn,
            "refusePacketSockets: cannot tell whether the bpf LSM is active",
            fix,
        ),
        (true, Err(err)) => problem("packet sockets", Level::Fail, err.to_string(), fix),
        (false, can) => ok(
            "packet sockets",
            format!(
                "refusePacketSockets off: hostNetwork pods' AF_PACKET frames with \
                 PACKET_QDISC_BYPASS and AF_XDP stay open; {}",
                match can {
                    Ok(true) => "this node could turn it on".to_owned(),
                    Ok(false) => "whether this node could is unknown".to_owned(),
                    Err(err) => format!("this node could not: {err}"),
                }
            ),
        ),
    }
}

/// Whether any check failed (the command then exits non-zero).
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Fail)
}

/// The report as text: one line a check, each fix under its line.
pub fn render(findings: &[Finding]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    // Writing to a String cannot fail.
    for finding in findings {
        let _ = writeln!(
            text,
            "{:<5} {:<15} {}",
            finding.level.label(),
            finding.check,
            finding.detail
        );
        if let Some(fix) = &finding.fix {
            let _ = writeln!(text, "{:<21} fix: {fix}", "");
        }
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let _ = writeln!(
        text,
        "{} ok, {} warn, {} fail",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::preflight::tests::mount;

    const DAEMONSET: u64 = (1 << privilege::CAP_BPF) | (1 << privilege::CAP_NET_ADMIN);

    fn supported(name: &'static str) -> Feature {
        Feature {
            name,
            used_for: "the object's maps",
            required: true,
            supported: Ok(true),
        }
    }

    /// A 6.12 node running the base DaemonSet: everything fine but the
    /// bpf LSM, which the node does not boot with.
    fn node() -> Facts {
        Facts {
            kernel: "6.12.117+deb13-amd64".to_owned(),
            mounts: vec![
                mount("/", "ext4", "rw"),
                mount("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate"),
                mount("/sys/fs/bpf", "bpf", "rw"),
            ],
            effective: Some(DAEMONSET),
            seccomp: Some(SeccompMode::Filter),
            bpf_refused: false,
            kernel_btf: true,
            active_lsms: Some("lockdown,capability,landlock,yama,apparmor".to_owned()),
            memlock_limits: Some((64 << 10, 64 << 10)),
            memlock_need: 10 << 20,
            possible_cpus: 2,
            features: MAP_TYPES.iter().map(|(name, _)| supported(name)).collect(),
        }
    }

    fn wants() -> Wants {
        Wants {
            pin_root: "/sys/fs/bpf/imds-guard".into(),
            refuse_packet_sockets: false,
        }
    }

    /// The level of `check`, and whether its line (detail and fix) says `says`.
    fn level_of(findings: &[Finding], check: &str, says: &str) -> Level {
        let finding = findings
            .iter()
            .find(|f| f.check == check)
            .unwrap_or_else(|| panic!("no {check} in {findings:?}"));
        let line = format!(
            "{} {}",
            finding.detail,
            finding.fix.as_deref().unwrap_or("")
        );
        assert!(line.contains(says), "{check}: {says:?} not in {line:?}");
        finding.level
    }

    #[test]
    fn a_daemonset_node_passes_and_says_what_it_lacks() {
        let findings = judge(&wants(), &node());
        assert!(!failed(&findings), "{}", render(&findings));
        assert_eq!(level_of(&findings, "lsm", "add bpf to lsm="), Level::Warn);
        assert_eq!(
            level_of(
                &findings,
                "capabilities",
                "has CAP_BPF, CAP_NET_ADMIN; not CAP_PERFMON"
            ),
            Level::Ok
        );
        assert_eq!(level_of(&findings, "memlock", "not charged"), Level::Ok);
        assert_eq!(level_of(&findings, "tc hook", "tcx"), Level::Ok);
        assert_eq!(
            level_of(
                &findings,
                "packet sockets",
                "could not: refusePacketSockets needs CAP_PERFMON"
            ),
            Level::Ok
        );
    }

    /// A case's name, whether refusePacketSockets is wanted, what it
    /// changes of a good node, the check that must fail and what its line
    /// must say.
    type Case = (
        &'static str,
        bool,
        fn(&mut Facts),
        &'static str,
        &'static str,
    );

    const PROBLEMS: [Case; 10] = [
        (
            "5.4",
            false,
            |f| {
                f.kernel = "5.4.0-150-generic".to_owned();
                f.memlock_limits = Some((libc::RLIM_INFINITY, libc::RLIM_INFINITY));
            },
            "kernel",
            "needs 5.8 or newer",
        ),
        (
            "v1 only",
            false,
            |f| {
                f.mounts = vec![
                    mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
                    mount("/sys/fs/bpf", "bpf", "rw"),
                ];
            },
            "cgroup",
            "cgroup v1 only",
        ),
        (
            "no bpffs",
            false,
            |f| {
                f.mounts = vec![
                    mount("/", "ext4", "rw"),
                    mount("/sys/fs/cgroup", "cgroup2", "rw"),
                ];
            },
            "bpffs",
            "mount -t bpf bpf /sys/fs/bpf",
        ),
        (
            "no CAP_BPF",
            false,
            |f| f.effective = Some(1 << privilege::CAP_NET_ADMIN),
            "capabilities",
            "missing CAP_BPF",
        ),
        (
            "a seccomp profile without bpf",
            false,
            |f| f.bpf_refused = true,
            "seccomp",
            "Localhost profile that allows bpf",
        ),
        (
            "5.10 with the base DaemonSet",
            false,
            |f| f.kernel = "5.10.0-32-amd64".to_owned(),
            "memlock",
            "deploy/overlays/kernel-5.10",
        ),
        (
            "no LPM trie",
            false,
            |f| {
                f.features = vec![Feature {
                    supported: Ok(false),
                    ..supported("lpm_trie")
                }];
            },
            "bpf features",
            "lacks lpm_trie",
        ),
        (
            "refusePacketSockets without PERFMON",
            true,
            |f| {
                f.active_lsms = Some("lockdown,capability,bpf".to_owned());
            },
            "packet sockets",
            "refusePacketSockets needs CAP_PERFMON",
        ),
        (
            "refusePacketSockets without the bpf LSM",
            true,
            |f| {
                f.effective = Some(DAEMONSET | (1 << privilege::CAP_PERFMON));
            },
            "lsm",
            "add bpf to lsm=",
        ),
        (
            "refusePacketSockets without BTF",
            true,
            |f| {
                f.effective = Some(DAEMONSET | (1 << privilege::CAP_PERFMON));
                f.active_lsms = Some("lockdown,capability,bpf".to_owned());
                f.kernel_btf = false;
            },
            "btf",
            "CONFIG_DEBUG_INFO_BTF",
        ),
    ];

    #[test]
    fn each_problem_fails_its_own_check_with_its_fix() {
        for (name, refuse_packet_sockets, change, check, says) in PROBLEMS {
            let wants = Wants {
                refuse_packet_sockets,
                ..wants()
            };
            let mut facts = node();
            change(&mut facts);
            let findings = judge(&wants, &facts);
            assert_eq!(level_of(&findings, check, says), Level::Fail, "{name}");
            let others: Vec<&Finding> = findings
                .iter()
                .filter(|f| f.level == Level::Fail && f.check != check)
                .filter(|f| !(refuse_packet_sockets && f.check == "packet sockets"))
                .collect();
            assert!(others.is_empty(), "{name}: only {check} fails: {others:?}");
        }
    }

    #[test]
    fn refuse_packet_sockets_passes_with_the_overlay_on_a_bpf_lsm_node() {
        let overlay = Facts {
            effective: Some(DAEMONSET | (1 << privilege::CAP_PERFMON)),
            active_lsms: Some("lockdown,capability,bpf".to_owned()),
            ..node()
        };
        let wanted = Wants {
            refuse_packet_sockets: true,
            ..wants()
        };
        let findings = judge(&wanted, &overlay);
        assert!(!failed(&findings), "{}", render(&findings));
        assert_eq!(
            level_of(&findings, "packet sockets", "can be enforced"),
            Level::Ok
        );
    }

    #[test]
    fn a_kernel_that_cannot_attach_lsm_programs_fails_refuse_packet_sockets() {
        let mut arm64_6_1 = Facts {
            kernel: "6.1.0-50-arm64".to_owned(),
            effective: Some(DAEMONSET | (1 << privilege::CAP_PERFMON)),
            active_lsms: Some("lockdown,capability,bpf".to_owned()),
            ..node()
        };
        arm64_6_1.features.push(Feature {
            name: "lsm",
            used_for: "refusePacketSockets",
            required: false,
            supported: Ok(false),
        });
        let wanted = Wants {
            refuse_packet_sockets: true,
            ..wants()
        };
        let findings = judge(&wanted, &arm64_6_1);
        assert_eq!(
            level_of(
                &findings,
                "packet sockets",
                "refuses to attach BPF LSM programs"
            ),
            Level::Fail
        );
        // Not asked for, the same node is fine.
        assert!(!failed(&judge(&wants(), &arm64_6_1)));
    }

    #[test]
    fn hybrid_hosts_warn_and_5_10_with_the_overlay_passes() {
        let hybrid = Facts {
            mounts: vec![
                mount("/sys/fs/cgroup/unified", "cgroup2", "rw"),
                mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
                mount("/sys/fs/bpf", "bpf", "rw"),
            ],
            ..node()
        };
        let findings = judge(&wants(), &hybrid);
        assert_eq!(
            level_of(&findings, "cgroup", "deploy/overlays/hybrid-cgroups"),
            Level::Warn
        );
        let overlay = Facts {
            kernel: "5.10.0-32-amd64".to_owned(),
            effective: Some(DAEMONSET | (1 << privilege::CAP_SYS_RESOURCE)),
            ..node()
        };
        let findings = judge(&wants(), &overlay);
        assert_eq!(
            level_of(
                &findings,
                "memlock",
                "raises the limit from 64 KiB to unlimited"
            ),
            Level::Ok
        );
        assert_eq!(level_of(&findings, "tc hook", "clsact"), Level::Ok);
        assert!(!failed(&findings), "{}", render(&findings));
    }

    #[test]
    fn probed_map_types_are_the_objects() {
        let probed: std::collections::BTreeSet<u32> =
            MAP_TYPES.iter().map(|(_, map)| *map as u32).collect();
        let used: std::collections::BTreeSet<u32> = memlock::shapes(loader::object())
            .expect("our object parses")
            .iter()
            .map(|shape| shape.map_type)
            .collect();
        assert_eq!(probed, used);
    }

    #[test]
    fn text_puts_each_fix_under_its_line_and_counts() {
        let findings = judge(
            &wants(),
            &Facts {
                effective: Some(0),
                ..node()
            },
        );
        let text = render(&findings);
        assert!(
            text.contains("fail  capabilities    none of CAP_BPF"),
            "{text}"
        );
        assert!(
            text.contains("fix: add CAP_BPF and CAP_NET_ADMIN"),
            "{text}"
        );
        assert!(text.ends_with("9 ok, 1 warn, 1 fail\n"), "{text}");
    }
}
