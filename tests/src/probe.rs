//! Running `imds-probe` clients inside a cgroup and a namespace of ours, and
//! reading what happened.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader},
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::Duration,
};

use crate::{Result, SandboxError, netns::Netns};

/// A workspace binary (`imds-guard`, `imds-probe`, `imds-bench-traffic`):
/// from `IMDS_GUARD_BIN_DIR` when it is set (`cargo xtask test`, demo and
/// bench build them first; the kernel matrix's guests have no cargo), else
/// as cargo builds it now, once per test process. Cargo's fingerprints, not
/// file times, decide what is out of date (the daemon embeds the eBPF
/// object its build script compiles, and features and variants count too),
/// so a plain `cargo test` never runs a stale `target/debug/imds-guard`; a
/// build with nothing to do takes a fraction of a second. Cargo has
/// released the target directory's lock by the time it runs tests, and the
/// build takes it, so this waits for any other build of the same directory.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = if let Some(dir) = std::env::var_os("IMDS_GUARD_BIN_DIR") {
        PathBuf::from(dir).join(name)
    } else {
        static BUILT: OnceLock<Result<BTreeMap<String, PathBuf>, String>> = OnceLock::new();
        let built = BUILT
            .get_or_init(build_binaries)
            .as_ref()
            .map_err(|e| SandboxError::Process(e.clone()))?;
        built
            .get(name)
            .cloned()
            .ok_or_else(|| SandboxError::Process(format!("cargo built no binary named {name}")))?
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(SandboxError::Process(format!(
            "{} not found: IMDS_GUARD_BIN_DIR names a directory without it \
             (`cargo build -p enforcer-user -p imds-guard-tests --bins` fills one)",
            path.display()
        )))
    }
}

/// Builds the daemon and the sandbox's binaries with the cargo and the
/// profile this test binary was built with; returns them by name.
fn build_binaries() -> Result<BTreeMap<String, PathBuf>, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--profile",
        ])
        .arg(own_profile())
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "enforcer-user", "-p", "imds-guard-tests", "--bins"])
        // Cargo's progress and errors go where the test's output goes.
        .stderr(Stdio::inherit());
    // What cargo sets for the running test crate is no setting of the
    // user's: build scripts that watch such a variable (ring's watches
    // CARGO_PKG_NAME) would rerun, here and again in the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || CRATE_ENV.contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    let described = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("running {described}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{described} failed ({}): see its errors above",
            output.status
        ));
    }
    // One JSON message a line; an executable artifact names its file.
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|message| {
            let name = message.pointer("/target/name")?.as_str()?.to_owned();
            let executable = message.get("executable")?.as_str()?;
            Some((name, PathBuf::from(executable)))
        })
        .collect())
}

/// The variables besides `CARGO_PKG_*` and `CARGO_BIN_EXE_*` that cargo
/// sets for a crate it runs (its reference, "Environment variables Cargo
/// sets for crates").
const CRATE_ENV: [&str; 8] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

/// The cargo profile of the running executable, from the directory it is
/// in (`<target>/<profile dir>/deps/`; `debug` is the `dev` profile's).
fn own_profile() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().unwrap_or_else(|| Path::new(""));
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    match dir.file_name().and_then(|name| name.to_str()) {
        None | Some("debug") => "dev".to_owned(),
        Some(profile) => profile.to_owned(),
    }
}

/// Spawns `command` as a member of `cgroup` (when given), inside `netns`.
/// The cgroup is joined first: entering the namespace first would not change
/// the cgroup, but the order keeps the child's first instant accounted to it.
pub fn spawn_in(command: &mut Command, netns: &Netns, cgroup: Option<&Path>) -> Result<Child> {
    let ns = netns.open()?;
    let procs: Option<File> = cgroup
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| SandboxError::Io {
                    what: "opening",
                    path,
                    source,
                })
        })
        .transpose()?;
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (write, setns) on descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|e| {
        SandboxError::Process(format!("spawning {}: {e}", command.get_program().display()))
    })
}

/// What one probe attempt ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered.
    Reached,
    /// The socket call failed with this errno name (e.g. "EPERM").
    Refused(String),
    /// Nothing came back in time.
    TimedOut,
    /// The probe itself failed.
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// Other `key=value` fields of the line (e.g. `sends`).
    pub fields: BTreeMap<String, String>,
}

impl ProbeResult {
    fn parse(line: &str) -> Result<ProbeResult> {
        let fields: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let outcome = match get("outcome").as_str() {
            "reached" => Outcome::Reached,
            "refused" => Outcome::Refused(get("errno")),
            "timeout" => Outcome::TimedOut,
            "error" => Outcome::Failed(get("message")),
            _ => {
                return Err(SandboxError::Process(format!(
                    "unreadable probe line {line:?}"
                )));
            }
        };
        let elapsed = Duration::from_micros(get("elapsed_us").parse().unwrap_or(0));
        Ok(ProbeResult {
            outcome,
            elapsed,
            fields,
        })
    }
}

/// A client in the sandbox: a network namespace and, optionally, a cgroup.
pub struct Probe<'a> {
    pub netns: &'a Netns,
    pub cgroup: Option<&'a Path>,
}

