//! The startup taint: the kubelet registers the node with it (so nothing is
//! scheduled there before enforcement), and the daemon removes it from its
//! own node once its programs are attached and its first sync is done.

use std::time::Duration;

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
