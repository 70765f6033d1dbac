//! `cargo xtask lint` and `cargo xtask test`.

use std::{path::Path, time::Instant};

use anyhow::bail;

use crate::{
    build_binaries, cargo, in_ci, is_root, kernels, run_in, setup, target_dir, toolchain::Pin,
};

/// Formatting and clippy, in two passes: the workspace without the eBPF
/// crate, then the eBPF crate alone for its own target (built together,
/// feature unification would give it std and two panic handlers).
pub fn lint(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "enforcer-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let nightly = Pin::get()?.channel;
    run_in(
        root,
        "rustup",
        &[
            "run",
            &nightly,
            "cargo",
            "clippy",
            "-p",
            "enforcer-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run(root)?;
    lint(root)?;
    if !is_root() {
        if in_ci() {
            bail!("CI=true but not root: the kernel tests need root and may not be skipped");
        }
        println!(
            "NOT ROOT: running only the tests that need no privilege; \
             the kernel and sandbox tests (package imds-guard-tests) did not run"
        );
        cargo(
            root,
            &[
                "test",
                "--workspace",
                "--exclude",
                "enforcer-ebpf",
                "--exclude",
                "imds-guard-tests",
            ],
        )?;
        return Ok(());
    }
    // The end-to-end tests run the real binaries: build them first, and a
    // second build whose eBPF object differs, for the upgrade tests (in a
    // target directory of its own, so neither build invalidates the other).
    let bin_dir = build_binaries(root, false)?;
    let variant_target = target_dir(root)?.join("variant");
    run_in(
        root,
        "cargo",
        &["build", "-p", "enforcer-user", "--bin", "imds-guard"],
        &[
            ("CARGO_TARGET_DIR", &variant_target.to_string_lossy()),
            ("IMDS_GUARD_EBPF_VARIANT", "1"),
        ],
    )?;
    let variant_dir = variant_target.join("debug");
    run_in(
        root,
        "cargo",
        &["test", "--workspace", "--exclude", "enforcer-ebpf"],
        &[
            ("IMDS_GUARD_BIN_DIR", &bin_dir.to_string_lossy()),
            ("IMDS_GUARD_VARIANT_BIN_DIR", &variant_dir.to_string_lossy()),
        ],
    )?;
    // The same traffic tests on the kernels nodes run, under qemu.
    kernels::matrix(root)?;
    println!("test: everything passed in {:.0?}", started.elapsed());
    Ok(())
}
