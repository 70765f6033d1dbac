//! The startup taint: the kubelet registers the node with it (so nothing is
//! scheduled there before enforcement), and the daemon removes it from its
//! own node once its programs are attached and its first sync is done.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Removes the taint `key` (every effect it is registered with) from node
/// `name`; `false` when it had none. The JSON patch tests the key at each
/// index first, so a concurrent change of the taint list fails the patch
/// (and the caller retries) rather than removing someone else's taint.
pub async fn remove(client: Client, name: &str, key: &str) -> Result<bool, kube::Error> {
    let nodes = Api::<Node>::all(client);
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let indices: Vec<usize> = taints
        .iter()
        .enumerate()
        .filter(|(_, t)| t.key == key)
        .map(|(i, _)| i)
        .collect();
    if indices.is_empty() {
        return Ok(false);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(removal(&indices, key)))
            .map_err(kube::Error::SerdeError)?;
    nodes
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(true)
}

/// The operations that remove the taints at `indices` (ascending), each
/// after a test of its key: from the highest index down, so each index
/// still points at its taint when its turn comes.
fn removal(indices: &[usize], key: &str) -> Vec<serde_json::Value> {
    indices
        .iter()
        .rev()
        .flat_map(|index| {
            [
                serde_json::json!({"op": "test", "path": format!("/spec/taints/{index}/key"), "value": key}),
                serde_json::json!({"op": "remove", "path": format!("/spec/taints/{index}")}),
            ]
        })
        .collect()
}

/// When to try again after `failures` failed removals, the last with
/// `err`; `None` when retrying cannot help: the node does not exist (404)
/// or the daemon may not patch it (403: RBAC, or the admission policy on a
/// cluster without the token's node claim). A conflict (409, or 422 when
/// the taint list changed under the patch's `test`) and an unreachable API
/// server are retried, 5 s doubling to 5 minutes, so a node that cannot
/// succeed costs the API server little.
pub fn retry_after(err: &kube::Error, failures: u32) -> Option<Duration> {
    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_mins(5);
    if let kube::Error::Api(status) = err
        && matches!(status.code, 400 | 401 | 403 | 404 | 405)
    {
        return None;
    }
    Some(
        FIRST
            .saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("refused", "Refused").with_code(code),
        ))
    }

    #[test]
    fn every_taint_with_the_key_goes_and_no_other() {
        let mut node = serde_json::json!({"spec": {"taints": [
            {"key": "imds-guard.io/not-ready", "effect": "NoSchedule"},
            {"key": "other", "effect": "NoSchedule"},
            {"key": "imds-guard.io/not-ready", "effect": "NoExecute"},
        ]}});
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(removal(
            &[0, 2],
            "imds-guard.io/not-ready",
        )))
        .expect("a JSON patch");
        json_patch::patch(&mut node, &patch).expect("applies");
        assert_eq!(
            node["spec"]["taints"],
            serde_json::json!([{"key": "other", "effect": "NoSchedule"}])
        );
        // A list that changed under the patch fails its test, whole.
        let mut moved = serde_json::json!({"spec": {"taints": [{"key": "other"}, {"key": "imds-guard.io/not-ready"}]}});
        assert!(json_patch::patch(&mut moved, &patch).is_err());
    }

    #[test]
    fn only_failures_that_can_pass_are_retried_and_less_often() {
        for code in [403, 404] {
            assert_eq!(retry_after(&api_error(code), 1), None, "{code}");
        }
        assert_eq!(
            retry_after(&api_error(409), 1),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&api_error(422), 2),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&api_error(503), 4),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            retry_after(&api_error(500), 30),
            Some(Duration::from_mins(5))
        );
    }
}
