//! The DaemonSet's pod on this node, for tests: the sandbox with its fake
//! metadata server and test cgroups ([`Stage`]), a bpffs directory of the
//! test's own as the manifest's bpffs volume, the rootfs and the runtime.
//! Like the stage, it panics with a message when it cannot be set up.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nix::mount::{MntFlags, MsFlags};

use super::{
    Bundle, BundleError, Container, Manifest, Node, PodSettings, Result, Rootfs, Runtime,
    RuntimeFeatures,
};
use crate::{daemon::ENFORCING, stage::Stage};

/// The DaemonSet's bpffs volume.
pub const BPFFS_VOLUME: &str = "bpffs";
/// The manifest's volume for the node-local status socket.
pub const STATUS_VOLUME: &str = "status";

/// A node directory made a mount of its own with shared propagation, as
/// /sys/fs/bpf is on systemd hosts (containerd accepts HostToContainer only
/// from a shared or slave mount); unmounted on drop.
pub struct SharedDir {
    path: PathBuf,
}

impl SharedDir {
    pub fn new(path: &Path) -> Result<SharedDir> {
        let failed = |what: &str, e: nix::Error| {
            BundleError::Runtime(format!("{what} {}: {e}", path.display()))
        };
        std::fs::create_dir_all(path).map_err(super::io_error("creating", path))?;
        nix::mount::mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| failed("bind-mounting", e))?;
        let shared = SharedDir {
            path: path.to_path_buf(),
        };
        nix::mount::mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| failed("making shared", e))?;
        Ok(shared)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if let Err(err) = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("cleanup: cannot unmount {}: {err}", self.path.display());
        }
    }
}

pub struct Pod {
    /// The node the hostNetwork daemon shares the network of: a routed
    /// node-shaped sandbox, so its tc programs land on the sandbox's uplink.
    pub node_shape: crate::NodeShape,
    /// The node directory of the status socket's hostPath volume.
    status_dir: super::ScratchDir,
    pub runtime: Runtime,
    pub features: RuntimeFeatures,
    /// Read after the bpffs directory was made shared.
    pub node: Node,
    /// Unmounted before the stage removes the pins inside.
    bpffs: SharedDir,
    pub rootfs: Rootfs,
    pub stage: Stage,
}

impl std::ops::Deref for Pod {
    type Target = Stage;
    fn deref(&self) -> &Stage {
        &self.stage
    }
}

/// How long the daemon may take to attach (a debug build, under the
/// manifest's CPU limit).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Pod {
    pub fn new(runtime: Runtime) -> Pod {
        let stage = Stage::set_up();
        if let Err(err) = runtime.version() {
            panic!(
                "{} is needed (`cargo xtask setup` installs it): {err}",
                runtime.program()
            );
        }
        let bpffs = SharedDir::new(stage.pins.path()).expect("a shared bpffs directory");
        let node = Node::this_machine().expect("this node's mounts");
        Pod {
            node_shape: crate::NodeShape::routed_veth().expect("a node-shaped sandbox"),
            status_dir: super::ScratchDir::new("status").expect("status directory"),
            runtime,
            features: runtime.features(&node),
            node,
            bpffs,
            rootfs: Rootfs::build().expect("rootfs"),
            stage,
        }
    }

    /// The kubelet's settings, with the test's bpffs directory as the
    /// bpffs volume.
    pub fn settings(&self, tag: &str) -> PodSettings {
        let mut settings = PodSettings::new(tag);
        settings
            .host_paths
            .insert(BPFFS_VOLUME.to_owned(), self.bpffs.path().to_path_buf());
        settings.host_paths.insert(
            STATUS_VOLUME.to_owned(),
            self.status_dir.path().to_path_buf(),
        );
        settings.node_network = Some(self.node_shape.node.path());
        settings
    }

    pub fn bundle(&self, manifest: &Manifest, settings: &PodSettings) -> Result<Bundle> {
        Bundle::create(manifest, &self.node, self.features, settings, &self.rootfs)
    }

    /// The manifest's container with `imds-guard standalone` instead of
    /// `run`, its own args otherwise, on the stage's guarded subtree with
    /// its allowed cgroup, as the container sees them.
    pub fn standalone_bundle(&self, manifest: &Manifest, tag: &str) -> Result<Bundle> {
        let mut bundle = self.bundle(manifest, &self.settings(tag))?;
        let mut args = manifest.container()?.args.clone().unwrap_or_default();
        match args.first_mut() {
            Some(first) if first == "run" => "standalone".clone_into(first),
            _ => {
                return Err(BundleError::Unsupported(format!(
                    "container args not starting with `run`: {args:?}"
                )));
            }
        }
        for (flag, cgroup) in [("--cgroup", &self.guarded), ("--allow", &self.allowed)] {
            args.push(flag.to_owned());
            args.push(bundle.container_path(cgroup)?.display().to_string());
        }
        bundle.replace_args(args)?;
        Ok(bundle)
    }

    /// Starts the daemon's container and waits until it enforces.
    pub fn start_daemon(&self, bundle: &Bundle) -> Result<Container> {
        let mut container = Container::start(self.runtime, bundle)?;
        container.wait_for_log(ENFORCING, START_TIMEOUT)?;
        Ok(container)
    }

    /// The node directory where the daemon's pins are: the manifest's
    /// --bpffs-dir, through the bpffs volume.
    pub fn pins_on_node(&self, manifest: &Manifest, bundle: &Bundle) -> Result<PathBuf> {
        let inside = PathBuf::from(manifest.arg("--bpffs-dir")?);
        let mount = bundle
            .spec()
            .mounts
            .iter()
            .find(|m| m.source == self.bpffs.path())
            .ok_or_else(|| BundleError::Missing("bpffs mount".to_owned()))?;
        let rest = inside.strip_prefix(&mount.destination).map_err(|_| {
            BundleError::Unsupported(format!(
                "--bpffs-dir {} outside the bpffs volume at {}",
                inside.display(),
                mount.destination.display()
            ))
        })?;
        Ok(self.bpffs.path().join(rest))
    }
}
