//! `cargo xtask lint` and `cargo xtask test`.

use std::{path::Path, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    WORKSPACE, arch, build_binaries, cargo, in_ci, is_root, kernels, run_in,
    setup::{self, CargoTool},
    target_dir,
    toolchain::{self, Pin},
};

/// The end-to-end test files (tests/tests/<name>.rs) that need no root:
/// they render and read the manifests. Every other file there needs root
/// (network namespaces, cgroups, BPF) and is named when a run without root
/// skips it. (The test API server's own tests are a crate of their own,
/// which the workspace's unit tests run.)
const UNPRIVILEGED_TEST_FILES: [&str; 1] = ["manifests"];

pub const CARGO_DENY: CargoTool = CargoTool {
    krate: "cargo-deny",
    subcommand: "deny",
    version: "0.20.2",
    purpose: "lint's licence and duplicate checks",
};

/// deny.toml's licence and duplicate policy, offline; its warnings (an
/// allowed licence no crate has, a skip no longer needed) fail too, so the
/// policy stays what the tree is.
const DENY_CHECK: [&str; 7] = [
    "deny",
    "--offline",
    "check",
    "-D",
    "warnings",
    "licenses",
    "bans",
];

/// Formatting, deny.toml's licence and duplicate-version policy, and
/// clippy, in two passes: the workspace without the eBPF crate, then the
/// eBPF crate alone for its own target (built together, feature
/// unification would give it std and two panic handlers).
pub fn lint(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    // cargo-deny reads the whole graph, every platform's crates too: fetch
    // them, then check offline. Its advisories check is left out: it needs
    // the advisory database from GitHub.
    cargo(root, &["fetch", "--locked"])?;
    CARGO_DENY.require()?;
    cargo(root, &DENY_CHECK)?;
    let mut clippy = vec!["clippy"];
    clippy.extend(WORKSPACE);
    clippy.extend(["--all-targets", "--", "-D", "warnings"]);
    cargo(root, &clippy)?;
    let nightly = toolchain::resolve(&Pin::get()?)?;
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
            bail!(
                "CI=true but not root: {} need root and may not be skipped",
                needing_root(root)?.join(", ")
            );
        }
        return unprivileged(root);
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
        &[["test"].as_slice(), &WORKSPACE].concat(),
        &[
            ("IMDS_GUARD_BIN_DIR", &bin_dir.to_string_lossy()),
            ("IMDS_GUARD_VARIANT_BIN_DIR", &variant_dir.to_string_lossy()),
        ],
    )?;
    // The same traffic tests on the kernels nodes run, under qemu, and
    // beside them (a guest uses one core) the arm64 build's unit tests.
    arch::check_tools()?;
    let arm64 = arch::start_unit_tests(root)?;
    // A failed or interrupted matrix drops the arm64 run, which stops it.
    kernels::matrix(root)?;
    arm64.finish()?;
    println!("test: everything passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The test files of tests/tests that need root, by path.
fn needing_root(root: &Path) -> anyhow::Result<Vec<String>> {
    let dir = root.join("tests/tests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".rs").map(str::to_owned))
        .filter(|name| !UNPRIVILEGED_TEST_FILES.contains(&name.as_str()))
        .map(|name| format!("tests/tests/{name}.rs"))
        .collect();
    files.sort();
    files.push("the kernel matrix (cargo xtask kernels)".to_owned());
    Ok(files)
}

/// Without root: every crate's unit tests and the end-to-end files that
/// need no privilege; says exactly which files it skipped.
fn unprivileged(root: &Path) -> anyhow::Result<()> {
    let mut others = vec!["test"];
    others.extend(WORKSPACE);
    others.extend(["--exclude", "imds-guard-tests"]);
    cargo(root, &others)?;
    let mut harness = vec!["test", "-p", "imds-guard-tests", "--lib", "--bins"];
    for name in UNPRIVILEGED_TEST_FILES {
        harness.extend(["--test", name]);
    }
    cargo(root, &harness)?;
    arch::check_tools()?;
    arch::start_unit_tests(root)?.finish()?;
    println!(
        "NOT ROOT: ran the unit tests and {}; skipped, since they need root \
         (network namespaces, cgroups, BPF):",
        UNPRIVILEGED_TEST_FILES
            .map(|name| format!("tests/tests/{name}.rs"))
            .join(", ")
    );
    for skipped in needing_root(root)? {
        println!("  {skipped}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs lint's cargo-deny check with `policy` as deny.toml: whether it
    /// passed, and what it said.
    fn deny_check(root: &Path, policy: &str) -> (bool, String) {
        let config =
            std::env::temp_dir().join(format!("imds-guard-deny-{}.toml", std::process::id()));
        std::fs::write(&config, policy).unwrap();
        let config_arg = config.to_string_lossy();
        let mut args = DENY_CHECK.to_vec();
        args.splice(2..2, ["--config", &config_arg]);
        let out = std::process::Command::new("cargo")
            .args(&args)
            .current_dir(root)
            .output()
            .unwrap();
        std::fs::remove_file(&config).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The policy as shipped passes, and each check can fail: without a
    /// skip, its duplicate is named; without an allowed licence, the
    /// crates under it.
    #[test]
    fn deny_toml_passes_and_fails_without_a_skip_or_a_licence() {
        CARGO_DENY.require().unwrap();
        let root = crate::workspace_root().unwrap();
        let policy = std::fs::read_to_string(root.join("deny.toml")).unwrap();
        let (passed, said) = deny_check(&root, &policy);
        assert!(passed, "{said}");
        for (line, named) in [
            ("{ crate = \"getrandom@0.2.17\"", "getrandom"),
            ("\"ISC\",", "rustls-webpki"),
        ] {
            let without = policy
                .lines()
                .filter(|l| !l.trim_start().starts_with(line))
                .collect::<Vec<_>>()
                .join("\n");
            assert_ne!(without.len(), policy.len(), "no {line} in deny.toml");
            let (passed, said) = deny_check(&root, &without);
            assert!(!passed && said.contains(named), "without {line}: {said}");
        }
    }

    #[test]
    fn a_run_without_root_names_every_file_it_skips_and_only_those() {
        let root = crate::workspace_root().unwrap();
        let skipped = needing_root(&root).unwrap();
        for name in UNPRIVILEGED_TEST_FILES {
            let file = format!("tests/tests/{name}.rs");
            assert!(root.join(&file).is_file(), "{file} is gone");
            assert!(!skipped.contains(&file), "{file} is run, not skipped");
        }
        for needs_root in ["standalone", "packet_verdicts", "container"] {
            let file = format!("tests/tests/{needs_root}.rs");
            assert!(skipped.contains(&file), "{file} not named in {skipped:?}");
        }
    }
}
