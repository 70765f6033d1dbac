//! The daemon started with exactly the DaemonSet's privileges (CAP_BPF and
//! CAP_NET_ADMIN, `no_new_privs`, a 64 KiB `RLIMIT_MEMLOCK`), whatever the test
//! run's are: from kernel 5.11 it enforces, its egress program reading
//! packets in place (the verifier allows that without CAP_PERFMON from
//! 5.11; 5.10's refuses, and under the kernel-5.10 overlay's grant the
//! daemon falls back to copying). Before 5.11 the kernel charges
//! BPF maps to `RLIMIT_MEMLOCK`, which the daemon cannot raise without
//! CAP_SYS_RESOURCE: it must refuse to start, name the limit and its need,
//! and leave no map or program behind, however often it is restarted (a
//! crash-looping DaemonSet). The kernel-5.10 overlay is the documented answer
//! there; `cargo xtask kernels` runs the traffic tests with it.
//!
//! One test in this file: it counts BPF objects kernel-wide, so nothing else
//! of ours may load in parallel.

use std::time::Duration;

use imds_guard_tests::{
    Outcome, addrs,
    daemon::ENFORCING,
    privileges::Privileges,
    refusal::refused_start,
    stage::{HTTP, Stage, World, case, eperm},
};

/// The first kernel that charges BPF maps to memory cgroups instead.
const FIRST_MEMCG_KERNEL: (u32, u32) = (5, 11);

/// What the daemon logs when it falls back to the copying egress program.
const EGRESS_COPYING: &str = "the egress program copies what it reads";

/// Refused starts in a row, as a crash loop makes them.
const REFUSED_STARTS: usize = 3;

/// Under TCG (the kernel matrix) the verifier alone can take many seconds;
/// a slow start is not what this test is about.
const START_TIMEOUT: Duration = Duration::from_mins(1);

/// (major, minor) of the running kernel.
fn kernel_version() -> (u32, u32) {
    let uname = nix::sys::utsname::uname().expect("uname");
    let release = uname.release().to_string_lossy().into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().expect("a kernel version number"));
    let major = numbers.next().expect("major version");
    let minor = numbers.next().expect("minor version");
    (major, minor)
}

#[test]
fn daemonset_privileges_enforce_or_refuse_naming_memlock_leaving_nothing() {
    let stage = Stage::set_up();
    let daemonset = Privileges::daemonset();
    let kernel = kernel_version();
    if kernel >= FIRST_MEMCG_KERNEL {
        let mut daemon = stage
            .daemon(&["--allow", "{allowed}"])
            .privileges(&daemonset)
            .spawn()
            .expect("spawn imds-guard");
        if let Err(err) = daemon.wait_for_log(ENFORCING, START_TIMEOUT) {
            panic!(
                "with the DaemonSet's privileges on kernel {kernel:?} imds-guard must start: {err}"
            );
        }
        assert_eq!(
            daemon.count_log(EGRESS_COPYING),
            0,
            "from 5.11 the egress program reads packets in place with the DaemonSet's grant:\n{}",
            daemon.log()
        );
        let world = World { daemon, stage };
        let tcp = case("tcp", addrs::METADATA_V4, HTTP);
        assert_eq!(world.attempt(&world.blocked, &tcp).outcome, eperm());
        assert_eq!(
            world.attempt(&world.allowed, &tcp).outcome,
            Outcome::Reached
        );
        return;
    }
    for attempt in 1..=REFUSED_STARTS {
        let log = refused_start(&stage, &daemonset, attempt);
        assert!(
            log.contains("RLIMIT_MEMLOCK") && log.contains("MiB"),
            "start {attempt}: the error must name RLIMIT_MEMLOCK and the need in MiB:\n{log}"
        );
    }
}
