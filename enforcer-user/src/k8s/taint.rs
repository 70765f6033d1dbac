//! The startup taint: the kubelet registers the node with it (so nothing is
//! scheduled there before enforcement), and the daemon removes it from its
//! own node once its programs are attached and its first sync is done.

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Removes the taint `key` from node `name`; `false` when it had none.
/// The JSON patch tests the key at that index first, so a concurrent change
/// of the taint list fails the patch (and the caller retries) rather than
/// removing someone else's taint.
pub async fn remove(client: Client, name: &str, key: &str) -> Result<bool, kube::Error> {
    let nodes = Api::<Node>::all(client);
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let Some(index) = taints.iter().position(|t| t.key == key) else {
        return Ok(false);
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/spec/taints/{index}/key"), "value": key},
        {"op": "remove", "path": format!("/spec/taints/{index}")},
    ]))
    .map_err(kube::Error::SerdeError)?;
    nodes
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(true)
}
