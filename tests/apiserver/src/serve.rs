//! The HTTP side: accepting connections, routing, query parameters, LIST,
//! and the `Status` answers the real server gives when it refuses. WATCH is
//! in `watch`, CREATE and PATCH in `write`.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinSet};

use super::{
    ApiRequest, Shared, Verb, lock, proxy,
    selector::{FieldSelector, LabelSelector, ObjectFilter},
    store::{Expired, ObjectKey, ResourceKind},
    watch, write,
};

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Accepts connections until `stop` fires (or its sender is dropped), then
/// closes the listener and drops every open connection, watches included.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                // A failed accept (a client that reset at once) concerns that
                // client only.
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |request| respond(Arc::clone(&shared), request));
                    // A client hanging up mid-request is no error of ours.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn respond(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(route(&shared, request)
        .await
        .unwrap_or_else(|failure| failure.response()))
}

async fn route(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Failure> {
    if let Some(answer) = proxy::serve(shared, &request).await {
        return answer;
    }
    proxy::authenticate(shared, &request)?;
    let target = Target::parse(request.uri().path())
        .ok_or_else(|| Failure::not_found("the server could not find the requested resource"))?;
    let raw_query = request.uri().query().unwrap_or("");
    let query = Query::parse(raw_query)?;
    let verb = target
        .verb(request.method(), query.watch)
        .ok_or_else(|| Failure {
            code: StatusCode::METHOD_NOT_ALLOWED,
            reason: "MethodNotAllowed",
            message: format!(
                "the server does not allow this method on the requested resource: {} {}",
                request.method(),
                target.resource.plural()
            ),
        })?;
    lock(&shared.requests).push(ApiRequest {
        verb,
        resource: target.resource,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        query: form_urlencoded::parse(raw_query.as_bytes())
            .into_owned()
            .collect(),
        at: std::time::Instant::now(),
    });
    // For writes, cluster-scoped objects have the empty namespace, as in
    // `ObjectKey`; a patch always has a name (see `Target::verb`).
    match verb {
        Verb::List | Verb::Watch => read(shared, target.resource, target.namespace, &query),
        Verb::Get => {
            let key = ObjectKey {
                namespace: target.namespace.unwrap_or_default(),
                name: target.name.unwrap_or_default(),
            };
            let object = lock(&shared.store)
                .get(target.resource, &key)
                .map(|object| Value::clone(object))
                .ok_or_else(|| {
                    Failure::not_found(format!(
                        "{} {:?} not found",
                        target.resource.plural(),
                        key.name
                    ))
                })?;
            Ok(json_response(StatusCode::OK, full(&object)))
        }
        Verb::Create => {
            let namespace = target.namespace.unwrap_or_default();
            write::create(shared, target.resource, &namespace, request).await
        }
        // Served above.
        Verb::Proxy => Err(Failure::not_found("not a pod proxy path")),
        Verb::Patch => {
            let key = ObjectKey {
                namespace: target.namespace.unwrap_or_default(),
                name: target.name.unwrap_or_default(),
            };
            write::patch(shared, target.resource, key, request).await
        }
    }
}

/// LIST or WATCH of a collection.
fn read(
    shared: &Arc<Shared>,
    resource: ResourceKind,
    namespace: Option<String>,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    let filter = ObjectFilter {
        namespace,
        labels: LabelSelector::parse(query.label_selector.as_deref().unwrap_or(""))
            .map_err(Failure::bad_request)?,
        fields: FieldSelector::parse(
            query.field_selector.as_deref().unwrap_or(""),
            resource.selectable_fields(),
        )
        .map_err(Failure::bad_request)?,
    };
    if query.watch {
        watch::start(shared, resource, filter, query)
    } else {
        list(shared, resource, &filter, query)
            .map(|list| json_response(StatusCode::OK, full(&list)))
    }
}

/// What a path names: a collection, or one object in it (`name`), with the
/// namespace of a namespaced path. A new resource is routed here.
struct Target {
    resource: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        // The API group (empty for the core group) and the rest of the path.
        let (group, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, "v1", rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (resource, namespace, name) = match (group, rest) {
            ("", ["pods"]) => (ResourceKind::Pods, None, None),
            ("", ["namespaces"]) => (ResourceKind::Namespaces, None, None),
            ("", ["nodes", name]) => (ResourceKind::Nodes, None, Some(*name)),
            ("", ["namespaces", namespace, "pods"]) => (ResourceKind::Pods, Some(*namespace), None),
            ("", ["namespaces", namespace, "pods", name]) => {
                (ResourceKind::Pods, Some(*namespace), Some(*name))
            }
            ("events.k8s.io", ["namespaces", namespace, "events"]) => {
                (ResourceKind::Events, Some(*namespace), None)
            }
            ("events.k8s.io", ["namespaces", namespace, "events", name]) => {
                (ResourceKind::Events, Some(*namespace), Some(*name))
            }
            _ => return None,
        };
        Some(Target {
            resource,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
        })
    }

    /// What `method` does here, if this server serves it.
    fn verb(&self, method: &Method, watch: bool) -> Option<Verb> {
        let verb = match (method, &self.name) {
            (&Method::GET, None) if watch => Verb::Watch,
            (&Method::GET, None) => Verb::List,
            (&Method::GET, Some(_)) => Verb::Get,
            (&Method::POST, None) => Verb::Create,
            (&Method::PATCH, Some(_)) => Verb::Patch,
            _ => return None,
        };
        self.resource.verbs().contains(&verb).then_some(verb)
    }
}

/// The query parameters of a list or watch that the server acts on.
#[derive(Debug, Default)]
pub(crate) struct Query {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub field_selector: Option<String>,
    pub label_selector: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub allow_watch_bookmarks: bool,
    pub send_initial_events: Option<bool>,
}

impl Query {
    fn parse(raw: &str) -> Result<Query, Failure> {
        let mut query = Query::default();
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            let value = value.into_owned();
            match name.as_ref() {
                "watch" => query.watch = parse_bool(&name, &value)?,
                "resourceVersion" => query.resource_version = Some(value),
                "resourceVersionMatch" => query.resource_version_match = Some(value),
                "limit" => query.limit = Some(parse_number(&name, &value)?),
                "continue" => query.continue_token = Some(value),
                "fieldSelector" => query.field_selector = Some(value),
                "labelSelector" => query.label_selector = Some(value),
                "timeoutSeconds" => query.timeout_seconds = Some(parse_number(&name, &value)?),
                "allowWatchBookmarks" => query.allow_watch_bookmarks = parse_bool(&name, &value)?,
                "sendInitialEvents" => query.send_initial_events = Some(parse_bool(&name, &value)?),
                // Like the real server, ignore what does not concern a read
                // (`pretty`, `timeout`, ...).
                _ => {}
            }
        }
        Ok(query)
    }
}

