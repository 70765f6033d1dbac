//! Fixtures for end-to-end tests: a sandbox with our fake server, a test
//! cgroup tree, a pin directory, and the daemon. Like tests, they panic
//! with a message when something cannot be set up.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{
    Daemon, DaemonBuilder, Outcome, PinDir, Probe, ProbeResult, Sandbox, Server, TestCgroup, addrs,
    require_root,
};

/// The sandbox, our fake server and the test cgroups: dropped after the
/// daemon, and namespaces last.
pub struct Stage {
    pub pins: PinDir,
    _server: Server,
    cgroups: TestCgroup,
    pub sandbox: Sandbox,
    /// The attach point: everything below loses metadata access...
    pub guarded: PathBuf,
    /// ...but this one, allowlisted, and its children.
    pub allowed: PathBuf,
    pub allowed_child: PathBuf,
    /// A sibling of `allowed`, not allowlisted.
    pub blocked: PathBuf,
    /// Outside the attached subtree altogether.
    pub outside: PathBuf,
}

pub const HTTP: u16 = 80;
pub const DNS: u16 = 53;

impl Stage {
    pub fn set_up() -> Stage {
        require_root();
        Stage::new("standalone").expect("the stage: sandbox, fake metadata server, cgroups")
    }

    /// The stage, its cgroups and pins named after `tag`, or what could not
    /// be set up (for the benchmark, which reports rather than panics).
    pub fn new(tag: &str) -> crate::Result<Stage> {
        let sandbox = Sandbox::new()?;
        let server = Server::start(&sandbox.server, &[HTTP, DNS])?;
        let mut cgroups = TestCgroup::new(tag)?;
        let (guarded, allowed, allowed_child, blocked, outside) = (
            cgroups.child("guarded")?,
            cgroups.child("guarded/allowed")?,
            cgroups.child("guarded/allowed/job")?,
            cgroups.child("guarded/blocked")?,
            cgroups.child("outside")?,
        );
        Ok(Stage {
            pins: PinDir::new(tag),
            _server: server,
            cgroups,
            sandbox,
            guarded,
            allowed,
            allowed_child,
            blocked,
            outside,
        })
    }

    /// Makes `relative` (which may nest) below the guarded cgroup; removed
    /// with the stage.
    pub fn guarded_child(&mut self, relative: &str) -> crate::Result<PathBuf> {
        self.cgroups.child(&format!("guarded/{relative}"))
    }

    /// `imds-guard standalone` on this stage (protecting `guarded`,
    /// pinning under `pins`) followed by `args`, where `{allowed}` stands
    /// for the allowed cgroup's path.
    pub fn daemon(&self, args: &[&str]) -> DaemonBuilder {
        let allowed = self.allowed.display().to_string();
        Daemon::standalone(&self.guarded, self.pins.path())
            .args(args.iter().map(|arg| arg.replace("{allowed}", &allowed)))
    }

    pub fn probe<'a>(&'a self, cgroup: &'a Path) -> Probe<'a> {
        Probe {
            netns: &self.sandbox.client,
            cgroup: Some(cgroup),
        }
    }

    pub fn attempt(&self, cgroup: &Path, case: &Case) -> ProbeResult {
        let source = addrs::CLIENT_V4.to_string();
        let extra: &[&str] = if case.action == "raw-udp" || case.action == "fragments" {
            &["--source", &source]
        } else {
            &[]
        };
        self.probe(cgroup)
            .attempt(case.action, case.addr, case.port, extra)
            .unwrap_or_else(|e| panic!("{case:?}: {e}"))
    }
}

/// A stage with the daemon running on it.
pub struct World {
    pub daemon: Daemon,
    pub stage: Stage,
}

impl std::ops::Deref for World {
    type Target = Stage;
    fn deref(&self) -> &Stage {
        &self.stage
    }
}

impl World {
    pub fn new(args: &[&str]) -> World {
        let stage = Stage::set_up();
        let daemon = stage.daemon(args).start().expect("imds-guard starts");
        World { daemon, stage }
    }

    pub fn default_allow() -> World {
        World::new(&["--allow", "{allowed}"])
    }
}

#[derive(Debug)]
pub struct Case {
    pub action: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

pub fn case(action: &'static str, addr: impl Into<IpAddr>, port: u16) -> Case {
    Case {
        action,
        addr: addr.into(),
        port,
    }
}

pub fn eperm() -> Outcome {
    Outcome::Refused("EPERM".to_owned())
}

impl World {
    /// Starts the daemon again on the same stage (after it was stopped or
    /// killed), from `binary` or the workspace's own.
    pub fn restart(&mut self, binary: Option<&Path>, args: &[&str]) {
        let daemon = self.stage.daemon(args);
        let daemon = match binary {
            Some(binary) => daemon.binary(binary),
            None => daemon,
        };
        self.daemon = daemon.start().expect("imds-guard starts again");
    }
}
