//! The build toolchain: the nightly pinned in enforcer-ebpf/nightly.toml
//! (the preinstalled `nightly` when it is that compiler, else installed),
//! checked against the pin, its rust-src, and bpf-linker built against its
//! own LLVM.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::output;

/// The pin, compiled in: xtask and the eBPF build read the same file.
const PIN_FILE: &str = include_str!("../../enforcer-ebpf/nightly.toml");
const PIN_PATH: &str = "enforcer-ebpf/nightly.toml";

/// What enforcer-ebpf/nightly.toml pins.
#[derive(Debug, PartialEq, Eq)]
pub struct Pin {
    /// The rustup toolchain aya-build runs, e.g. `nightly-2026-05-20`.
    pub channel: String,
    /// What its `rustc -V` says after `rustc `.
    pub rustc: String,
    pub llvm_major: String,
    pub bpf_linker: String,
}

impl Pin {
    pub fn get() -> anyhow::Result<Pin> {
        Pin::parse(PIN_FILE)
    }

    fn parse(text: &str) -> anyhow::Result<Pin> {
        let value = |key: &str| -> anyhow::Result<String> {
            text.lines()
                .filter_map(|line| line.split_once(" = "))
                .find(|(name, _)| *name == key)
                .and_then(|(_, value)| value.strip_prefix('"')?.strip_suffix('"'))
                .map(str::to_owned)
                .with_context(|| format!("{PIN_PATH} has no `{key} = \"...\"` line"))
        };
        Ok(Pin {
            channel: value("channel")?,
            rustc: value("rustc")?,
            llvm_major: value("llvm-major")?,
            bpf_linker: value("bpf-linker")?,
        })
    }
}

/// What a toolchain's `rustc -vV` says about itself.
#[derive(Debug, PartialEq, Eq)]
struct Found {
    rustc: String,
    llvm_major: String,
}

impl Found {
    fn parse(verbose: &str) -> anyhow::Result<Found> {
        let mut lines = verbose.lines();
        let rustc = lines
            .next()
            .and_then(|first| first.strip_prefix("rustc "))
            .context("`rustc -vV` does not start with `rustc `")?
            .to_owned();
        let llvm_major = lines
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .context("`rustc -vV` names no LLVM version")?
            .to_owned();
        Ok(Found { rustc, llvm_major })
    }

    fn of(toolchain: &str) -> anyhow::Result<Found> {
        Found::parse(&output("rustup", &["run", toolchain, "rustc", "-vV"])?)
    }
}

/// Fails unless `found` is the pinned compiler, naming both.
fn check(pin: &Pin, toolchain: &str, found: &Found) -> anyhow::Result<()> {
    if found.rustc != pin.rustc || found.llvm_major != pin.llvm_major {
        bail!(
            "the toolchain `{toolchain}` is rustc {} with LLVM {}; imds-guard's eBPF build needs \
             rustc {} with LLVM {} ({PIN_PATH}, which bpf-linker {} with feature llvm-{} matches)",
            found.rustc,
            found.llvm_major,
            pin.rustc,
            pin.llvm_major,
            pin.bpf_linker,
            pin.llvm_major
        );
    }
    Ok(())
}

/// What building imds-guard needs, and nothing more: the pinned nightly
/// with its rust-src, and bpf-linker. The container image build runs only
/// this: it can neither mount bpffs nor needs the test tools.
pub fn ensure() -> anyhow::Result<()> {
    let pin = Pin::get()?;
    let toolchain = ensure_nightly(&pin)?;
    ensure_component(&toolchain, "rust-src", "to build core for the BPF target")?;
    ensure_bpf_linker(&pin, &toolchain)
}

fn installed(channel: &str) -> anyhow::Result<bool> {
    let list = output("rustup", &["toolchain", "list"])?;
    Ok(list.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|name| name.starts_with(channel))
    }))
}

/// The toolchain that builds the eBPF crate: the pinned channel if it is
/// installed, else the plain `nightly` if it is exactly the pinned compiler
/// (a machine whose preinstalled nightly is the verified one needs no
/// download), else the pinned channel, installed now. enforcer-user's
/// build script chooses the same way.
pub fn resolve(pin: &Pin) -> anyhow::Result<String> {
    if installed(&pin.channel)? {
        return Ok(pin.channel.clone());
    }
    if Found::of(FLOATING).is_ok_and(|found| check(pin, FLOATING, &found).is_ok()) {
        return Ok(FLOATING.to_owned());
    }
    Ok(pin.channel.clone())
}

/// What rustup calls the newest nightly installed.
const FLOATING: &str = "nightly";

