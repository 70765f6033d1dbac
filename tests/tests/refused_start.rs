//! A start that fails part-way leaves nothing behind (see
//! `imds_guard_tests::refusal`), and says why.
//!
//! One test in this file: it counts BPF objects kernel-wide, so nothing
//! else of ours may load in parallel.

use std::{ffi::OsStr, path::Path};

use imds_guard_tests::{
    Daemon, TempFile, TestCgroup,
    privileges::{BPF_LINK_CREATE, BPF_PROG_ATTACH, BpfFilter, Privileges},
    refusal::{ours_loaded, refused, refused_start},
    stage::Stage,
};

fn filtered(filter: BpfFilter) -> Privileges {
    Privileges {
        bpf_filter: filter,
        ..Privileges::from_env().expect("test privileges")
    }
}

#[test]
fn refused_starts_leave_no_maps_programs_or_pins_behind() {
    let stage = Stage::set_up();
    let before = ours_loaded();

    // Refused at attach: every map and program exists by then.
    let at_attach = filtered(BpfFilter::Refuse(vec![BPF_LINK_CREATE, BPF_PROG_ATTACH]));
    for attempt in 1..=3 {
        let log = refused_start(&stage, &at_attach, attempt);
        assert!(
            log.contains("attaching imds_guard_egress") && log.contains("Operation not permitted"),
            "the error names what failed:\n{log}"
        );
    }

    // Refused at the first map, as a seccomp profile without the bpf rule
    // does: the error says so instead of blaming capabilities.
    let log = refused_start(&stage, &filtered(BpfFilter::RefuseAll), 4);
    assert!(
        log.contains("seccomp filter refuses the bpf system call"),
        "the error names seccomp:\n{log}"
    );
    assert!(
        !log.contains("needs root"),
        "no hint about what is not missing:\n{log}"
    );

    // `run` makes its API client before it loads anything: a kubeconfig
    // that cannot be read, parsed or used (no current context) refuses the
    // start, naming the file. The fake node has a pod subtree, so nothing
    // else stands in the way.
    let mut node = TestCgroup::new("node").expect("node cgroup root");
    node.child("kubepods.slice").expect("pod subtree");
    let unparsable = TempFile::new("kubeconfig", "clusters: [unclosed\n").expect("kubeconfig");
    let unusable = TempFile::new("kubeconfig", "{}\n").expect("kubeconfig");
    let kubeconfigs = [
        Path::new("/nonexistent/imds-guard/kubeconfig"),
        unparsable.path(),
        unusable.path(),
    ];
    for (attempt, kubeconfig) in (5..).zip(kubeconfigs) {
        let daemon = Daemon::kubernetes("node-1", node.path(), stage.pins.path(), kubeconfig)
            .args([OsStr::new("--kubeconfig"), kubeconfig.as_os_str()]);
        let log = refused(&stage, daemon, attempt);
        let named = format!("kubeconfig {}", kubeconfig.display());
        assert!(log.contains(&named), "the error names {named:?}:\n{log}");
    }

    // Refusing packet sockets needs the BPF LSM, a tracing program type:
    // without CAP_PERFMON the start is refused, naming it and the overlay.
    let log = refused(&stage, stage.daemon(&["--refuse-packet-sockets", "on"]), 8);
    assert!(
        log.contains("CAP_PERFMON") && log.contains("packet-socket-lsm"),
        "the error names the capability and the overlay:\n{log}"
    );

    // The same privileges without the filter start, and then the objects
    // are there: the count can see them.
    let _daemon = stage
        .daemon(&[])
        .start()
        .expect("starts without the filter");
    let (maps, programs) = ours_loaded();
    assert!(
        maps >= before.0 + 7 && programs >= before.1 + 5,
        "{before:?} -> {:?}",
        (maps, programs)
    );
}
