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

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The capabilities absent from an effective set (`CapEff` of
/// /proc/self/status): `CAP_BPF` (or `CAP_SYS_ADMIN`, which implies it) to create
/// maps and load programs, and `CAP_NET_ADMIN` to load and attach cgroup
/// networking programs.
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) && !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
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
}
