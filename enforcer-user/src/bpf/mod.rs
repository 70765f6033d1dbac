//! The kernel side as the daemon sees it: the embedded eBPF object and its
//! loading ([`loader`]), why a load was refused ([`refusal`]), typed maps
//! ([`maps`]), the pinned generations that outlive the daemon ([`pins`]),
//! and the one task that owns them while it runs ([`owner`]). Map and
//! program names come from `enforcer_common::names` only.

use std::path::PathBuf;

use aya::{EbpfError, maps::MapError, programs::ProgramError};

use crate::host::memlock::MemlockError;

pub mod edge;
pub mod loader;
pub mod maps;
pub mod owner;
pub mod pins;
pub mod refusal;

use refusal::VerifierSummary;

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
    #[error("node edge guard program {name}: {reason}")]
    Edge { name: &'static str, reason: String },
    #[error("pinning {name} at {path}: {reason}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        reason: String,
    },
}
