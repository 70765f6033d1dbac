//! A sandbox for sending real traffic at metadata addresses without ever
//! leaving the machine: network namespaces joined by a veth pair, a fake
//! metadata server of our own in one of them, clients in the other (which
//! has no route out), cgroups for the clients, and the daemon under test.
//!
//! Every resource is an RAII guard: namespaces, cgroups and processes are
//! removed when the guard drops, also when a test panics.

// The harness's fixtures fail the test that uses them, with a message, when
// something cannot be set up: panicking is their documented contract.
#![allow(clippy::missing_panics_doc)]

pub mod bpf;
pub mod cgroups;
pub mod daemon;
pub mod frames;
pub mod hostns;
pub mod http;
pub mod monitoring;
pub mod netns;
pub mod nodeshape;
pub mod oci;
pub mod pins;
pub mod pods;
pub mod privileges;
pub mod probe;
pub mod redirect;
pub mod refusal;
pub mod stage;

use std::path::PathBuf;

pub use cgroups::TestCgroup;
pub use daemon::{Daemon, DaemonBuilder};
/// The test Kubernetes API server, a crate of its own (`tests/apiserver`).
pub use imds_guard_test_apiserver as apiserver;
pub use netns::{Sandbox, addrs};
pub use nodeshape::{NodeShape, Pod, Shape, Upstream};
pub use pins::PinDir;
pub use probe::{LoopProbe, Outcome, Probe, ProbeResult, Server, StreamProbe, Tally};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 filesystem is mounted")]
    NoCgroup2,
    #[error("{0}")]
    Process(String),
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// A name unique to this process and call, for namespaces and cgroups that
/// parallel tests (and parallel test binaries) create side by side.
pub fn unique_name(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "igt{}-{}-{tag}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `CLOCK_MONOTONIC` in nanoseconds, which processes compare: Rust's
/// `Instant` reads the same clock but cannot be turned into a number.
pub fn monotonic_ns() -> std::io::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let nanos = i128::from(now.tv_sec()) * 1_000_000_000 + i128::from(now.tv_nsec());
    u64::try_from(nanos).map_err(std::io::Error::other)
}

/// Runs a command to completion, turning a non-zero exit into an error that
/// carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| SandboxError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(SandboxError::Command {
            command,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A file in the temporary directory, written whole (write, then rename)
/// so a daemon watching it never reads half of it; removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn new(tag: &str, text: &str) -> Result<TempFile> {
        let file = TempFile {
            path: std::env::temp_dir().join(unique_name(tag)),
        };
        file.write(text)?;
        Ok(file)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The path as an argument.
    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }

    pub fn write(&self, text: &str) -> Result<()> {
        let partial = self.path.with_extension("partial");
        let io = |what, source| SandboxError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        std::fs::write(&partial, text).map_err(|e| io("writing", e))?;
        std::fs::rename(&partial, &self.path).map_err(|e| io("renaming into", e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fails unless this process is root: the sandbox needs namespaces,
/// cgroups and BPF. Tests call it first, so a missing privilege is a
/// failure with a reason, never a silent skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, cgroups, BPF); run `sudo cargo xtask test`"
    );
}
