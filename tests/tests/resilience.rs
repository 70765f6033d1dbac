//! Never fail open: enforcement held across crashes, restarts and upgrades,
//! bad configurations rejected without touching what runs, and a clean
//! uninstall. Every claim is checked by traffic, not by log.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use imds_guard_tests::{
    Daemon, Outcome, PinDir, Tally, TempFile, addrs,
    stage::{HTTP, World, case, eperm},
};
use nix::sys::signal::Signal;

const METADATA: IpAddr = IpAddr::V4(addrs::METADATA_V4);
/// How often the load loops try: every few milliseconds.
const ATTEMPT_EVERY: Duration = Duration::from_millis(5);

/// Runs `disrupt` while the blocked and the allowed cgroup each try to
/// reach the metadata server every few milliseconds, then checks that the
/// blocked one never got through and the allowed one never failed.
fn under_load(world: &mut World, load_for: Duration, disrupt: impl FnOnce(&mut World)) {
    let blocked = world
        .probe(&world.blocked)
        .spawn_loop(METADATA, HTTP, ATTEMPT_EVERY, load_for)
        .expect("blocked loop");
    let allowed = world
        .probe(&world.allowed)
        .spawn_loop(METADATA, HTTP, ATTEMPT_EVERY, load_for)
        .expect("allowed loop");
    disrupt(world);
    let blocked: Tally = blocked.finish().expect("blocked tally");
    let allowed: Tally = allowed.finish().expect("allowed tally");
    assert_eq!(
        blocked.reached, 0,
        "the blocked cgroup got through: {blocked:?}"
    );
    assert!(
        blocked.refused > 100,
        "too few attempts to mean anything: {blocked:?}"
    );
    assert_eq!(
        allowed.reached,
        allowed.attempts(),
        "the allowed cgroup was refused: {allowed:?}"
    );
    assert!(
        allowed.reached > 100,
        "too few attempts to mean anything: {allowed:?}"
    );
}

#[test]
fn sigkill_and_restart_ten_times_under_load() {
    let mut world = World::default_allow();
    under_load(&mut world, Duration::from_secs(8), |world| {
        for round in 0..10 {
            world.daemon.kill().expect("SIGKILL");
            world.restart(None, &["--allow", "{allowed}"]);
            assert!(
                world.daemon.log().contains("adopted the pinned programs"),
                "round {round}: not adopted:\n{}",
                world.daemon.log()
            );
        }
    });
    assert_eq!(
        world.pins.generations().len(),
        1,
        "{:?}",
        world.pins.generations()
    );
}

/// The second build of the daemon, whose eBPF object differs (see
/// `BUILD_VARIANT` in the eBPF crate); `cargo xtask test` builds it.
fn variant_binary() -> PathBuf {
    let dir = std::env::var_os("IMDS_GUARD_VARIANT_BIN_DIR").expect(
        "IMDS_GUARD_VARIANT_BIN_DIR is not set: run `cargo xtask test`, which builds the second build",
    );
    let binary = Path::new(&dir).join("imds-guard");
    assert!(binary.is_file(), "{} is missing", binary.display());
    binary
}

#[test]
fn upgrade_and_downgrade_between_two_builds_under_load() {
    let variant = variant_binary();
    let mut world = World::default_allow();
    let first = world.pins.generations();
    under_load(&mut world, Duration::from_secs(6), |world| {
        for binary in [Some(variant.as_path()), None, Some(variant.as_path())] {
            world.daemon.stop().expect("SIGTERM");
            world.restart(binary, &["--allow", "{allowed}"]);
            let log = world.daemon.log();
            assert!(log.contains("attached and pinned new programs"), "{log}");
            assert!(
                log.contains("carried_from=\"g-"),
                "state not carried over:\n{log}"
            );
            assert_eq!(
                world.pins.generations().len(),
                1,
                "{:?}",
                world.pins.generations()
            );
        }
    });
    assert_ne!(world.pins.generations(), first, "the object did not change");
}

