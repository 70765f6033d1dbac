//! arm64 (Graviton and Ampere nodes): the daemon cross-built for
//! aarch64 (the linker is named in .cargo/config.toml), and its unit tests
//! run on this `x86_64` machine under qemu user emulation. `cargo xtask test`
//! runs them beside the kernel matrix, whose guests use one core of two.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    setup::{self, output},
    target_dir,
};

/// The Rust target of arm64 nodes.
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// The crates whose unit tests run for aarch64: everything the daemon is
/// built from (the test harness and xtask run on the build machine only).
const CRATES: [&str; 2] = ["enforcer-common", "enforcer-user"];

/// Unit tests qemu-user cannot run, and why: it is the emulator, not
/// arm64, that fails them.
const NOT_UNDER_QEMU_USER: [(&str, &str); 2] = [
    (
        "host::cgroup::tests::the_short_lookup_finds_only_directories_reached_without_symlinks",
        "openat2(2), which qemu 7.2's user mode does not emulate (ENOSYS)",
    ),
    (
        "host::cgroup::tests::many_directories_in_one_parent_are_named_from_its_listing",
        "openat2(2), which qemu 7.2's user mode does not emulate (ENOSYS)",
    ),
];

/// How cargo runs aarch64 test binaries on this machine: qemu's user mode,
/// with the cross toolchain's sysroot for the dynamic loader and glibc.
const RUNNER: &str = "qemu-aarch64-static -L /usr/aarch64-linux-gnu";

/// The aarch64 unit tests, running.
pub struct UnitTests {
    child: Child,
    log: PathBuf,
}

/// The cargo arguments of the aarch64 unit-test run.
fn test_args() -> Vec<&'static str> {
    let mut args = vec!["test", "--locked", "--target", AARCH64, "--lib"];
    for krate in CRATES {
        args.extend(["-p", krate]);
    }
    // One job, at low priority: the kernel matrix's guest has the other core.
    args.extend(["-j", "1", "--", "--test-threads", "1", "--exact"]);
    for (test, _) in NOT_UNDER_QEMU_USER {
        args.extend(["--skip", test]);
    }
    args
}

/// Starts building and running the aarch64 unit tests in a target
/// directory of their own (so they do not wait for the other builds'
/// lock), their output to a log.
pub fn start_unit_tests(root: &Path) -> anyhow::Result<UnitTests> {
    let target = target_dir(root)?.join(AARCH64);
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let log = target.join("unit-tests.log");
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new("nice")
        .args(["-n", "10", "cargo"])
        .args(test_args())
        // A group of its own, so that stopping it stops cargo's children too.
        .process_group(0)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", RUNNER)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .context("starting the aarch64 unit tests")?;
    println!(
        "arm64: unit tests building and running under qemu-user (log: {})",
        log.display()
    );
    Ok(UnitTests { child, log })
}

impl Drop for UnitTests {
    /// Stops the run's whole process group if it is still going (the
    /// matrix failed or was interrupted, or `finish` was never reached).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.wait();
        }
    }
}

impl UnitTests {
    /// Waits for the run; says what passed and what was left out, or fails
    /// with the end of its log.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let status = self
            .child
            .wait()
            .context("waiting for the aarch64 unit tests")?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the aarch64 unit tests failed ({status}); the end of {}:\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        let (passed, failed) = totals(&log);
        if passed == 0 || failed != 0 {
            bail!(
                "the aarch64 unit tests reported {passed} passed, {failed} failed ({})",
                self.log.display()
            );
        }
        println!("arm64: {passed} unit tests passed under qemu-user (aarch64)");
        for (test, why) in NOT_UNDER_QEMU_USER {
            println!("arm64: not run under qemu-user: {test} (it needs {why})");
        }
        Ok(())
    }
}

/// Passed and failed, summed over a cargo test log's `test result:` lines.
fn totals(log: &str) -> (u64, u64) {
    let count = |line: &str, what: &str| -> u64 {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().rsplit(' ').next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    log.lines()
        .filter(|line| line.starts_with("test result:"))
        .fold((0, 0), |(passed, failed), line| {
            (
                passed + count(line, "passed"),
                failed + count(line, "failed"),
            )
        })
}

/// What builds and runs them besides the target's standard library: the
/// cross linker and qemu's user mode, by command and Debian package.
const TOOLS: [(&str, &str); 2] = [
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("qemu-aarch64-static", "qemu-user-static"),
];

fn target_installed() -> anyhow::Result<bool> {
    let installed = output("rustup", &["target", "list", "--installed"])?;
    Ok(installed.lines().any(|t| t.trim() == AARCH64))
}

/// `cargo xtask setup`'s part: the target's standard library and
/// [`TOOLS`], installed where missing.
pub fn ensure_tools() -> anyhow::Result<()> {
    if target_installed()? {
        println!("  ok: rust target {AARCH64}");
    } else {
        println!("  installing: rust target {AARCH64}");
        output("rustup", &["target", "add", AARCH64])
            .with_context(|| format!("`rustup target add {AARCH64}` failed"))?;
    }
    for (tool, package) in TOOLS {
        setup::check_tool(tool, &["--version"], package)?;
    }
    Ok(())
}

/// Whether this machine can build and run them (what [`ensure_tools`]
/// installs).
pub fn check_tools() -> anyhow::Result<()> {
    if !target_installed()? {
        bail!("the {AARCH64} target is not installed: run `cargo xtask setup`");
    }
    for (tool, _) in TOOLS {
        output(tool, &["--version"])
            .with_context(|| format!("`{tool}` is missing: run `cargo xtask setup`"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logs_results_add_up() {
        let log = "\
running 11 tests
test result: ok. 11 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.05s
test result: FAILED. 83 passed; 2 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.14s
";
        assert_eq!(totals(log), (94, 2));
        assert_eq!(totals("error: could not compile"), (0, 0));
    }

    #[test]
    fn the_skipped_tests_exist_and_only_they_are_skipped() {
        let root = crate::workspace_root().unwrap();
        let source =
            std::fs::read_to_string(root.join("enforcer-user/src/host/cgroup.rs")).unwrap();
        for (test, _) in NOT_UNDER_QEMU_USER {
            let name = test.rsplit("::").next().unwrap();
            assert!(source.contains(&format!("fn {name}()")), "{test}");
        }
        let args = test_args();
        // With --exact a skip names one test, not every test containing it.
        assert!(args.contains(&"--exact"));
        assert_eq!(
            args.iter().filter(|a| **a == "--skip").count(),
            NOT_UNDER_QEMU_USER.len()
        );
    }
}
