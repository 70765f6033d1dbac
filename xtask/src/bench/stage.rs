//! The benchmark's stage: the harness's own (sandbox, fake metadata
//! server, cgroups, pins) plus a traffic sink, a destination that silently
//! drops, and a large allow list; and the one way to turn enforcement on
//! and off.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use imds_guard_tests::{
    Daemon, DaemonBuilder, Server, TempFile, TestCgroup,
    daemon::run_to_end,
    netns::Netns,
    probe::{binary, spawn_in},
    stage::Stage,
};

use super::{
    floor::Floor,
    peer::{self, Judged, Peer},
    programs, progress,
};
use crate::interrupt::interrupted;

/// The sink reads and discards TCP and UDP on this port...
pub const SINK_PORT: &str = "5001";
/// ...and accepts and closes TCP connections on this one.
pub const ACCEPT_PORT: &str = "5002";
/// Longer than any run: the sink is killed when the benchmark ends, and
/// this only bounds it should that fail.
const SINK_LIFETIME_SECONDS: &str = "1800";
/// The rules "at scale": deny rules and allow entries, counting the defaults.
pub const SCALE: Scale = Scale {
    deny: 1000,
    allow: 10_000,
};
/// The daemon's deny rules when it is given none (enforcer-user's
/// `config::presets::DEFAULT_DENY`, which xtask cannot link): the peer's
/// deny list for the default rules, and kept under `--deny` at scale.
const DEFAULT_DENY: [&str; 2] = ["169.254.169.254/32 except-ports=53", "fd00:ec2::254/128"];
/// An address on the veth's subnet that the client's neighbour table maps
/// to a MAC address nobody has: frames to it leave and vanish, as behind a
/// firewall that drops.
pub const DROPPING_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const NOWHERE_MAC: &str = "02:00:00:00:00:99";
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// The traffic runs in the stage's `blocked` cgroup (under the protected
/// one, not allowlisted); its `allowed` one plays the metadata agent.
/// Fields drop in order: the sink before the stage's namespaces.
pub struct BenchStage {
    _sink: Server,
    /// The large allow list's cgroups.
    allow_entries: Vec<PathBuf>,
    _allowlisted: TestCgroup,
    pub stage: Stage,
}

/// What is enforced: the daemon's arguments after `--cgroup DIR`, and the
/// same rules as the peer's nftables ruleset.
pub struct Rules {
    pub name: String,
    /// `--deny` flags (none: the daemon's defaults)...
    pub deny_args: Vec<String>,
    /// ...and the deny rules they make, for the peers.
    pub deny: Vec<String>,
    allow_args: Vec<String>,
    peer_ruleset: String,
    /// The allow list beyond the stage's own allowed cgroup, if any.
    _allow_file: Option<TempFile>,
    /// The allow list's last cgroup, the last one the daemon lists.
    pub last_allowed: PathBuf,
}

/// How many deny rules and allow entries, counting the defaults (the
/// daemon's two deny rules, the stage's allowed cgroup).
#[derive(Clone, Copy)]
pub struct Scale {
    pub deny: usize,
    pub allow: usize,
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let thousands = |n: usize| {
            if n >= 1000 {
                format!("{},{:03}", n / 1000, n % 1000)
            } else {
                n.to_string()
            }
        };
        write!(
            f,
            "{} deny rules + {} allow entries",
            thousands(self.deny),
            thousands(self.allow)
        )
    }
}

impl BenchStage {
    pub fn new() -> anyhow::Result<BenchStage> {
        progress("building the sandbox and the traffic sink");
        let mut stage = Stage::new("bench")?;
        let sink = start_sink(&stage.sandbox.server)?;
        make_dropping(&stage.sandbox.client)?;
        let entries = SCALE.allow - 1;
        progress(&format!(
            "making {entries} empty cgroups for the large allow list"
        ));
        let mut allowlisted = TestCgroup::new("bench-allow")?;
        let mut allow_entries = Vec::new();
        for entry in 0..entries - 1 {
            if entry % 1000 == 0 {
                interrupted()?;
            }
            allow_entries.push(allowlisted.child(&format!("{entry:05}"))?);
        }
        // The last under the guarded cgroup, so that traffic from it shows
        // the whole list is in (figure 8); the rest outside, so that every
        // rule set guards the same small subtree (attaching costs the kernel
        // work for each cgroup below).
        allow_entries.push(stage.guarded_child("allow-last")?);
        Ok(BenchStage {
            _sink: sink,
            allow_entries,
            _allowlisted: allowlisted,
            stage,
        })
    }

