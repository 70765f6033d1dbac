//! A start that fails part-way leaves nothing behind: a DaemonSet in
//! CrashLoopBackOff must not pile up maps (a 256 KiB ring among them) with
//! every restart. Counted kernel-wide, not only as pin files: a pin removed
//! while some other reference kept the map would still be a leak.
//!
//! One test in this file: it counts every BPF object the kernel holds, so
//! nothing else of ours may load in parallel.

use std::time::Duration;

use enforcer_common::names;
use imds_guard_tests::{
    Daemon,
    privileges::{BPF_LINK_CREATE, BPF_PROG_ATTACH, BpfFilter, Privileges},
    stage::Stage,
};

/// Names the kernel keeps (BPF_OBJ_NAME_LEN: 15 characters and a NUL).
fn kernel_name(name: &str) -> String {
    name.chars().take(15).collect()
}

/// `enum bpf_prog_type` values of our programs.
const CGROUP_SKB: u32 = 8;
const CGROUP_SOCK_ADDR: u32 = 18;

/// Our maps, and the cgroup network programs, loaded anywhere in the kernel.
fn ours_loaded() -> (usize, usize) {
    let map_names: Vec<String> = [
        names::DEST_RULES,
        names::DEST_BUCKETS,
        names::ALLOWED_CGROUPS,
        names::BLOCK_COUNTERS,
        names::EVENTS,
        names::EVENT_WINDOWS,
        names::EVENTS_DROPPED,
    ]
    .map(kernel_name)
    .to_vec();
    let maps = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| {
            let name = String::from_utf8_lossy(m.name()).into_owned();
            map_names.contains(&name)
        })
        .count();
    // By type: without CAP_PERFMON aya's probe for program names fails
    // (it loads a tracepoint program), so the daemon's programs have none.
    let programs = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.program_type() as u32, CGROUP_SKB | CGROUP_SOCK_ADDR))
        .count();
    (maps, programs)
}

fn refused_start(stage: &Stage, filter: BpfFilter) -> String {
    let privileges = Privileges {
        bpf_filter: filter,
        ..Privileges::from_env().expect("test privileges")
    };
    let args = stage.daemon_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::spawn_with(&privileges, &args).expect("spawn");
    let status = daemon.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(
        !status.success(),
        "the start must be refused:\n{}",
        daemon.log()
    );
    daemon.log()
}

#[test]
fn refused_starts_leave_no_maps_programs_or_pins_behind() {
    let stage = Stage::set_up();
    let before = ours_loaded();

    // Refused at attach: every map and program exists by then.
    for attempt in 1..=3 {
        let log = refused_start(
            &stage,
            BpfFilter::Refuse(vec![BPF_LINK_CREATE, BPF_PROG_ATTACH]),
        );
        assert!(
            log.contains("attaching imds_guard_egress") && log.contains("Operation not permitted"),
            "the error names what failed:\n{log}"
        );
        assert_eq!(
            ours_loaded(),
            before,
            "attempt {attempt} left BPF objects:\n{log}"
        );
        assert!(
            !stage.pins.path().exists(),
            "attempt {attempt} left pins: {:?}",
            stage.pins.generations()
        );
    }

    // Refused at the first map, as a seccomp profile without the bpf rule
    // does: the error says so instead of blaming capabilities.
    let log = refused_start(&stage, BpfFilter::RefuseAll);
    assert!(
        log.contains("seccomp filter refuses the bpf system call"),
        "the error names seccomp:\n{log}"
    );
    assert!(
        !log.contains("needs root"),
        "no hint about what is not missing:\n{log}"
    );
    assert_eq!(ours_loaded(), before);

    // The same privileges without the filter start, and then the objects
    // are there: the count above can see them.
    let args = stage.daemon_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _daemon = Daemon::start(&args).expect("starts without the filter");
    let (maps, programs) = ours_loaded();
    assert!(
        maps >= before.0 + 7 && programs >= before.1 + 5,
        "{before:?} -> {:?}",
        (maps, programs)
    );
}
