//! Booting a guest: its /init, qemu (TCG, no network device at all), and
//! reading what the guest printed on its serial console.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{GUEST_BIN_DIR, GUEST_TEST_DIR, Run};
use crate::interrupt::interrupted;

/// Starts every line the guest's /init prints for us.
const MARKER: &str = "@@imds-guard-matrix";

/// The traffic tests wait on timeouts more than they compute: two threads
/// finish in two thirds of the time of one under TCG; four gain nothing.
const TEST_THREADS: u32 = 2;

/// The bpf LSM active, as later checks need it; lockdown stays off (no
/// Secure Boot), so BPF is not restricted.
const CMDLINE: &str =
    "console=ttyS0 panic=-1 rdinit=/init lsm=lockdown,capability,landlock,yama,apparmor,bpf";

/// The guest's PID 1: mounts what the tests need, loads `modules`, runs
/// each run's tests between markers, and powers off.
pub fn init_script(modules: &[&str], runs: &[Run]) -> String {
    let mut script = format!(
        r#"#!/bin/sh
# Written by `cargo xtask kernels`: PID 1 of a matrix guest.
export PATH=/usr/sbin:/usr/bin TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns
# Kernel messages would cut into the test output on the same console.
dmesg -n 1
ip link set lo up
for module in {modules}; do
    case $module in
    \?*) modprobe -q "${{module#\?}}" || true ;;
    *) modprobe "$module" || echo "{MARKER} error modprobe $module failed" ;;
    esac
done
echo "{MARKER} guest $(uname -r) $(stat -fc %T /sys/fs/cgroup)"
failed=0
cd /tmp
run() {{
    id=$1 test=$2
    shift 2
    echo "{MARKER} begin $id $test"
    start=$(date +%s)
    env IMDS_GUARD_BIN_DIR={GUEST_BIN_DIR} "$@" {GUEST_TEST_DIR}/$test \
        --test-threads={TEST_THREADS} --include-ignored --color=never 2>&1
    status=$?
    [ $status -eq 0 ] || failed=1
    echo "{MARKER} end $id $test exit=$status seconds=$(( $(date +%s) - start ))"
}}
"#,
        // Quoted: `?name` would be a glob.
        modules = modules
            .iter()
            .map(|m| format!("'{m}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for run in runs {
        let env = run
            .grant
            .caps_env()
            .map(|caps| format!(" IMDS_GUARD_TEST_CAPS={caps}"))
            .unwrap_or_default();
        for test in run.tests {
            let _ = writeln!(script, "run {} {test}{env}", run.id);
        }
    }
    let _ = write!(
        script,
        r#"if [ $failed -ne 0 ]; then
    echo "{MARKER} kernel log follows"
    dmesg
fi
echo "{MARKER} done"
echo o > /proc/sysrq-trigger
sleep 60
"#
    );
    script
}

/// What one guest did.
pub struct Boot {
    pub console: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Boot {
    /// The kernel died before our init ran a single line: a boot failure of
    /// the emulator (multi-threaded TCG's cross-CPU code patching panicked a
    /// guest here at boot), not anything the tests did.
    pub fn died_before_init(&self) -> bool {
        self.console.contains("Kernel panic") && !self.console.contains(MARKER)
    }
}

/// Boots `vmlinuz` with `initrd` until the guest powers off, killing it
/// after `timeout`; the console goes to `log`.
pub fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, timeout: Duration) -> anyhow::Result<Boot> {
    let console =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        // Two vCPUs (per-CPU maps must see more than one), run by one host
        // thread: with multi-threaded TCG, the kernel's cross-CPU code
        // patching (int3, then the new bytes; static keys flip when cgroup
        // BPF programs come and go) raced the other vCPU's translated code
        // and oopsed 7.3.4 twice, once at boot, once in ip6_finish_output.
        .args(["-accel", "tcg,thread=single", "-cpu", "max"])
        .args(["-m", "2G", "-smp", "2"])
        // No network device of any kind: the guest's only links are the
        // veth pairs the tests make.
        .args(["-nographic", "-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let timed_out = loop {
        if qemu.try_wait()?.is_some() {
            break false;
        }
        if started.elapsed() > timeout {
            break true;
        }
        if let Err(err) = interrupted() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if timed_out {
        let _ = qemu.kill();
        let _ = qemu.wait();
    }
    let console = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(Boot {
        console: String::from_utf8_lossy(&console).into_owned(),
        elapsed: started.elapsed(),
        timed_out,
    })
}

/// One test executable's run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestOutcome {
    pub passed: u32,
    pub failed: u32,
    /// libtest printed its summary line.
    pub summarized: bool,
    /// `None` until the end marker came.
    pub exit: Option<i32>,
    pub seconds: u64,
}

/// What the guest reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Console {
    /// `uname -r` and the file system type at /sys/fs/cgroup.
    pub guest: Option<(String, String)>,
    /// By (run id, test).
    pub outcomes: BTreeMap<(String, String), TestOutcome>,
    pub errors: Vec<String>,
    pub done: bool,
}

