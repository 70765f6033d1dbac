//! The real `imds-guard` binary under test, stopped on drop.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
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
    let mut command = Command::new(binary("imds-guard")?);
    Privileges::from_env()?.apply(&mut command);
    let output = command
        .args(args)
        .output()
        .map_err(|e| SandboxError::Process(format!("running imds-guard {args:?}: {e}")))?;
    if !output.status.success() {
        return Err(SandboxError::Process(format!(
            "imds-guard {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `imds-guard ARGS` without waiting for anything.
    pub fn spawn(args: &[&str]) -> Result<Daemon> {
        Daemon::spawn_binary(&binary("imds-guard")?, args)
    }

    /// Starts another build of the daemon (`binary ARGS`), without waiting.
    pub fn spawn_binary(binary: &Path, args: &[&str]) -> Result<Daemon> {
        let mut command = Command::new(binary);
        command.args(args);
        Daemon::launch(command)
    }

    /// Starts `imds-guard ARGS` with these privileges instead of the test
    /// run's, without waiting.
    pub fn spawn_with(privileges: &Privileges, args: &[&str]) -> Result<Daemon> {
        let mut command = Command::new(binary("imds-guard")?);
        command.args(args);
        Daemon::launch_with(command, privileges)
    }

    /// Starts `imds-guard run` for `node` on a fake node's cgroup `root`,
    /// pinning under `pins` and talking to the API server `kubeconfig`
    /// names, with `extra` arguments; waits until it says it is enforcing.
    pub fn start_kubernetes(
        node: &str,
        root: &Path,
        pins: &Path,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<Daemon> {
        let root = root.display().to_string();
        let pins = pins.display().to_string();
        let kubeconfig = kubeconfig.display().to_string();
        let mut args = vec![
            "run",
            "--node-name",
            node,
            "--cgroup-root",
            &root,
            "--bpffs-dir",
            &pins,
        ];
        args.extend_from_slice(extra);
        Daemon::start_with_env(&args, &[("KUBECONFIG", &kubeconfig)])
    }

    /// Starts `imds-guard ARGS` with extra environment (e.g. KUBECONFIG) and
    /// waits until it says it is enforcing.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let mut command = Command::new(binary("imds-guard")?);
        command.args(args).envs(env.iter().copied());
        let mut daemon = Daemon::launch(command)?;
        daemon.wait_for_log(ENFORCING, Duration::from_secs(20))?;
        Ok(daemon)
    }

    /// Every daemon runs with the test run's privileges (by default the
    /// DaemonSet's: see [`crate::privileges`]).
    fn launch(command: Command) -> Result<Daemon> {
        Daemon::launch_with(command, &Privileges::from_env()?)
    }

    fn launch_with(mut command: Command, privileges: &Privileges) -> Result<Daemon> {
        privileges.apply(&mut command);
        let mut child = command
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

    /// Starts `imds-guard ARGS` and waits until it says it is enforcing.
    pub fn start(args: &[&str]) -> Result<Daemon> {
        Daemon::start_binary(&binary("imds-guard")?, args)
    }

    /// Starts `binary ARGS` and waits until it says it is enforcing.
    pub fn start_binary(binary: &Path, args: &[&str]) -> Result<Daemon> {
        let mut daemon = Daemon::spawn_binary(binary, args)?;
        daemon.wait_for_log(ENFORCING, Duration::from_secs(20))?;
        Ok(daemon)
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
        use std::io::{Read as _, Write as _};
        let address = self.http_address()?;
        let fail = |e: std::io::Error| SandboxError::Process(format!("GET {path}: {e}"));
        let mut stream =
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(fail)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(fail)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .map_err(fail)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(fail)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
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
            .map(|l| l.iter().filter(|line| line.contains(needle)).count())
            .unwrap_or(0)
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
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal)
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
