//! The real `imds-guard` binary under test, stopped on drop.

use std::{
    ffi::{OsStr, OsString},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::{Result, SandboxError, privileges::Privileges, probe::binary};

/// The line the daemon logs once its programs are attached.
pub const ENFORCING: &str = "imds-guard is enforcing";

/// Runs a short `imds-guard` command (`status`, `uninstall`) to the end and
/// returns its standard output; a failure carries its log.
pub fn run_to_end(args: &[&str]) -> Result<String> {
    Daemon::command(args).run_to_end()
}

/// How to start one `imds-guard`: which build, its arguments and extra
/// environment, and the privileges it runs with (by default the test run's,
/// the DaemonSet's unless `IMDS_GUARD_TEST_CAPS` says otherwise: see
/// [`crate::privileges`]). Made by [`Daemon::command`],
/// [`Daemon::standalone`] or [`Daemon::kubernetes`].
#[must_use]
pub struct DaemonBuilder {
    /// Another build of the daemon; `None` is the workspace's own.
    binary: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    privileges: Option<Privileges>,
    /// The network namespace to run it in (a node-shaped sandbox's node).
    netns: Option<std::path::PathBuf>,
}

impl DaemonBuilder {
    /// Appends arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Runs another build of the daemon (an upgrade's other side).
    pub fn binary(mut self, binary: &Path) -> Self {
        self.binary = Some(binary.to_owned());
        self
    }

    /// Sets a variable in the daemon's environment.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs it in this network namespace, as a hostNetwork DaemonSet pod
    /// runs in its node's (entered before the privileges are dropped).
    pub fn netns(mut self, netns: &crate::netns::Netns) -> Self {
        self.netns = Some(netns.path());
        self.env(NODE_GUARD_ENV, "on")
    }

    /// Runs it with these privileges instead of the test run's.
    pub fn privileges(mut self, privileges: &Privileges) -> Self {
        self.privileges = Some(privileges.clone());
        self
    }

    /// The command, with its privileges applied.
    fn command(self) -> Result<Command> {
        let binary = match self.binary {
            Some(binary) => binary,
            None => binary("imds-guard")?,
        };
        let privileges = match self.privileges {
            Some(privileges) => privileges,
            None => Privileges::from_env()?,
        };
        let mut command = Command::new(binary);
        command.args(&self.args).envs(self.env);
        if let Some(path) = &self.netns {
            let netns = std::fs::File::open(path).map_err(|source| SandboxError::Io {
                what: "opening",
                path: path.clone(),
                source,
            })?;
            // SAFETY: setns is async-signal-safe; the descriptor is moved
            // into the closure, so it stays open until the exec.
            unsafe {
                use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
                command.pre_exec(move || {
                    if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        privileges.apply(&mut command);
        Ok(command)
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(self) -> Result<Daemon> {
        let mut child = self
            .command()?
            .env("IMDS_GUARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| SandboxError::Process(format!("spawning imds-guard: {e}")))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| SandboxError::Process("no stderr".to_owned()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        Ok(Daemon { child, log })
    }

    /// Starts the daemon and waits until it says it is enforcing.
    pub fn start(self) -> Result<Daemon> {
        let mut daemon = self.spawn()?;
        daemon.wait_for_log(ENFORCING, START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Runs a short command to the end, whatever its exit: its status and
    /// both outputs.
    pub fn output(self) -> Result<std::process::Output> {
        let args = self.args.clone();
        self.command()?
            .output()
            .map_err(|e| SandboxError::Process(format!("running imds-guard {args:?}: {e}")))
    }

    /// Runs a short command to the end and returns its standard output; a
    /// failure carries its log.
    pub fn run_to_end(self) -> Result<String> {
        let args = self.args.clone();
        let output = self.output()?;
        if !output.status.success() {
            return Err(SandboxError::Process(format!(
                "imds-guard {args:?} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The node edge guard's switch. Off for daemons in this machine's own
/// namespace (their tc programs would land on its real interfaces); on in
/// the node of a node-shaped sandbox ([`DaemonBuilder::netns`]).
const NODE_GUARD_ENV: &str = "IMDS_GUARD_NODE_GUARD";

/// How long a start may take to reach [`ENFORCING`].
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// `imds-guard ARGS`.
    pub fn command<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> DaemonBuilder {
        DaemonBuilder {
            binary: None,
            args: Vec::new(),
            env: Vec::new(),
            privileges: None,
            netns: None,
        }
        .args(args)
    }

    /// `imds-guard standalone` protecting `cgroup`, pinning under `pins`;
    /// more arguments follow with [`DaemonBuilder::args`].
    pub fn standalone(cgroup: &Path, pins: &Path) -> DaemonBuilder {
        Daemon::command(["standalone"])
            .env(NODE_GUARD_ENV, "off")
            .args([OsStr::new("--cgroup"), cgroup.as_os_str()])
            .args([OsStr::new("--bpffs-dir"), pins.as_os_str()])
    }

    /// `imds-guard run` for `node` on a fake node's cgroup `root`, pinning
    /// under `pins` and talking to the API server `kubeconfig` names.
    pub fn kubernetes(node: &str, root: &Path, pins: &Path, kubeconfig: &Path) -> DaemonBuilder {
        Daemon::command(["run", "--node-name", node])
            .env(NODE_GUARD_ENV, "off")
            .args([OsStr::new("--cgroup-root"), root.as_os_str()])
            .args([OsStr::new("--bpffs-dir"), pins.as_os_str()])
            .env("KUBECONFIG", kubeconfig)
    }

    /// `imds-guard ARGS`, started without waiting for anything.
    pub fn spawn(args: &[&str]) -> Result<Daemon> {
        Daemon::command(args).spawn()
    }

    /// `imds-guard ARGS`, started and enforcing.
    pub fn start(args: &[&str]) -> Result<Daemon> {
        Daemon::command(args).start()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the daemon serves HTTP on, from its log.
    pub fn http_address(&mut self) -> Result<std::net::SocketAddr> {
        const SERVING: &str = "serving /metrics";
        self.wait_for_log(SERVING, Duration::from_secs(10))?;
        let log = self.log();
        log.lines()
            .filter(|l| l.contains(SERVING))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("address="))
                    .and_then(|a| a.parse().ok())
            })
            .ok_or_else(|| SandboxError::Process(format!("no address in the log:\n{log}")))
    }

    /// `GET path` on the daemon's HTTP address: (status code, body).
    pub fn http_get(&mut self, path: &str) -> Result<(u16, String)> {
        crate::http::get(self.http_address()?, path, Duration::from_secs(5))
    }

    /// The value of the metric line that starts with `series` (name and
    /// labels as exposed), or 0 when there is none.
    pub fn metric(&mut self, series: &str) -> Result<f64> {
        let (_, body) = self.http_get("/metrics")?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Waits until the metric reaches `at_least` (up to ten seconds) and
    /// returns its value then, which may still be lower.
    pub fn metric_reaching(&mut self, series: &str, at_least: f64) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(series)?;
            if value >= at_least || Instant::now() > deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// How many log lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .map_or(0, |l| l.iter().filter(|line| line.contains(needle)).count())
    }

    /// Waits until the log has a line containing `needle`; fails if the
    /// daemon exits first or time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until `count` log lines contain `needle`.
    pub fn wait_for_log_count(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_log(needle) >= count {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                return Err(SandboxError::Process(format!(
                    "imds-guard exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Process(format!(
                    "imds-guard did not log {needle:?} {count} time(s) within {timeout:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(Pid::from_raw(self.child.id().cast_signed()), signal)
            .map_err(|e| SandboxError::Process(format!("signalling imds-guard: {e}")))
    }

    /// Waits for the daemon to exit by itself (e.g. after a bad argument).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Process(format!(
                    "imds-guard still running after {timeout:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as a crash would, then waits for the exit.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && self.stop().is_err()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