/// Booleans as Go's `strconv.ParseBool` reads them, so `watch=1` works.
fn parse_bool(name: &str, value: &str) -> Result<bool, Failure> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Failure::bad_request(format!("invalid {name}: {value:?}"))),
    }
}

fn parse_number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, Failure> {
    value
        .parse()
        .map_err(|_| Failure::bad_request(format!("invalid {name}: {value:?}")))
}

/// A resourceVersion parameter: empty and `0` mean "any", returned as
/// `None`; a version newer than the server's is refused as the real server
/// does once it gives up waiting to catch up.
pub(crate) fn requested_version(text: Option<&str>, current: u64) -> Result<Option<u64>, Failure> {
    match text.unwrap_or("") {
        "" | "0" => Ok(None),
        text => {
            let requested: u64 = text
                .parse()
                .map_err(|_| Failure::bad_request(format!("invalid resource version: {text:?}")))?;
            if requested > current {
                return Err(Failure {
                    code: StatusCode::GATEWAY_TIMEOUT,
                    reason: "Timeout",
                    message: format!("Too large resource version: {requested}, current: {current}"),
                });
            }
            Ok(Some(requested))
        }
    }
}

/// Where a paged list goes on: the version of its consistent snapshot and
/// the last key already sent.
struct ContinueToken {
    resource_version: u64,
    after: ObjectKey,
}

impl ContinueToken {
    fn encode(&self) -> String {
        format!(
            "{}/{}/{}",
            self.resource_version, self.after.namespace, self.after.name
        )
    }

