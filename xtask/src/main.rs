//! `cargo xtask <task>`: everything the README promises, from a fresh clone.

mod arch;
#[cfg(feature = "sandbox")]
mod bench;
#[cfg(feature = "sandbox")]
mod demo;
mod image;
mod interrupt;
mod kernels;
mod kind;
mod sbom;
mod setup;
mod test;
mod toolchain;
mod vagrant;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: the pinned nightly, bpf-linker, bpffs, test tools (idempotent).
    Setup,
    /// Only the build toolchain (the pinned nightly, bpf-linker): what the image build runs.
    SetupToolchain,
    /// Setup, then build the daemon in release mode.
    Build,
    /// Formatting and clippy, the workspace and the eBPF crate.
    Lint,
    /// Setup, lint, then the whole test suite (root-only tests need root).
    Test,
    /// Setup, build, then block a metadata server in a sandbox and report.
    Demo,
    /// Setup, build, then measure what imds-guard costs against the same traffic without it.
    Bench,
    /// The daemon's container image (Dockerfile), with docker or podman.
    Image,
    /// The daemon's CycloneDX SBOM, written to OUT and checked (the image build runs it).
    Sbom {
        out: PathBuf,
        /// The Rust target the binary is built for (its dependencies are
        /// the ones listed); this machine's when absent.
        #[arg(long)]
        target: Option<String>,
    },
    /// The image on two kind clusters (systemd and cgroupfs drivers), checked from real pods.
    KindE2e,
    /// The same checks on a single-node k3s cluster in a Vagrant VM.
    VagrantE2e,
    /// Setup, then the traffic tests on Debian's kernels under qemu, as root
    /// and with the DaemonSet's privileges (table in kernels/matrix.txt of the target directory).
    Kernels,
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    match Cli::parse().task {
        Task::Setup => setup::run(&root),
        Task::Build => {
            setup::run(&root)?;
            build_release(&root).map(|_| ())
        }
        Task::Lint => test::lint(&root),
        Task::Test => test::run(&root),
        #[cfg(feature = "sandbox")]
        Task::Demo => demo::run(&root),
        #[cfg(feature = "sandbox")]
        Task::Bench => bench::run(&root),
        #[cfg(not(feature = "sandbox"))]
        Task::Demo | Task::Bench => with_sandbox(&root),
        Task::SetupToolchain => toolchain::ensure(),
        Task::Image => image::run(&root),
        Task::Sbom { out, target } => sbom::run(&root, &out, target.as_deref()),
        Task::KindE2e => kind::run(&root),
        Task::VagrantE2e => vagrant::run(&root),
        Task::Kernels => kernels::run(&root),
    }
}

/// The tasks that run the sandbox need the test harness, which a build of
/// xtask for the other tasks leaves out: this runs the same command line
/// again through a build of xtask with the `sandbox` feature.
#[cfg(not(feature = "sandbox"))]
fn with_sandbox(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let err = Command::new("cargo")
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "sandbox",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .current_dir(root)
        .exec();
    Err(err).context("running xtask again with the sandbox feature")
}

/// `cargo` arguments that select the workspace's own crates, the sandbox
/// tasks included, for clippy and the tests; the eBPF crate builds for its
/// own target (lint does it apart).
const WORKSPACE: [&str; 5] = [
    "--workspace",
    "--exclude",
    "enforcer-ebpf",
    "--features",
    "xtask/sandbox",
];

/// The workspace root: xtask's manifest directory's parent.
fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Builds the daemon and the sandbox probe in release mode; returns the
/// directory holding them.
fn build_release(root: &Path) -> anyhow::Result<PathBuf> {
    build_binaries(root, true)
}

/// Builds the daemon and the sandbox's binaries (probe, traffic); returns
/// the directory holding them.
fn build_binaries(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    args.extend(["-p", "enforcer-user", "-p", "imds-guard-tests", "--bins"]);
    cargo(root, &args)?;
    Ok(target_dir(root)?.join(if release { "release" } else { "debug" }))
}

/// The target directory cargo uses (`CARGO_TARGET_DIR` respected).
fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let metadata = cargo_stdout(root, &["metadata", "--format-version", "1", "--no-deps"])?;
    let metadata: serde_json::Value = serde_json::from_str(&metadata)?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

/// Runs cargo in the workspace: its standard output (its messages show).
fn cargo_stdout(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("cargo")
        .args(args)
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("`cargo {}` failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cargo ARGS` in the workspace, failing on a non-zero exit.
fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run_in(root, "cargo", args, &[])
}

/// Runs a program to completion with extra environment, inheriting output.
fn run_in(root: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    println!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Whether this process runs as root.
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we run under CI, where nothing may be skipped.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