pub fn parse_console(text: &str) -> Console {
    let mut console = Console::default();
    let mut current: Option<(String, String)> = None;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        let Some(marker) = line.strip_prefix(MARKER) else {
            if let (Some(key), Some(summary)) = (&current, line.strip_prefix("test result: ")) {
                let outcome = console.outcomes.entry(key.clone()).or_default();
                outcome.summarized = true;
                for part in summary.split([';', '.']).map(str::trim) {
                    let count = |word: &str| part.strip_suffix(word)?.trim().parse::<u32>().ok();
                    outcome.passed += count(" passed").unwrap_or(0);
                    outcome.failed += count(" failed").unwrap_or(0);
                }
            }
            continue;
        };
        let words: Vec<&str> = marker.split_whitespace().collect();
        match words.as_slice() {
            ["guest", release, cgroup] => {
                console.guest = Some(((*release).to_owned(), (*cgroup).to_owned()));
            }
            ["begin", run_id, test_name] => {
                let key = ((*run_id).to_owned(), (*test_name).to_owned());
                console.outcomes.insert(key.clone(), TestOutcome::default());
                current = Some(key);
            }
            ["end", run_id, test_name, rest @ ..] => {
                let key = ((*run_id).to_owned(), (*test_name).to_owned());
                let field = |name: &str| rest.iter().find_map(|w| w.strip_prefix(name));
                let outcome = console.outcomes.entry(key).or_default();
                outcome.exit = field("exit=").and_then(|v| v.parse().ok());
                outcome.seconds = field("seconds=").and_then(|v| v.parse().ok()).unwrap_or(0);
                current = None;
            }
            ["error", rest @ ..] => console.errors.push(rest.join(" ")),
            ["done"] => console.done = true,
            _ => {}
        }
    }
    console
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::plan;

    #[test]
    fn init_runs_each_test_with_its_grant_and_is_valid_shell() {
        let script = init_script(&["veth"], &plan("5.10.223").unwrap());
        for line in [
            "run root standalone IMDS_GUARD_TEST_CAPS=all\n",
            // The DaemonSet's grant is the harness's default: no variable.
            "run daemonset privileges\n",
            "run overlay standalone IMDS_GUARD_TEST_CAPS=bpf,net_admin,sys_resource\n",
        ] {
            assert!(script.contains(line), "{line:?} in:\n{script}");
        }
        let checked = Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .expect("sh");
        assert!(checked.success(), "{script}");
    }

    #[test]
    fn a_panic_before_init_is_told_from_one_during_the_tests() {
        let boot = |console: &str| Boot {
            console: console.to_owned(),
            elapsed: Duration::from_secs(3),
            timed_out: false,
        };
        assert!(boot("[1.19] Kernel panic - not syncing: Fatal exception").died_before_init());
        let later = format!("{MARKER} guest 7.3.4 cgroup2fs\n[40.1] Kernel panic - not syncing");
        assert!(!boot(&later).died_before_init());
        assert!(!boot("no panic, no marker").died_before_init());
    }

    #[test]
    fn markers_and_libtest_summaries_become_outcomes() {
        let text = "[    5.1] Run /init as init process\r\n\
            @@imds-guard-matrix guest 5.10.0-32-amd64 cgroup2fs\r\n\
            @@imds-guard-matrix error modprobe veth failed\n\
            @@imds-guard-matrix begin root standalone\n\
            test a ... ok\n\
            test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 44.07s\n\
            @@imds-guard-matrix end root standalone exit=0 seconds=45\n\
            @@imds-guard-matrix begin daemonset privileges\n\
            test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.5s\n\
            @@imds-guard-matrix end daemonset privileges exit=101 seconds=3\n\
            test result: ok. 99 passed; 0 failed;\n\
            @@imds-guard-matrix begin daemonset standalone\n\
            test a ... ";
        let console = parse_console(text);
        assert_eq!(
            console.guest,
            Some(("5.10.0-32-amd64".to_owned(), "cgroup2fs".to_owned()))
        );
        assert_eq!(console.errors, ["modprobe veth failed"]);
        assert!(!console.done);
        let outcome =
            |run: &str, test: &str| console.outcomes[&(run.to_owned(), test.to_owned())].clone();
        assert_eq!(
            outcome("root", "standalone"),
            TestOutcome {
                passed: 12,
                failed: 0,
                summarized: true,
                exit: Some(0),
                seconds: 45
            }
        );
        assert_eq!(
            outcome("daemonset", "privileges"),
            TestOutcome {
                passed: 0,
                failed: 1,
                summarized: true,
                exit: Some(101),
                seconds: 3
            }
        );
        // Started, never finished: the guest stopped in the middle.
        assert_eq!(outcome("daemonset", "standalone"), TestOutcome::default());
        assert!(parse_console("@@imds-guard-matrix done\r\n").done);
    }
}
