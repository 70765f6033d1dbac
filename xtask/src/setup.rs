//! `cargo xtask setup`: makes a fresh machine able to build and test
//! imds-guard. Every step checks first and says what it did, so a second run
//! changes nothing and takes seconds.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{arch, is_root, sbom, test, toolchain};

pub fn run(_root: &Path) -> anyhow::Result<()> {
    println!("setup: checking this machine");
    toolchain::ensure()?;
    toolchain::ensure_clippy()?;
    ensure_bpffs()?;
    check_tool("ip", &["-V"], "iproute2")?;
    // tests/tests/node_shapes.rs: the node's NAT and upstream's sniffer;
    // the bench's peer column (bench/peer.rs).
    check_tool("nft", &["--version"], "nftables")?;
    // tests/tests/container.rs runs the daemon's container with both.
    check_tool("crun", &["--version"], "crun")?;
    check_tool("runc", &["--version"], "runc")?;
    ensure_kubernetes_validate()?;
    sbom::CYCLONEDX.ensure()?;
    test::CARGO_DENY.ensure()?;
    // tests/tests/manifests.rs unit-tests the alert rules with promtool;
    // tests/tests/monitoring.rs runs the prometheus server.
    check_tool("promtool", &["--version"], "prometheus")?;
    check_tool("prometheus", &["--version"], "prometheus")?;
    ensure_python_packages()?;
    // The arm64 build and its unit tests (xtask/src/arch.rs).
    arch::ensure_tools()?;
    kernel_matrix_tools()?;
    println!("setup: done");
    Ok(())
}

/// Output of a command, or an error naming it.
pub(crate) fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    output_of(Command::new(program).args(args))
}

/// Output of a prepared command (its directory set, say), or an error naming it.
pub(crate) fn output_of(command: &mut Command) -> anyhow::Result<String> {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = command
        .output()
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// bpffs at /sys/fs/bpf, where pins live; mounted when missing (root only).
fn ensure_bpffs() -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mountinfo.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf ")
    });
    if mounted {
        println!("  ok: bpffs at /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        println!("  skipped: mounting bpffs at /sys/fs/bpf needs root");
        return Ok(());
    }
    println!("  mounting: bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf")?;
    output("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    Ok(())
}

/// What `cargo xtask kernels` builds and boots guests with.
fn kernel_matrix_tools() -> anyhow::Result<()> {
    check_tool("qemu-system-x86_64", &["--version"], "qemu-system-x86")?;
    check_tool("debootstrap", &["--version"], "debootstrap")?;
    check_tool("cpio", &["--version"], "cpio")?;
    // depmod: which modules the guest's need, and their index.
    check_tool("depmod", &["--version"], "kmod")?;
    // strip: the guest's binaries without their debug information.
    check_tool("strip", &["--version"], "binutils")
}

/// kubernetes-validate (PyPI): tests/tests/manifests.rs checks the rendered
/// deployment manifests against the Kubernetes API schemas with it.
fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    let works = || output("kubernetes-validate", &["--version"]).is_ok();
    if works() {
        println!("  ok: kubernetes-validate");
        return Ok(());
    }
    println!("  installing: kubernetes-validate (pip)");
    output("pip", &["install", "--quiet", "kubernetes-validate"])
        .context("kubernetes-validate is missing and `pip install kubernetes-validate` failed")?;
    if !works() {
        // Under pyenv a new command is found only once the shims are rebuilt;
        // elsewhere there is no pyenv and this changes nothing.
        let _ = output("pyenv", &["rehash"]);
    }
    if !works() {
        bail!("pip installed kubernetes-validate, but it is not on PATH");
    }
    Ok(())
}

/// A cargo subcommand from crates.io, pinned: a newer release may read the
/// same input differently (cargo-deny's config, cargo-cyclonedx's output).
pub(crate) struct CargoTool {
    pub krate: &'static str,
    /// What `cargo <subcommand>` runs it as.
    pub subcommand: &'static str,
    pub version: &'static str,
    /// What the project uses it for, said when installing it.
    pub purpose: &'static str,
}

impl CargoTool {
    /// Whether `cargo <subcommand> --version` says our version.
    fn installed(&self) -> bool {
        output("cargo", &[self.subcommand, "--version"]).is_ok_and(|said| {
            said.split_whitespace()
                .any(|word| word.trim_start_matches('v') == self.version)
        })
    }

    /// Installs the pinned version when it is not the one installed.
    pub fn ensure(&self) -> anyhow::Result<()> {
        let Self { krate, version, .. } = self;
        if self.installed() {
            println!("  ok: {krate} {version}");
            return Ok(());
        }
        println!(
            "  installing: {krate} {version} ({}, a few minutes)",
            self.purpose
        );
        let status = Command::new("cargo")
            .args(["install", "--locked", "--version", version, krate])
            .status()
            .with_context(|| format!("running cargo install {krate}"))?;
        if !status.success() || !self.installed() {
            bail!("`cargo install --locked --version {version} {krate}` failed ({status})");
        }
        Ok(())
    }

    /// Fails, naming the fix, unless the pinned version is installed.
    pub fn require(&self) -> anyhow::Result<()> {
        if self.installed() {
            return Ok(());
        }
        bail!(
            "`cargo {}` is not {} {} ({}): `cargo xtask setup` installs it",
            self.subcommand,
            self.krate,
            self.version,
            self.purpose
        )
    }
}

/// The Python packages the monitoring bundle's checks import, by name and
/// version: the prometheus-operator CRD models
/// (`tests/monitoring/validate_operator_crds.py`) and Grafana's SDK
/// (deploy/monitoring/dashboards/generate.py). Pinned: the committed
/// dashboard is what this SDK version writes.
const PYTHON_PACKAGES: [(&str, &str); 2] = [
    ("cloudcoil-models-prometheus-operator", "0.80.1.0"),
    ("grafana-foundation-sdk", "1769699998!10.1.0"),
];

fn ensure_python_packages() -> anyhow::Result<()> {
    for (package, version) in PYTHON_PACKAGES {
        let installed = || {
            output(
                "python3",
                &[
                    "-c",
                    "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))",
                    package,
                ],
            )
            .is_ok_and(|found| found.trim() == version)
        };
        if installed() {
            println!("  ok: {package} {version} (python3)");
            continue;
        }
        let requirement = format!("{package}=={version}");
        println!("  installing: {requirement} (pip)");
        output("pip", &["install", "--quiet", &requirement])
            .with_context(|| format!("`pip install {requirement}` failed"))?;
        if !installed() {
            bail!("pip installed {requirement}, but python3 does not find it");
        }
    }
    Ok(())
}

pub(crate) fn check_tool(program: &str, args: &[&str], package: &str) -> anyhow::Result<()> {
    if output(program, args).is_ok() {
        println!("  ok: {program}");
        return Ok(());
    }
    if !is_root() {
        bail!("`{program}` is missing: install the {package} package");
    }
    println!("  installing: {package}");
    // A machine's package lists may be older than the archive (a 404 on
    // install): refresh them first, which only happens when installing.
    apt_get(&["update", "-q"]).context("apt-get update failed")?;
    apt_get(&["install", "-y", "-q", package]).with_context(|| {
        format!("`{program}` is missing and apt-get could not install {package}")
    })?;
    Ok(())
}

/// apt-get, waiting for another apt on the machine (an unattended upgrade,
/// a second setup) to release the dpkg lock rather than failing at once.
fn apt_get(args: &[&str]) -> anyhow::Result<String> {
    output(
        "apt-get",
        &[["-o", "DPkg::Lock::Timeout=600"].as_slice(), args].concat(),
    )
}
