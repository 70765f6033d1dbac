//! Naming the capabilities imds-guard lacks before the kernel refuses with a
//! bare EPERM.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no CapEff line")]
    NoCapEff { path: PathBuf },
    #[error(
        "missing capabilities: {}. imds-guard needs CAP_BPF (to create maps and load \
         programs) and CAP_NET_ADMIN (to attach cgroup network programs): add them \
         (securityContext.capabilities.add in a pod) or run as root",
        missing.join(", ")
    )]
    Missing { missing: Vec<&'static str> },
}

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The capabilities that decide what imds-guard can do, by name: the two it
/// needs, and those an overlay adds (`CAP_SYS_RESOURCE` for 5.10's memlock,
/// `CAP_PERFMON` for the BPF LSM), and `CAP_SYS_ADMIN`, which implies all.
pub const DECIDING: [(u32, &str); 5] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
];

/// Whether `cap` is in the set `effective`.
pub fn holds(effective: u64, cap: u32) -> bool {
    effective & (1u64 << cap) != 0
}

/// Whether `effective` may create maps and load programs: `CAP_BPF`, or
/// `CAP_SYS_ADMIN`, which implies it.
pub fn bpf_capable(effective: u64) -> bool {
    holds(effective, CAP_BPF) || holds(effective, CAP_SYS_ADMIN)
}

/// The capabilities absent from an effective set (`CapEff` of
/// /proc/self/status): `CAP_BPF` (or `CAP_SYS_ADMIN`, which implies it) to create
/// maps and load programs, and `CAP_NET_ADMIN` to load and attach cgroup
/// networking programs.
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !bpf_capable(effective) {
        missing.push("CAP_BPF");
    }
    if !holds(effective, CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Parses the effective capability set out of /proc/PID/status text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// This process's effective capabilities.
pub fn effective() -> Result<u64, PrivilegeError> {
    let path = PathBuf::from("/proc/self/status");
    let status = std::fs::read_to_string(&path).map_err(|source| PrivilegeError::Read {
        path: path.clone(),
        source,
    })?;
    effective_capabilities(&status).ok_or(PrivilegeError::NoCapEff { path })
}

/// Fails, naming what is missing, unless this process may load and attach.
pub fn check() -> Result<(), PrivilegeError> {
    let missing = missing_capabilities(effective()?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing { missing })
    }
}

/// A process's seccomp mode (`Seccomp:` of /proc/PID/status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    Disabled,
    Strict,
    Filter,
}

impl SeccompMode {
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::Disabled => "disabled",
            SeccompMode::Strict => "strict",
            SeccompMode::Filter => "filter",
        }
    }
}

/// Parses the seccomp mode out of /proc/PID/status text.
pub fn seccomp_mode_in(status: &str) -> Option<SeccompMode> {
    match status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))?
        .trim()
    {
        "0" => Some(SeccompMode::Disabled),
        "1" => Some(SeccompMode::Strict),
        "2" => Some(SeccompMode::Filter),
        _ => None,
    }
}

/// This process's seccomp mode, if the kernel says.
pub fn seccomp_mode() -> Option<SeccompMode> {
    seccomp_mode_in(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Whether a `bpf()` call the kernel would reject as malformed (EINVAL) is
/// refused with EPERM instead: then something in front of the kernel, a
/// seccomp filter or a security module, refuses every `bpf()` call. Only
/// meaningful with `CAP_BPF`: kernels before 6.5 refuse every command
/// with EPERM to a process without it when unprivileged BPF is off.
pub fn bpf_syscall_refused() -> bool {
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

/// What refuses `bpf()` and the fix, told by whether a seccomp filter is
/// installed.
pub fn bpf_refusal_cause(seccomp_filter: bool) -> &'static str {
    if seccomp_filter {
        "this process's seccomp filter refuses the bpf system call. The container \
         runtime's profile must allow bpf for a process with CAP_BPF (containerd's \
         default profile does from 1.7 and 1.6.13, Docker's from 23.0); CRI-O's \
         default allows it only with CAP_SYS_ADMIN: use a Localhost profile that \
         allows bpf"
    } else {
        "something refuses the bpf system call before the kernel reads it (a \
         security module such as SELinux or Lockdown)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        let root = 0x0000_01ff_ffff_ffff;
        let docker_default = 0x0000_0000_a804_25fb; // no SYS_ADMIN, NET_ADMIN, BPF
        let bpf_agent = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN);
        let cases: [(u64, &[&str]); 5] = [
            (root, &[]),
            (bpf_agent, &[]),
            ((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN), &[]),
            (docker_default, &["CAP_BPF", "CAP_NET_ADMIN"]),
            (1 << CAP_BPF, &["CAP_NET_ADMIN"]),
        ];
        for (caps, want) in cases {
            assert_eq!(missing_capabilities(caps), want, "{caps:#x}");
        }
    }

    #[test]
    fn reads_capeff_from_status() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tcat\n"), None);
    }

    #[test]
    fn reads_the_seccomp_mode_from_status() {
        let cases = [
            (
                "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n",
                Some(SeccompMode::Filter),
            ),
            ("Seccomp:\t0\n", Some(SeccompMode::Disabled)),
            ("Seccomp:\t1\n", Some(SeccompMode::Strict)),
            ("Name:\tx\n", None),
        ];
        for (status, want) in cases {
            assert_eq!(seccomp_mode_in(status), want, "{status:?}");
        }
    }
}
