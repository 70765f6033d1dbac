//! The daemon as the DaemonSet ships it, under a real OCI runtime: an OCI
//! bundle generated from the rendered manifest (deploy/) the way the kubelet
//! and containerd turn a pod's container into one, a rootfs holding the
//! built binary, and crun or runc to run it.
//!
//! The generator follows containerd v2.3.4's CRI plugin
//! (`internal/cri/server/container_create*.go`, internal/cri/opts,
//! pkg/oci/spec.go) and the kubelet's conversions it relies on (masked
//! paths, mount propagation, recursive read-only mounts, CPU shares and
//! quota). A security context, volume or namespace setting it does not
//! model is an error, not something left out: a manifest change must change
//! the bundle or fail. Left out, as the daemon reads none of them in these
//! tests: the kubelet's own files (/etc/hosts, /etc/hostname,
//! /etc/resolv.conf, /dev/termination-log), the service account token
//! volume, the `KUBERNETES_SERVICE_*` variables, the pause container (its
//! namespaces are new for the pod either way), probes and the OOM score.

pub mod bundle;
pub mod manifest;
pub mod node;
pub mod pod;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod spec;

use std::path::PathBuf;

pub use bundle::{Bundle, PodSettings, generate};
pub use manifest::Manifest;
pub use node::Node;
pub use pod::{Pod, SharedDir};
pub use rootfs::Rootfs;
pub use runtime::{Container, Runtime, RuntimeFeatures};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// containerd's own refusal (`internal/cri/opts/spec_linux_opts.go`).
    #[error("path {path:?} is mounted on {mount_point:?} but it is not a {wanted} mount")]
    Propagation {
        path: PathBuf,
        mount_point: PathBuf,
        wanted: &'static str,
    },
    /// The API server's validation of the pod template.
    #[error("{field}: Forbidden: {reason}")]
    Forbidden { field: String, reason: String },
    /// The kubelet's refusal to create the container.
    #[error("{0}")]
    Kubelet(String),
    #[error("the bundle generator does not model {0}")]
    Unsupported(String),
    #[error("the manifest has no {0}")]
    Missing(String),
    #[error("{0}")]
    Runtime(String),
    #[error(transparent)]
    Sandbox(#[from] crate::SandboxError),
}

pub type Result<T, E = BundleError> = std::result::Result<T, E>;

fn io_error(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> BundleError {
    let path = path.into();
    move |source| BundleError::Sandbox(crate::SandboxError::Io { what, path, source })
}

/// A directory of our own under the temporary directory, removed with its
/// contents on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(tag: &str) -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(crate::unique_name(tag));
        std::fs::create_dir(&path).map_err(io_error("creating", &path))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: cannot remove {}: {err}", self.path.display());
        }
    }
}