    fn decode(text: &str) -> Result<ContinueToken, Failure> {
        let mut parts = text.splitn(3, '/');
        let invalid = || Failure::bad_request(format!("continue key is not valid: {text:?}"));
        let resource_version = parts
            .next()
            .and_then(|rv| rv.parse().ok())
            .ok_or_else(invalid)?;
        let namespace = parts.next().ok_or_else(invalid)?.to_owned();
        let name = parts.next().ok_or_else(invalid)?.to_owned();
        Ok(ContinueToken {
            resource_version,
            after: ObjectKey { namespace, name },
        })
    }
}

/// The real server's message for a continue token older than the history.
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent \
     list result. You can start a new list without the continue parameter.";

/// LIST: a `PodList`/`NamespaceList` from a consistent snapshot, paged by
/// `limit` and `continue`.
fn list(
    shared: &Shared,
    resource: ResourceKind,
    filter: &ObjectFilter,
    query: &Query,
) -> Result<Value, Failure> {
    let store = lock(&shared.store);
    let current = store.resource_version();
    let (snapshot_version, after) = match &query.continue_token {
        Some(token) => {
            if !matches!(query.resource_version.as_deref(), None | Some("" | "0")) {
                return Err(Failure::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let token = ContinueToken::decode(token)?;
            (token.resource_version, Some(token.after))
        }
        None => (list_version(query, current)?, None),
    };
    let objects = store
        .objects_at(resource, snapshot_version)
        .map_err(|expired| match after {
            Some(_) => Failure::expired(CONTINUE_EXPIRED),
            None => Failure::too_old(&expired),
        })?;
    drop(store);

    let mut matching = objects
        .into_iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|after| key > after))
        .filter(|(_, object)| filter.matches(object));
    let page: Vec<_> = match query.limit.filter(|&limit| limit > 0) {
        Some(limit) => matching.by_ref().take(limit).collect(),
        None => matching.by_ref().collect(),
    };
    let remaining = matching.count();

    let mut metadata = json!({ "resourceVersion": snapshot_version.to_string() });
    if let Some((last, _)) = page.last().filter(|_| remaining > 0) {
        let token = ContinueToken {
            resource_version: snapshot_version,
            after: last.clone(),
        };
        metadata["continue"] = token.encode().into();
        // With selectors the server cannot count what is left cheaply, and
        // says nothing.
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    let items: Vec<Value> = page
        .into_iter()
        .map(|(_, object)| {
            // List items carry no kind or apiVersion: the list says them once.
            let mut item = Value::clone(&object);
            if let Some(fields) = item.as_object_mut() {
                fields.remove("kind");
                fields.remove("apiVersion");
            }
            item
        })
        .collect();
    Ok(json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// The snapshot a list without `continue` reads: the newest, unless
/// `resourceVersionMatch=Exact` asks for an older one.
fn list_version(query: &Query, current: u64) -> Result<u64, Failure> {
    let requested = requested_version(query.resource_version.as_deref(), current)?;
    match query.resource_version_match.as_deref() {
        Some(_) if query.resource_version.as_deref().unwrap_or("").is_empty() => {
            Err(Failure::bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ))
        }
        None | Some("NotOlderThan") => Ok(current),
        Some("Exact") => requested.ok_or_else(|| {
            Failure::bad_request(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
            )
        }),
        Some(other) => Err(Failure::bad_request(format!(
            "unsupported resourceVersionMatch: {other:?}"
        ))),
    }
}

/// A refusal, answered as the real server does: an HTTP status with a
/// `Status` body, or inside a watch an `ERROR` event carrying that `Status`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn not_found(message: impl Into<String>) -> Failure {
        Failure {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message: message.into(),
        }
    }

    fn expired(message: impl Into<String>) -> Failure {
        Failure {
            code: StatusCode::GONE,
            reason: "Expired",
            message: message.into(),
        }
    }

    pub fn too_old(expired: &Expired) -> Failure {
        Failure::expired(format!(
            "too old resource version: {} ({})",
            expired.requested, expired.oldest
        ))
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }

    fn response(&self) -> Response<Body> {
        json_response(self.code, full(&self.status()))
    }
}

pub(crate) fn full(body: &Value) -> Body {
    Full::new(Bytes::from(body.to_string())).boxed_unsync()
}

/// A response with a JSON body, whole or streamed.
pub(crate) fn json_response(code: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
