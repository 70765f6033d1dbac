//! The BPF LSM on socket creation (`--refuse-packet-sockets on`, the
//! `packet-socket-lsm` overlay): `AF_PACKET` and `AF_XDP` sockets, whose
//! frames skip tc with `PACKET_QDISC_BYPASS` or XDP, are refused in the
//! protected subtree unless allowlisted, and untouched elsewhere.
//!
//! It needs the bpf LSM active (`lsm=...,bpf`), which this machine's kernel
//! does not allow (lockdown): the test is ignored in the host's run (shown
//! as ignored, not passed) and the kernel matrix runs it in its guests,
//! booted with the bpf LSM, with `--include-ignored` and the overlay's
//! grant (the DaemonSet's plus `CAP_PERFMON`). Run without the bpf LSM it
//! fails.

use imds_guard_tests::{
    Outcome, addrs,
    daemon::Daemon,
    stage::{World, case},
};

fn bpf_lsm_active() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .is_ok_and(|list| list.trim().split(',').any(|m| m == "bpf"))
}

#[test]
#[ignore = "needs the bpf LSM: the kernel matrix runs it in guests booted with lsm=...,bpf"]
fn packet_and_xdp_sockets_are_refused_in_the_subtree_unless_allowlisted() {
    assert!(
        bpf_lsm_active(),
        "the bpf LSM is not active here (/sys/kernel/security/lsm): this test runs in the \
         kernel matrix's guests, booted with lsm=...,bpf"
    );
    // Doctor, with the same grant, says the node can do it.
    let doctor = Daemon::command(["doctor", "--refuse-packet-sockets"])
        .output()
        .expect("run imds-guard doctor");
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        doctor.status.success() && report.contains("refusePacketSockets can be enforced here"),
        "{report}{}",
        String::from_utf8_lossy(&doctor.stderr)
    );
    let world = World::new(&["--allow", "{allowed}", "--refuse-packet-sockets", "on"]);
    for action in ["packet-socket", "xdp-socket"] {
        let made = |cgroup| {
            world
                .attempt(cgroup, &case(action, addrs::SERVER_V4, 0))
                .outcome
        };
        assert_eq!(
            made(&world.blocked),
            Outcome::Refused("EPERM".to_owned()),
            "{action} in the protected subtree"
        );
        assert_eq!(
            made(&world.allowed),
            Outcome::Reached,
            "{action}, allowlisted"
        );
        assert_eq!(
            made(&world.allowed_child),
            Outcome::Reached,
            "{action}, below the allowlisted cgroup"
        );
        assert_eq!(made(&world.outside), Outcome::Reached, "{action} outside");
    }
    assert!(
        world.daemon.log().contains("BPF LSM on socket_create"),
        "{}",
        world.daemon.log()
    );
}