#[test]
fn bad_configurations_change_nothing_and_good_ones_apply() {
    let config = TempFile::new("config", "mode: enforce\npresets: [gcp]\n").expect("config");
    let config_arg = config.arg();
    let args = ["--allow", "{allowed}", "--config", &config_arg];
    let mut world = World::new(&args);
    let tcp = case("tcp", addrs::METADATA_V4, HTTP);
    let pod_identity = case("tcp", addrs::POD_IDENTITY_V4, HTTP);
    let check = |world: &World, pod_identity_open: bool| {
        assert_eq!(world.attempt(&world.blocked, &tcp).outcome, eperm());
        assert_eq!(
            world.attempt(&world.allowed, &tcp).outcome,
            Outcome::Reached
        );
        let want = if pod_identity_open {
            Outcome::Reached
        } else {
            eperm()
        };
        assert_eq!(world.attempt(&world.blocked, &pod_identity).outcome, want);
    };
    check(&world, true);

    // At start: the pinned enforcement stays exactly as it was.
    world.daemon.stop().expect("SIGTERM");
    config
        .write("mode: enforce\npresets: [gcp]\ndeny: [\"169.254.169.254/40\"]\n")
        .expect("write config");
    let mut refused = world.daemon(&args).spawn().expect("spawn");
    let status = refused.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    assert!(
        refused
            .log()
            .contains("deny[0]: rule \"169.254.169.254/40\""),
        "{}",
        refused.log()
    );
    check(&world, true);

    // At reload: rejected, the old configuration stays.
    config
        .write("mode: enforce\npresets: [gcp]\n")
        .expect("write config");
    world.restart(None, &args);
    config
        .write("mode: enforce\npresets: [gcp]\nlimits: {minPrefixLengthV4: 99}\n")
        .expect("write config");
    world
        .daemon
        .wait_for_log("configuration not reloaded", Duration::from_secs(5))
        .expect("the bad file is noticed and rejected");
    assert!(
        world.daemon.log().contains("limits.minPrefixLengthV4: 99"),
        "{}",
        world.daemon.log()
    );
    check(&world, true);

    // A good change applies, on change of the file and on SIGHUP alike.
    config
        .write("mode: enforce\npresets: [gcp]\ndeny: [\"169.254.170.23/32\"]\npass: []\n")
        .expect("write config");
    world
        .daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(5))
        .expect("the good file applies");
    check(&world, false);
    config
        .write("mode: enforce\npresets: [gcp]\n")
        .expect("write config");
    world.daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    world
        .daemon
        .wait_for_log_count("configuration reloaded", 2, Duration::from_secs(5))
        .expect("SIGHUP reloads");
    check(&world, true);
}

#[test]
fn uninstall_removes_everything_of_ours_and_nothing_else() {
    let mut world = World::default_allow();
    // A second installation, protecting another cgroup with its own pins.
    let other_pins = PinDir::new("other");
    let mut other = Daemon::standalone(&world.outside, other_pins.path())
        .start()
        .expect("second installation");
    other.stop().expect("SIGTERM");
    // Something not ours, inside our pin directory.
    let foreign = world.pins.path().join("not-ours");
    std::fs::create_dir(&foreign).expect("foreign entry");
    world.daemon.stop().expect("SIGTERM");

    let tcp = case("tcp", addrs::METADATA_V4, HTTP);
    assert_eq!(world.attempt(&world.blocked, &tcp).outcome, eperm());
    assert_eq!(world.attempt(&world.outside, &tcp).outcome, eperm());

    let ours = world.pins.path().display().to_string();
    let mut uninstall = Daemon::spawn(&["uninstall", "--bpffs-dir", &ours]).expect("uninstall");
    let status = uninstall.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{}", uninstall.log());
    assert!(uninstall.log().contains("not-ours"), "{}", uninstall.log());

    assert_eq!(world.pins.entries(), ["not-ours"]);
    assert_eq!(
        world.attempt(&world.blocked, &tcp).outcome,
        Outcome::Reached
    );
    // The other installation is untouched.
    assert_eq!(world.attempt(&world.outside, &tcp).outcome, eperm());
    assert_eq!(other_pins.generations().len(), 1);
}