/// Makes sure the resolved toolchain is there and is the pinned compiler.
fn ensure_nightly(pin: &Pin) -> anyhow::Result<String> {
    let toolchain = resolve(pin)?;
    if toolchain == pin.channel && !installed(&pin.channel)? {
        println!("  installing: {} (the pinned nightly)", pin.channel);
        let installed = output(
            "rustup",
            &[
                "toolchain",
                "install",
                &pin.channel,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        );
        if let Err(err) = installed {
            // Say what the floating nightly is, which is what people have.
            let floating = Found::of(FLOATING).map_or_else(
                |_| "no `nightly` toolchain either".to_owned(),
                |f| format!("`nightly` is rustc {} with LLVM {}", f.rustc, f.llvm_major),
            );
            bail!(
                "{err:#}\nthe eBPF build needs {} (rustc {} with LLVM {}, {PIN_PATH}); {floating}",
                pin.channel,
                pin.rustc,
                pin.llvm_major
            );
        }
    }
    check(pin, &toolchain, &Found::of(&toolchain)?)?;
    println!("  ok: {toolchain} (rustc {})", pin.rustc);
    Ok(toolchain)
}

/// The pinned nightly's clippy, which `cargo xtask lint` runs on the eBPF
/// crate (the image build does not need it).
pub fn ensure_clippy() -> anyhow::Result<()> {
    let toolchain = resolve(&Pin::get()?)?;
    ensure_component(&toolchain, "clippy", "to lint the eBPF crate")
}

fn ensure_component(toolchain: &str, component: &str, why: &str) -> anyhow::Result<()> {
    let listed = ["component", "list", "--toolchain", toolchain, "--installed"];
    if output("rustup", &listed)?
        .lines()
        .any(|l| l.starts_with(component))
    {
        println!("  ok: {toolchain} {component}");
        return Ok(());
    }
    println!("  installing: {toolchain} {component} ({why})");
    output(
        "rustup",
        &["component", "add", component, "--toolchain", toolchain],
    )?;
    Ok(())
}

/// The nightly's own `libLLVM.so.<ver>-rust-<ver>`.
fn nightly_libllvm(toolchain: &str) -> anyhow::Result<PathBuf> {
    let sysroot = output("rustup", &["run", toolchain, "rustc", "--print", "sysroot"])?;
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
fn bpf_linker_works(pin: &Pin) -> bool {
    output("bpf-linker", &["--version"])
        .is_ok_and(|v| v.trim() == format!("bpf-linker {}", pin.bpf_linker))
}

/// bpf-linker built against the nightly's own LLVM: the default features
/// want a system LLVM this machine lacks, so we point `LLVM_PREFIX` at a
/// directory of links to the nightly's library. The directory stays: the
/// linker finds the library through it at run time.
fn ensure_bpf_linker(pin: &Pin, toolchain: &str) -> anyhow::Result<()> {
    let version = &pin.bpf_linker;
    if bpf_linker_works(pin) {
        println!("  ok: bpf-linker {version}");
        return Ok(());
    }
    let major = &pin.llvm_major;
    let libllvm = nightly_libllvm(toolchain)?;
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
        "  installing: bpf-linker {version} against the nightly's LLVM {major} (about a minute)"
    );
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{version}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !bpf_linker_works(pin) {
        bail!(
            "installing bpf-linker failed ({status}); is {} on PATH?",
            cargo_home()?.join("bin").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_pin_reads() {
        let pin = Pin::get().unwrap();
        assert!(pin.channel.starts_with("nightly-"), "{pin:?}");
        assert!(pin.rustc.contains("nightly"), "{pin:?}");
        assert!(pin.llvm_major.parse::<u32>().is_ok(), "{pin:?}");
    }

    #[test]
    fn a_different_nightly_is_named_with_what_is_needed() {
        let pin = Pin::parse(
            "# comment\nchannel = \"nightly-2026-05-20\"\nrustc = \"1.97.0-nightly (e50aa6fba 2026-05-19)\"\n\
             llvm-major = \"22\"\nbpf-linker = \"0.13.0\"\n",
        )
        .unwrap();
        let same = Found::parse(
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n",
        )
        .unwrap();
        assert!(check(&pin, "nightly", &same).is_ok());
        let newer = Found::parse(
            "rustc 1.98.0-nightly (0123456789 2026-07-01)\nbinary: rustc\nLLVM version: 23.0.0\n",
        )
        .unwrap();
        let err = check(&pin, "nightly", &newer).unwrap_err().to_string();
        for named in [
            "1.98.0-nightly (0123456789 2026-07-01)",
            "LLVM 23",
            "1.97.0-nightly (e50aa6fba 2026-05-19)",
            "LLVM 22",
            "llvm-22",
        ] {
            assert!(err.contains(named), "{named} not in {err}");
        }
        assert!(Pin::parse("channel = \"x\"\n").is_err());
    }
}
