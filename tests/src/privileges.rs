//! The privileges the daemon under test runs with. By default exactly what
//! `deploy/base/daemonset.yaml` grants: uid 0 with only CAP_BPF and
//! CAP_NET_ADMIN (bounding set), `no_new_privs`, and a 64 KiB `RLIMIT_MEMLOCK`
//! (what a container runtime without a memlock setting hands out). A test
//! that passes this way proves the shipped grant is enough; full root
//! proves only that root is.
//!
//! `IMDS_GUARD_TEST_CAPS` overrides the capabilities: `all` (plain root), or
//! a comma list of names (`bpf,net_admin,sys_resource`, as the kernel-5.10
//! overlay grants). `IMDS_GUARD_TEST_MEMLOCK` overrides the limit in bytes,
//! or `unlimited`.

use std::os::unix::process::CommandExt as _;

use crate::{Result, SandboxError};

/// The capabilities the base DaemonSet adds (tests/manifests.rs checks
/// that the manifest says the same).
pub const DAEMONSET_CAPABILITIES: [&str; 2] = ["BPF", "NET_ADMIN"];

/// `RLIMIT_MEMLOCK` under a container runtime that sets none: the kernel's
/// default of 64 KiB (systemd before 253 hands out the same).
pub const DEFAULT_MEMLOCK_BYTES: u64 = 64 * 1024;

/// Capability numbers (linux/capability.h) of the names tests use.
const CAPABILITY_NUMBERS: [(&str, u32); 8] = [
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("NET_RAW", 13),
    ("NET_ADMIN", 12),
    ("SYS_ADMIN", 21),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// The highest capability number kernels of the matrix know (`CAP_CHECKPOINT_RESTORE`).
const LAST_CAPABILITY: u32 = 40;

/// How the daemon is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// `None`: every capability root has. `Some`: only these numbers.
    pub capabilities: Option<Vec<u32>>,
    /// `RLIMIT_MEMLOCK` (soft and hard); `None` leaves it as inherited.
    pub memlock_bytes: Option<u64>,
    /// `bpf()` calls a seccomp filter refuses with EPERM, as a runtime's
    /// profile would.
    pub bpf_filter: BpfFilter,
}

/// Which `bpf()` calls the daemon's seccomp filter refuses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BpfFilter {
    /// No filter.
    #[default]
    None,
    /// Every call, as a profile without the `bpf` rule does.
    RefuseAll,
    /// These commands only, to make a start fail part-way (after its maps
    /// exist): `BPF_LINK_CREATE` and `BPF_PROG_ATTACH` fail the attach.
    Refuse(Vec<u32>),
}

/// `enum bpf_cmd` values.
pub const BPF_PROG_ATTACH: u32 = 8;
pub const BPF_LINK_CREATE: u32 = 28;

impl Privileges {
    /// What the base DaemonSet grants.
    pub fn daemonset() -> Privileges {
        Privileges::named(&DAEMONSET_CAPABILITIES).expect("known capability names")
    }

    /// Plain root: every capability, the inherited memlock limit.
    pub fn root() -> Privileges {
        Privileges {
            capabilities: None,
            memlock_bytes: None,
            bpf_filter: BpfFilter::None,
        }
    }

    /// Only the named capabilities (`BPF`, `net_admin`, `CAP_SYS_RESOURCE`).
    pub fn named(names: &[&str]) -> Result<Privileges> {
        let capabilities = names
            .iter()
            .map(|name| capability_number(name))
            .collect::<Result<Vec<u32>>>()?;
        Ok(Privileges {
            capabilities: Some(capabilities),
            memlock_bytes: Some(DEFAULT_MEMLOCK_BYTES),
            bpf_filter: BpfFilter::None,
        })
    }

