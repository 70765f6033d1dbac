//! CREATE and PATCH, as far as kube's event `Recorder` uses them: it POSTs
//! a new event under a name of its own (`<object>.<nanoseconds>`), and for
//! each repeat sends a PATCH of that event: a JSON merge patch holding the
//! whole event, now with a `series`. The daemon JSON-patches its node (RFC
//! 6902: a `test` of the taint's key, then its `remove`).

use http_body_util::BodyExt as _;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use serde_json::Value;

use super::{
    Shared, lock,
    serve::{Body, Failure, full, json_response},
    store::{ObjectKey, ResourceKind, metadata_mut},
};

/// The patch types served: what kube's `Patch::Merge` and `Patch::Json` send.
const MERGE_PATCH: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

/// POST to a collection: stores a new object, 409 if its name is taken.
pub(crate) async fn create(
    shared: &Shared,
    resource: ResourceKind,
    namespace: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, Failure> {
    let mut object = json_body(request).await?;
    let key = locate(&mut object, namespace, None)?;
    let mut store = lock(&shared.store);
    if store.get(resource, &key).is_some() {
        return Err(Failure {
            code: StatusCode::CONFLICT,
            reason: "AlreadyExists",
            message: format!("{} {:?} already exists", resource.plural(), key.name),
        });
    }
    let created = store
        .apply(resource, object)
        .map_err(Failure::bad_request)?;
    Ok(json_response(StatusCode::CREATED, full(&created)))
}

/// PATCH of one object with a JSON merge patch (RFC 7386: objects merge
/// key by key, `null` removes, anything else replaces) or a JSON patch
/// (RFC 6902; a failed operation, such as a `test`, is a 422 and changes
/// nothing): 404 if it is not stored, 415 for other patch types.
pub(crate) async fn patch(
    shared: &Shared,
    resource: ResourceKind,
    key: ObjectKey,
    request: Request<Incoming>,
) -> Result<Response<Body>, Failure> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    if content_type != MERGE_PATCH && content_type != JSON_PATCH {
        return Err(Failure {
            code: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types \
                 include: {MERGE_PATCH}, {JSON_PATCH} (got {content_type:?})"
            ),
        });
    }
    let patch = json_body(request).await?;
    if resource == ResourceKind::Nodes
        && let Some(hook) = lock(&shared.node_patch_hook).as_ref()
    {
        hook(&key.name);
    }
    let mut store = lock(&shared.store);
    let mut object = store
        .get(resource, &key)
        .map(|current| Value::clone(current))
        .ok_or_else(|| {
            Failure::not_found(format!("{} {:?} not found", resource.plural(), key.name))
        })?;
    if content_type == MERGE_PATCH {
        json_patch::merge(&mut object, &patch);
    } else {
        let operations: json_patch::Patch = serde_json::from_value(patch)
            .map_err(|e| Failure::bad_request(format!("not a JSON patch: {e}")))?;
        json_patch::patch(&mut object, &operations).map_err(|e| Failure {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: format!("the JSON patch does not apply: {e}"),
        })?;
    }
    locate(&mut object, &key.namespace, Some(&key.name))?;
    let patched = store
        .apply(resource, object)
        .map_err(Failure::bad_request)?;
    Ok(json_response(StatusCode::OK, full(&patched)))
}

async fn json_body(request: Request<Incoming>) -> Result<Value, Failure> {
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| Failure::bad_request(format!("the request body is not JSON: {e}")))
}

/// Where a written object goes. The URL decides; the body may repeat its
/// namespace and name but not contradict them, as the real server insists,
/// and gets the URL's namespace if it names none. `name` is the URL's, for
/// a write to one object.
fn locate(object: &mut Value, namespace: &str, name: Option<&str>) -> Result<ObjectKey, Failure> {
    let metadata = metadata_mut(object).map_err(Failure::bad_request)?;
    match metadata.get("namespace").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != namespace => {
            return Err(Failure::bad_request(
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            ));
        }
        _ => metadata.insert("namespace".into(), namespace.into()),
    };
    let given = metadata
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if let Some(name) = name
        && given != name
    {
        return Err(Failure::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    Ok(ObjectKey {
        namespace: namespace.to_owned(),
        name: given,
    })
}
