//! crun and runc, Debian's OCI runtimes, and the containers they run.

use std::{
    ffi::CString,
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use super::{Bundle, BundleError, Node, Result, ScratchDir, io_error};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Crun,
    Runc,
}

/// What containerd learns from a runtime's `features` command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeFeatures {
    /// Recursive read-only bind mounts (`rro`, with `mount_setattr(2)`).
    pub recursive_read_only: bool,
}

/// `mount_setattr(2)`, which `rro` needs, came in Linux 5.12.
const MOUNT_SETATTR: (u32, u32) = (5, 12);

const UNIFIED_CONTROLLERS: &str = "/sys/fs/cgroup/unified/cgroup.controllers";

impl Runtime {
    pub fn program(self) -> &'static str {
        match self {
            Runtime::Crun => "crun",
            Runtime::Runc => "runc",
        }
    }

    fn output(self, args: &[&str]) -> Result<String> {
        Ok(crate::run(self.program(), args)?)
    }

    /// The runtime's version line; fails when it is not installed.
    pub fn version(self) -> Result<String> {
        let text = self.output(&["--version"])?;
        Ok(text.lines().next().unwrap_or_default().to_owned())
    }

    /// What containerd's introspection finds: `rro` among the mount options
    /// `<runtime> features` lists, on a kernel with `mount_setattr`. A runtime
    /// without the command (crun 1.8) reports no features.
    pub fn features(self, node: &Node) -> RuntimeFeatures {
        let listed = self
            .output(&["features"])
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|features| {
                features["mountOptions"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|v| v == "rro"))
            });
        RuntimeFeatures {
            recursive_read_only: listed && node.kernel >= MOUNT_SETATTR,
        }
    }

    /// `<runtime> run --bundle DIR ID`, in the foreground, so that its exit
    /// status is the container's.
    fn run_command(self, bundle: &Bundle, id: &str, scratch: &Path) -> Result<Command> {
        let mut command = Command::new(self.program());
        command.arg("run").arg("--bundle").arg(bundle.dir()).arg(id);
        if self == Runtime::Crun && crun_refuses_this_host()? {
            hide_unified_controllers(&mut command, scratch)?;
        }
        Ok(command)
    }
}