/// `imds-probe ACTION ADDR PORT`.
fn probe_command(action: &str, addr: IpAddr, port: u16) -> Result<Command> {
    let mut command = Command::new(binary("imds-probe")?);
    command.args([action, &addr.to_string(), &port.to_string()]);
    Ok(command)
}

impl Probe<'_> {
    /// Makes one attempt (`tcp`, `udp`, `udp-connected`, `ping`, `raw-udp`,
    /// `fragments`) and returns what happened.
    pub fn attempt(
        &self,
        action: &str,
        addr: IpAddr,
        port: u16,
        extra: &[&str],
    ) -> Result<ProbeResult> {
        let mut command = probe_command(action, addr, port)?;
        command
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in(&mut command, self.netns, self.cgroup)?;
        let output = child
            .wait_with_output()
            .map_err(|e| SandboxError::Process(format!("waiting for imds-probe: {e}")))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().ok_or_else(|| {
            SandboxError::Process(format!(
                "imds-probe {action} {addr} {port} printed nothing ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        })?;
        ProbeResult::parse(line)
    }

    /// Starts TCP attempts every `interval` for `duration` (`loop`).
    pub fn spawn_loop(
        &self,
        addr: IpAddr,
        port: u16,
        interval: Duration,
        duration: Duration,
    ) -> Result<LoopProbe> {
        self.spawn_loop_with(addr, port, interval, duration, &[])
    }

    /// Back-to-back TCP attempts until `count` are made or `duration` ends.
    pub fn spawn_flood(
        &self,
        addr: IpAddr,
        port: u16,
        count: u32,
        duration: Duration,
    ) -> Result<LoopProbe> {
        let count = count.to_string();
        self.spawn_loop_with(addr, port, Duration::ZERO, duration, &["--count", &count])
    }

    fn spawn_loop_with(
        &self,
        addr: IpAddr,
        port: u16,
        interval: Duration,
        duration: Duration,
        extra: &[&str],
    ) -> Result<LoopProbe> {
        let mut command = probe_command("loop", addr, port)?;
        command
            .args([
                "--interval-ms",
                &interval.as_millis().to_string(),
                "--duration-ms",
                &duration.as_millis().to_string(),
                "--timeout-ms",
                "1000",
            ])
            .args(extra)
            .stdout(Stdio::piped());
        let child = spawn_in(&mut command, self.netns, self.cgroup)?;
        Ok(LoopProbe { child })
    }

    /// Starts a long-lived TCP exchange (`stream`); its lines arrive on the
    /// returned channel.
    pub fn stream(&self, addr: IpAddr, port: u16, count: u32) -> Result<StreamProbe> {
        let mut command = probe_command("stream", addr, port)?;
        command
            .args(["--count", &count.to_string()])
            .stdout(Stdio::piped());
        let mut child = spawn_in(&mut command, self.netns, self.cgroup)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SandboxError::Process("no stdout".to_owned()))?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(StreamProbe { child, lines })
    }
}

/// How a `loop` probe's attempts ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub reached: u32,
    pub refused: u32,
    pub timeout: u32,
    pub error: u32,
}

impl Tally {
    pub fn attempts(&self) -> u32 {
        self.reached + self.refused + self.timeout + self.error
    }
}

/// A running `loop` probe: TCP attempts every few milliseconds.
pub struct LoopProbe {
    child: Child,
}

impl LoopProbe {
    /// Waits for the loop to end and reads its tally.
    pub fn finish(self) -> Result<Tally> {
        let mut child = self.child;
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
        }
        let _ = child.wait();
        let mut tally = Tally::default();
        for (key, value) in stdout.split_whitespace().filter_map(|w| w.split_once('=')) {
            let value = value.parse().unwrap_or(0);
            match key {
                "reached" => tally.reached = value,
                "refused" => tally.refused = value,
                "timeout" => tally.timeout = value,
                "error" => tally.error = value,
                _ => {}
            }
        }
        if tally.attempts() == 0 {
            return Err(SandboxError::Process(format!(
                "loop probe printed no tally: {stdout:?}"
            )));
        }
        Ok(tally)
    }
}

/// A running `stream` probe, killed on drop.
pub struct StreamProbe {
    child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for StreamProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fake metadata (and ordinary) server: echoes on the given TCP and UDP
/// ports on every sandbox server address. Killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn start(netns: &Netns, ports: &[u16]) -> Result<Server> {
        let mut command = Command::new(binary("imds-probe")?);
        command.arg("serve");
        for port in ports {
            command.args(["--port", &port.to_string()]);
        }
        for addr in crate::addrs::server_addrs() {
            command.args(["--udp-addr", &addr.to_string()]);
        }
        Server::spawn(&mut command, netns)
    }

    /// Spawns `command`, a server of ours that prints `ready` once it
    /// listens, in `netns`, and waits for that line.
    pub fn spawn(command: &mut Command, netns: &Netns) -> Result<Server> {
        command.stdout(Stdio::piped());
        let mut child = spawn_in(command, netns, None)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SandboxError::Process("no stdout".to_owned()))?;
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let server = Server { child };
        if first.trim() != "ready" {
            return Err(SandboxError::Process(format!(
                "{} {} did not start: {first:?}",
                command.get_program().to_string_lossy(),
                command
                    .get_args()
                    .next()
                    .unwrap_or_default()
                    .to_string_lossy()
            )));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
