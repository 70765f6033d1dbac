//! `cargo xtask setup`: makes a fresh machine able to build and test
//! imds-guard. Every step checks first and says what it did, so a second run
//! changes nothing and takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::is_root;

/// The bpf-linker release that builds against the nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run(_root: &Path) -> anyhow::Result<()> {
    println!("setup: checking this machine");
    toolchain()?;
    ensure_bpffs()?;
    check_tool("ip", &["-V"], "iproute2")?;
    // The benchmark reads each program's run time and run count with it.
    check_tool("bpftool", &["version"], "bpftool")?;
    // tests/tests/container.rs runs the daemon's container with both.
    check_tool("crun", &["--version"], "crun")?;
    check_tool("runc", &["--version"], "runc")?;
    ensure_kubernetes_validate()?;
    kernel_matrix_tools()?;
    println!("setup: done");
    Ok(())
}

/// What building imds-guard needs, and nothing more: the nightly's rust-src
/// and bpf-linker. The container image build runs only this: it can neither
/// mount bpffs nor needs the test tools.
pub fn toolchain() -> anyhow::Result<()> {
    check_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
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

fn check_nightly() -> anyhow::Result<()> {
    output("rustup", &["run", "nightly", "rustc", "--version"]).context(
        "the nightly toolchain is needed to build the eBPF programs: \
         `rustup toolchain install nightly`",
    )?;
    println!("  ok: nightly toolchain");
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("  ok: nightly rust-src");
        return Ok(());
    }
    println!("  installing: nightly rust-src (to build core for the BPF target)");
    output(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )?;
    Ok(())
}

/// The LLVM major version of the nightly compiler (`LLVM version: 22.1.4`).
fn nightly_llvm_major() -> anyhow::Result<String> {
    let verbose = output("rustup", &["run", "nightly", "rustc", "-vV"])?;
    verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("`rustc +nightly -vV` names no LLVM version")
}

/// The nightly's own `libLLVM.so.<ver>-rust-<ver>`.
fn nightly_libllvm() -> anyhow::Result<PathBuf> {
    let sysroot = output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    entries
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Whether a working bpf-linker of our version is on PATH. A binary whose
/// LLVM library has gone (it is found through a run path) does not start.
fn bpf_linker_works() -> bool {
    output("bpf-linker", &["--version"])
        .is_ok_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}"))
}

/// bpf-linker built against the nightly's own LLVM: the default features
/// want a system LLVM this machine lacks, so we point LLVM_PREFIX at a
/// directory of links to the nightly's library. The directory stays: the
/// linker finds the library through it at run time.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        println!("  ok: bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    let libllvm = nightly_libllvm()?;
    let prefix = cargo_home()?.join(format!("imds-guard/llvm-{major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        // Replace stale links from an older nightly.
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "  installing: bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
    );
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !bpf_linker_works() {
        bail!(
            "installing bpf-linker failed ({status}); is {} on PATH?",
            cargo_home()?.join("bin").display()
        );
    }
    Ok(())
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

fn check_tool(program: &str, args: &[&str], package: &str) -> anyhow::Result<()> {
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
    output("apt-get", &["update", "-q"]).context("apt-get update failed")?;
    output("apt-get", &["install", "-y", "-q", package]).with_context(|| {
        format!("`{program}` is missing and apt-get could not install {package}")
    })?;
    Ok(())
}