    pub fn default_rules(&self) -> anyhow::Result<Rules> {
        let deny = DEFAULT_DENY.map(str::to_owned).to_vec();
        Ok(Rules {
            name: "default rules".to_owned(),
            deny_args: Vec::new(),
            allow_args: vec!["--allow".to_owned(), "{allowed}".to_owned()],
            peer_ruleset: peer::ruleset(
                &Judged::Sockets {
                    guarded: &self.stage.guarded,
                    allow: std::slice::from_ref(&self.stage.allowed),
                },
                &deny,
            )?,
            deny,
            _allow_file: None,
            last_allowed: self.stage.allowed.clone(),
        })
    }

    /// `scale.deny` deny rules (the two defaults, the rest /32s that
    /// ordinary traffic never meets) and `scale.allow` allow entries (the
    /// stage's allowed cgroup, the rest empty ones from the large list).
    pub fn rules(&self, scale: Scale) -> anyhow::Result<Rules> {
        let extra = scale
            .deny
            .checked_sub(DEFAULT_DENY.len())
            .with_context(|| format!("at least the {} default deny rules", DEFAULT_DENY.len()))?;
        let many = (0..extra).map(|n| format!("169.254.{}.{}/32", n / 250, n % 250 + 1));
        let deny: Vec<String> = DEFAULT_DENY
            .map(str::to_owned)
            .into_iter()
            .chain(many)
            .collect();
        // Beyond the stage's allowed cgroup: some of the large list, and
        // always its last entry, the one under the guarded cgroup, so that
        // traffic from the last entry can fail when the list is not all in.
        let count = scale.allow.saturating_sub(1);
        let (last, outside) = self
            .allow_entries
            .split_last()
            .context("the large allow list is empty")?;
        let entries: Vec<PathBuf> = outside
            .get(..count.saturating_sub(1))
            .with_context(|| format!("at most {} allow entries", SCALE.allow))?
            .iter()
            .chain((count > 0).then_some(last))
            .cloned()
            .collect();
        let mut allow_list = String::new();
        for dir in &entries {
            writeln!(allow_list, "{}", dir.display())?;
        }
        let allow_file = TempFile::new("bench-allow", &allow_list)?;
        let allow: Vec<PathBuf> = std::iter::once(self.stage.allowed.clone())
            .chain(entries.iter().cloned())
            .collect();
        let last_allowed = entries.last().unwrap_or(&self.stage.allowed).clone();
        Ok(Rules {
            name: scale.to_string(),
            deny_args: deny
                .iter()
                .flat_map(|rule| ["--deny".to_owned(), rule.clone()])
                .collect(),
            allow_args: vec![
                "--allow".to_owned(),
                "{allowed}".to_owned(),
                "--allow-file".to_owned(),
                allow_file.arg(),
            ],
            peer_ruleset: peer::ruleset(
                &Judged::Sockets {
                    guarded: &self.stage.guarded,
                    allow: &allow,
                },
                &deny,
            )?,
            deny,
            _allow_file: Some(allow_file),
            last_allowed,
        })
    }

    /// The floor's programs on the guarded cgroup, until dropped.
    pub fn floor_on(&self) -> anyhow::Result<Floor> {
        Floor::attach(&self.stage.guarded)
    }

    /// The peer's nftables rules in the client namespace, until dropped.
    pub fn peer_on(&self, rules: &Rules) -> anyhow::Result<Peer> {
        Peer::apply(&self.stage.sandbox.client, &rules.peer_ruleset)
    }

    /// The daemon with these rules, to start.
    pub fn daemon(&self, rules: &Rules) -> DaemonBuilder {
        let args: Vec<&str> = rules
            .allow_args
            .iter()
            .chain(&rules.deny_args)
            .map(String::as_str)
            .collect();
        self.stage.daemon(&args)
    }

    /// Runs `imds-bench-traffic ARGS` in the client namespace and the
    /// traffic cgroup, and returns the fields of the line it printed.
    pub fn traffic(&self, args: &[&str]) -> anyhow::Result<Fields> {
        traffic_in(&self.stage.sandbox.client, Some(&self.stage.blocked), args)
    }