    /// From `IMDS_GUARD_TEST_CAPS` and `IMDS_GUARD_TEST_MEMLOCK`, else the DaemonSet's.
    pub fn from_env() -> Result<Privileges> {
        let mut privileges = match std::env::var("IMDS_GUARD_TEST_CAPS") {
            Ok(caps) if caps == "all" => Privileges::root(),
            Ok(caps) => {
                let names: Vec<&str> = caps.split(',').map(str::trim).collect();
                Privileges::named(&names)?
            }
            Err(_) => Privileges::daemonset(),
        };
        if let Ok(memlock) = std::env::var("IMDS_GUARD_TEST_MEMLOCK") {
            privileges.memlock_bytes = match memlock.as_str() {
                "unlimited" => Some(libc::RLIM_INFINITY),
                bytes => Some(bytes.parse().map_err(|_| {
                    SandboxError::Process(format!(
                        "IMDS_GUARD_TEST_MEMLOCK={bytes:?} is not a number"
                    ))
                })?),
            };
        }
        Ok(privileges)
    }

    /// Makes `command` exec with these privileges: the memlock limit, the
    /// capability bounding set (a uid-0 exec gets exactly the bounding set),
    /// and `no_new_privs`, as the DaemonSet's allowPrivilegeEscalation: false.
    pub fn apply(&self, command: &mut std::process::Command) {
        let capabilities = self.capabilities.clone();
        let memlock = self.memlock_bytes;
        let filter = match &self.bpf_filter {
            BpfFilter::None => None,
            BpfFilter::RefuseAll => Some(bpf_command_filter(None)),
            BpfFilter::Refuse(commands) => Some(bpf_command_filter(Some(commands))),
        };
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                if let Some(bytes) = memlock {
                    set_memlock(bytes)?;
                }
                if let Some(capabilities) = &capabilities {
                    drop_bounding_set_except(capabilities)?;
                }
                if capabilities.is_some() || filter.is_some() {
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                }
                if let Some(filter) = &filter {
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "a filter of a few dozen instructions, the kernel takes 4096"
                    )]
                    let program = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_ptr().cast_mut(),
                    };
                    check(libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &raw const program,
                    ))?;
                }
                Ok(())
            });
        }
    }
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Drops every capability but `keep` from the bounding set: a uid-0 exec
/// then gets exactly `keep`.
fn drop_bounding_set_except(keep: &[u32]) -> std::io::Result<()> {
    for cap in (0..=LAST_CAPABILITY).filter(|cap| !keep.contains(cap)) {
        // SAFETY: a plain prctl.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        // EINVAL: a capability this kernel does not know.
        if ret != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A classic-BPF seccomp program: `bpf(cmd, ...)` with `cmd` in `refused`
/// (every `cmd` when `None`) fails with EPERM, everything else is allowed
/// (`x86_64` only; any other architecture is killed, as runtimes' profiles do).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "libc's classic BPF opcodes are u32 but fit sock_filter's u16; EPERM and the \
              syscall number are small positives"
)]
fn bpf_command_filter(refused: Option<&[u32]>) -> Vec<libc::sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0: u32 = 16;
    let statement = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump_eq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = |offset| statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let ret = |value| statement(libc::BPF_RET | libc::BPF_K, value);
    let refuse = ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    let mut program = vec![
        load(ARCH),
        jump_eq(AUDIT_ARCH_X86_64, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        load(NR),
        jump_eq(libc::SYS_bpf as u32, 1, 0),
        ret(libc::SECCOMP_RET_ALLOW),
    ];
    let Some(commands) = refused else {
        program.push(refuse);
        return program;
    };
    program.push(load(ARG0));
    for &command in commands {
        program.push(jump_eq(command, 0, 1));
        program.push(refuse);
    }
    program.push(ret(libc::SECCOMP_RET_ALLOW));
    program
}

fn set_memlock(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: a plain system call on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The number of a capability name, with or without `CAP_`, any case.
pub fn capability_number(name: &str) -> Result<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITY_NUMBERS
        .iter()
        .find(|(known, _)| *known == bare)
        .map(|&(_, number)| number)
        .ok_or_else(|| SandboxError::Process(format!("unknown capability {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_numbers() {
        assert_eq!(capability_number("BPF").unwrap(), 39);
        assert_eq!(capability_number("cap_net_admin").unwrap(), 12);
        assert_eq!(capability_number("sys_resource").unwrap(), 24);
        assert!(capability_number("FLY").is_err());
        assert_eq!(
            Privileges::daemonset().capabilities,
            Some(vec![39, 12]),
            "BPF and NET_ADMIN"
        );
    }
}
