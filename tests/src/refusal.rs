//! Starts that must be refused, and what they may not leave behind: a
//! DaemonSet in CrashLoopBackOff must not pile up maps and programs with
//! every restart. Counted kernel-wide, not only as pin files: a pin removed
//! while some other reference kept the map would still be a leak.

use std::time::Duration;

use enforcer_common::names;

use crate::{DaemonBuilder, privileges::Privileges, stage::Stage};

/// `enum bpf_prog_type` values of our programs.
const CGROUP_SKB: u32 = 8;
const CGROUP_SOCK_ADDR: u32 = 18;

/// Under TCG (the kernel matrix) the verifier alone can take many seconds.
const REFUSAL_TIMEOUT: Duration = Duration::from_mins(1);

/// Our maps (by name; the kernel keeps 15 characters) and the cgroup
/// network programs (by type: without CAP_PERFMON aya's probe for program
/// names fails, so the daemon's programs have none) loaded anywhere.
pub fn ours_loaded() -> (usize, usize) {
    let map_names: Vec<String> = names::MAPS
        .iter()
        .map(|name| name.chars().take(15).collect())
        .collect();
    let maps = aya::maps::loaded_maps()
        .map(|m| m.expect("listing BPF maps"))
        .filter(|m| map_names.contains(&String::from_utf8_lossy(m.name()).into_owned()))
        .count();
    let programs = aya::programs::loaded_programs()
        .map(|p| p.expect("listing BPF programs"))
        .filter(|p| matches!(p.program_type() as u32, CGROUP_SKB | CGROUP_SOCK_ADDR))
        .count();
    (maps, programs)
}

/// Starts the daemon on `stage` with `privileges`, expects it to exit
/// non-zero, and checks that it left no BPF object and no pin; returns its
/// log, for the caller to check the reason.
pub fn refused_start(stage: &Stage, privileges: &Privileges, attempt: usize) -> String {
    let daemon = stage
        .daemon(&["--allow", "{allowed}"])
        .privileges(privileges);
    refused(stage, daemon, attempt)
}

/// Starts `daemon` (pinning under `stage`'s pins), expects it to exit
/// non-zero, and checks that it left no BPF object and no pin; returns its
/// log.
pub fn refused(stage: &Stage, daemon: DaemonBuilder, attempt: usize) -> String {
    let before = ours_loaded();
    let mut daemon = daemon.spawn().expect("spawn imds-guard");
    let status = daemon
        .wait_exit(REFUSAL_TIMEOUT)
        .expect("a refused start ends");
    let log = daemon.log();
    assert!(!status.success(), "start {attempt} must be refused:\n{log}");
    assert_eq!(
        ours_loaded(),
        before,
        "start {attempt} left BPF maps or programs behind:\n{log}"
    );
    assert!(
        !stage.pins.path().exists(),
        "start {attempt} left pins: {:?}",
        stage.pins.generations()
    );
    log
}