    /// Turns enforcement on for the guarded subtree: a daemon started on an
    /// empty pin directory loads and attaches its programs. This and
    /// [`BenchStage::enforcement_off`] are the only places that know how.
    pub fn enforcement_on(&self, rules: &Rules) -> anyhow::Result<Daemon> {
        Ok(self.daemon(rules).start()?)
    }

    /// Turns enforcement off: a stopped daemon leaves its programs pinned and
    /// attached, and only `imds-guard uninstall` detaches them. Checked, since
    /// a "without" measured with the programs still attached would be a lie:
    /// the programs the pinned links held must be gone from the kernel (the
    /// kernel frees them from a work queue once the last pin is gone, so the
    /// check waits for that, up to [`DETACH_TIMEOUT`]).
    pub fn enforcement_off(&self, mut daemon: Daemon) -> anyhow::Result<()> {
        let pinned = programs::pinned(self.stage.pins.path())?;
        let status = daemon.stop()?;
        ensure!(
            status.success(),
            "imds-guard exited with {status}:\n{}",
            daemon.log()
        );
        let pins = self.stage.pins.path().display().to_string();
        run_to_end(&["uninstall", "--bpffs-dir", &pins])?;
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            let left = programs::still_loaded(&pinned);
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "imds-guard programs are still loaded {DETACH_TIMEOUT:?} after uninstall: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Gives [`DROPPING_V4`] a neighbour entry with a MAC address nobody has,
/// on whichever device the client routes it through.
fn make_dropping(client: &Netns) -> anyhow::Result<()> {
    let dropping = DROPPING_V4.to_string();
    let route = client.ip(&["route", "get", &dropping])?;
    let device = route
        .split_whitespace()
        .skip_while(|token| *token != "dev")
        .nth(1)
        .with_context(|| format!("no device in the route to {dropping}: {route}"))?;
    client.ip(&[
        "neigh",
        "replace",
        &dropping,
        "lladdr",
        NOWHERE_MAC,
        "dev",
        device,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// `imds-bench-traffic sink` in the server namespace, killed on drop.
/// Runs `imds-bench-traffic ARGS` in `netns` (and `cgroup`, if any) and
/// returns the fields of the line it printed.
pub fn traffic_in(
    netns: &Netns,
    cgroup: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<Fields> {
    interrupted()?;
    let mut command = Command::new(binary("imds-bench-traffic")?);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = spawn_in(&mut command, netns, cgroup)?
        .wait_with_output()
        .context("waiting for imds-bench-traffic")?;
    interrupted()?;
    ensure!(
        output.status.success(),
        "`imds-bench-traffic {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Fields::parse(&String::from_utf8_lossy(&output.stdout))
}

/// The traffic sink (`SINK_PORT`, `ACCEPT_PORT`) in `server`.
pub fn start_sink(server: &Netns) -> anyhow::Result<Server> {
    let mut command = Command::new(binary("imds-bench-traffic")?);
    command
        .args(["sink", "--port", SINK_PORT, "--accept-port", ACCEPT_PORT])
        .args(["--seconds", SINK_LIFETIME_SECONDS]);
    Ok(Server::spawn(&mut command, server)?)
}

/// The `key=value` fields of the line a traffic client printed.
pub struct Fields {
    pub line: String,
    values: std::collections::BTreeMap<String, String>,
}

impl Fields {
    pub fn parse(stdout: &str) -> anyhow::Result<Fields> {
        let line = stdout
            .lines()
            .last()
            .context("imds-bench-traffic printed nothing")?;
        let values = line
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Ok(Fields {
            line: line.to_owned(),
            values,
        })
    }

    pub fn number(&self, key: &str) -> anyhow::Result<f64> {
        self.values
            .get(key)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no number {key} in {:?}", self.line))
    }

    /// A field that counts something.
    pub fn count(&self, key: &str) -> anyhow::Result<u64> {
        self.values
            .get(key)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("no count {key} in {:?}", self.line))
    }

    pub fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The fields for bench.json: numbers as numbers, the rest as text.
    pub fn to_json(&self) -> serde_json::Value {
        self.values
            .iter()
            .map(|(key, value)| {
                let value = value
                    .parse::<f64>()
                    .map_or_else(|_| value.clone().into(), serde_json::Value::from);
                (key.clone(), value)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}