/// crun 1.8 refuses every container on a hybrid host whose cgroup2
/// hierarchy lists a controller (src/libcrun/cgroup.c, "cgroups in hybrid
/// mode not supported"), as this machine's lists hugetlb, which no v1
/// hierarchy took.
fn crun_refuses_this_host() -> Result<bool> {
    match std::fs::read_to_string(UNIFIED_CONTROLLERS) {
        Ok(text) => Ok(!text.trim().is_empty()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(io_error("reading", UNIFIED_CONTROLLERS)(err)),
    }
}

/// Runs crun in a mount namespace of its own where the cgroup2 hierarchy
/// lists no controller: an empty file bound over cgroup.controllers. The
/// namespace is a slave of the host's, so mounts the host makes later still
/// propagate into containers (HostToContainer). The host sees no change;
/// containers binding the hierarchy see the empty file too (a recursive
/// bind copies it), read-only, so that it is nothing they could write.
fn hide_unified_controllers(command: &mut Command, scratch: &Path) -> Result<()> {
    let empty = scratch.join("no-controllers");
    File::create(&empty).map_err(io_error("creating", &empty))?;
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| BundleError::Runtime(format!("NUL in {}", p.display())))
    };
    let (empty, controllers, root) = (
        c_path(&empty)?,
        c_path(Path::new(UNIFIED_CONTROLLERS))?,
        c_path(Path::new("/"))?,
    );
    // SAFETY: between fork and exec only unshare(2) and mount(2) run, on
    // strings made before the fork.
    unsafe {
        command.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let slave = libc::MS_REC | libc::MS_SLAVE;
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                slave,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            for (source, flags) in [
                (empty.as_ptr(), libc::MS_BIND),
                (
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                ),
            ] {
                let null = std::ptr::null();
                if libc::mount(source, controllers.as_ptr(), null, flags, null.cast()) != 0 {
                    return fail();
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// A container started from a bundle; deleted (`<runtime> delete -f`) on
/// drop, with any cgroup it leaves.
pub struct Container {
    runtime: Runtime,
    id: String,
    child: Child,
    cgroups_path: String,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Holds stdout and stderr; removed after the container.
    _scratch: ScratchDir,
}

impl Container {
    /// Starts the container without waiting for anything.
    pub fn start(runtime: Runtime, bundle: &Bundle) -> Result<Container> {
        let scratch = ScratchDir::new("container")?;
        let id = crate::unique_name("ctr");
        let (stdout, stderr) = (scratch.path().join("stdout"), scratch.path().join("stderr"));
        let file = |path: &Path| File::create(path).map_err(io_error("creating", path));
        let mut command = runtime.run_command(bundle, &id, scratch.path())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?)
            .spawn()
            .map_err(|e| BundleError::Runtime(format!("spawning {}: {e}", runtime.program())))?;
        Ok(Container {
            runtime,
            id,
            child,
            cgroups_path: bundle.spec().linux.cgroups_path.clone(),
            stdout,
            stderr,
            _scratch: scratch,
        })
    }

    /// Runs the container to its end: exit status, stdout, stderr.
    pub fn run_to_end(
        runtime: Runtime,
        bundle: &Bundle,
        timeout: Duration,
    ) -> Result<(ExitStatus, String, String)> {
        let mut container = Container::start(runtime, bundle)?;
        let status = container.wait_exit(timeout)?;
        Ok((status, container.stdout(), container.log()))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the container (and the runtime) wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`; fails if the
    /// container ends first or time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.poll(timeout, &format!("log {needle:?}"), |c| {
            if c.log().contains(needle) {
                return Some(Ok(()));
            }
            let status = c.child.try_wait().ok().flatten()?;
            Some(Err(BundleError::Runtime(format!(
                "container {} ended ({status}) before logging {needle:?}:\n{}",
                c.id,
                c.log()
            ))))
        })?
    }

    /// Waits for the container's process to end (the foreground runtime
    /// exits with its status).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.poll(timeout, "end", |c| c.child.try_wait().ok().flatten())
    }

    /// Calls `done` until it gives an answer, failing after `timeout`.
    fn poll<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&mut Container) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(answer) = done(self) {
                return Ok(answer);
            }
            if Instant::now() > deadline {
                return Err(BundleError::Runtime(format!(
                    "container {} did not {what} within {timeout:?}:\n{}",
                    self.id,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `<runtime> kill ID KILL`: what a node does to a container that
    /// ignores SIGTERM, or an OOM kill.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.runtime.output(&["kill", &self.id, "KILL"])?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// The container's init process, as the host sees it.
    pub fn pid(&self) -> Result<u32> {
        let state = self.runtime.output(&["state", &self.id])?;
        serde_json::from_str::<serde_json::Value>(&state)
            .ok()
            .and_then(|s| s["pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                BundleError::Runtime(format!("no pid in the state of {}: {state}", self.id))
            })
    }

    /// The container's network namespace, for a second container of the pod.
    pub fn network_namespace(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(format!("/proc/{}/ns/net", self.pid()?)))
    }

    /// /proc/PID/mountinfo of the container's init: its mounts, read from
    /// the host.
    pub fn mountinfo(&self) -> Result<String> {
        let path = format!("/proc/{}/mountinfo", self.pid()?);
        std::fs::read_to_string(&path).map_err(io_error("reading", path))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // The foreground `run` deletes its container once the process
        // ends; `delete --force` is for what is left after that.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.runtime.output(&["kill", &self.id, "KILL"]);
            if self.wait_exit(Duration::from_secs(10)).is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if self.runtime.output(&["state", &self.id]).is_ok()
            && let Err(err) = self.runtime.output(&["delete", "--force", &self.id])
        {
            eprintln!("cleanup: {err}");
        }
        remove_cgroups(&self.cgroups_path);
    }
}

/// Removes the container's cgroup from every hierarchy where it is left.
fn remove_cgroups(cgroups_path: &str) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let relative = cgroups_path.trim_start_matches('/');
    if relative.is_empty() {
        return;
    }
    for mount in enforcer_common::mountinfo::parse(&mountinfo) {
        if mount.fstype != "cgroup" && mount.fstype != "cgroup2" {
            continue;
        }
        let dir = mount.point.join(relative);
        if dir.exists()
            && let Err(err) = std::fs::remove_dir(&dir)
        {
            eprintln!("cleanup: cannot remove cgroup {}: {err}", dir.display());
        }
    }
}
