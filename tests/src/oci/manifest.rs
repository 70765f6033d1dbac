//! The DaemonSet and the ConfigMaps it mounts, as `kubectl kustomize` (kubectl's
//! built-in kustomize) renders a directory of deploy/: rendered rather than read from
//! deploy/base/daemonset.yaml, so that an overlay (deploy/overlays/...) is
//! tested the way a cluster receives it, patches applied.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, VolumeMount},
};
use serde::Deserialize as _;

use super::{BundleError, Result};

/// The daemon's container in the DaemonSet.
pub const CONTAINER: &str = "imds-guard";

#[derive(Clone, Debug)]
pub struct Manifest {
    pub daemonset: DaemonSet,
    pub config_maps: Vec<ConfigMap>,
}

/// The workspace's root directory, where deploy/ is.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl Manifest {
    /// `kubectl kustomize deploy/<dir>` (e.g. `base`, `overlays/audit`).
    pub fn render(dir: &str) -> Result<Manifest> {
        let path = workspace_root().join("deploy").join(dir);
        let yaml = crate::run("kubectl", &["kustomize", &path.display().to_string()])?;
        Manifest::parse(&yaml)
    }

    /// The DaemonSet and every ConfigMap in a multi-document YAML text.
    pub fn parse(yaml: &str) -> Result<Manifest> {
        let invalid =
            |e: &dyn std::fmt::Display| BundleError::Kubelet(format!("rendered YAML: {e}"));
        let mut daemonset = None;
        let mut config_maps = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_json::Value::deserialize(document).map_err(|e| invalid(&e))?;
            match value.get("kind").and_then(serde_json::Value::as_str) {
                Some("DaemonSet") => {
                    daemonset = Some(serde_json::from_value(value).map_err(|e| invalid(&e))?);
                }
                Some("ConfigMap") => {
                    config_maps.push(serde_json::from_value(value).map_err(|e| invalid(&e))?);
                }
                _ => {}
            }
        }
        Ok(Manifest {
            daemonset: daemonset.ok_or_else(|| BundleError::Missing("DaemonSet".to_owned()))?,
            config_maps,
        })
    }

    pub fn pod(&self) -> Result<&PodSpec> {
        self.daemonset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .ok_or_else(|| BundleError::Missing("pod template".to_owned()))
    }

    pub fn pod_mut(&mut self) -> Result<&mut PodSpec> {
        self.daemonset
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .ok_or_else(|| BundleError::Missing("pod template".to_owned()))
    }

    /// The daemon's container.
    pub fn container(&self) -> Result<&Container> {
        self.pod()?
            .containers
            .iter()
            .find(|c| c.name == CONTAINER)
            .ok_or_else(|| BundleError::Missing(format!("container {CONTAINER}")))
    }

    pub fn container_mut(&mut self) -> Result<&mut Container> {
        self.pod_mut()?
            .containers
            .iter_mut()
            .find(|c| c.name == CONTAINER)
            .ok_or_else(|| BundleError::Missing(format!("container {CONTAINER}")))
    }

    /// The container's volumeMount of the volume `name`.
    pub fn volume_mount(&self, name: &str) -> Result<&VolumeMount> {
        self.container()?
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .ok_or_else(|| BundleError::Missing(format!("volumeMount {name}")))
    }

    pub fn volume_mount_mut(&mut self, name: &str) -> Result<&mut VolumeMount> {
        self.container_mut()?
            .volume_mounts
            .iter_mut()
            .flatten()
            .find(|m| m.name == name)
            .ok_or_else(|| BundleError::Missing(format!("volumeMount {name}")))
    }

    pub fn config_map(&self, name: &str) -> Result<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| BundleError::Missing(format!("ConfigMap {name}")))
    }

    /// The value after `flag` in the container's args (`--bpffs-dir`).
    pub fn arg(&self, flag: &str) -> Result<String> {
        let args = self.container()?.args.clone().unwrap_or_default();
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| BundleError::Missing(format!("{flag} in the container's args")))
    }
}
