use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF programs with the pinned nightly toolchain and
/// bpf-linker; the object lands in `OUT_DIR`, where the loader includes it.
fn main() -> anyhow::Result<()> {
    // Selects the second build the upgrade tests need (see the eBPF crate).
    println!("cargo:rerun-if-env-changed=IMDS_GUARD_EBPF_VARIANT");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("enforcer-ebpf");
    let pin = ebpf_dir.join("nightly.toml");
    println!("cargo:rerun-if-changed={}", pin.display());
    let pin =
        std::fs::read_to_string(&pin).with_context(|| format!("reading {}", pin.display()))?;
    let channel =
        pinned_channel(&pin).ok_or_else(|| anyhow!("no `channel = \"...\"` in nightly.toml"))?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "enforcer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(toolchain(channel, &pin)),
    )
}

/// The pinned channel if rustup has it, else the plain `nightly` when it
/// is the pinned compiler (`cargo xtask setup` chooses the same way and
/// checks the choice; a wrong compiler fails there, with both named).
fn toolchain<'a>(channel: &'a str, pin: &str) -> &'a str {
    let rustc_version = |toolchain: &str| {
        std::process::Command::new("rustup")
            .args(["run", toolchain, "rustc", "-V"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if rustc_version(channel).is_some() {
        return channel;
    }
    let pinned = pin
        .lines()
        .find_map(|line| line.strip_prefix("rustc = \""))
        .and_then(|rest| rest.strip_suffix('"'));
    match (pinned, rustc_version("nightly")) {
        (Some(pinned), Some(found)) if found == format!("rustc {pinned}") => "nightly",
        _ => channel,
    }
}

/// The `channel = "..."` line of enforcer-ebpf/nightly.toml (xtask reads
/// the rest of it).
fn pinned_channel(pin: &str) -> Option<&str> {
    pin.lines()
        .find_map(|line| line.strip_prefix("channel = \""))
        .and_then(|rest| rest.strip_suffix('"'))
}
