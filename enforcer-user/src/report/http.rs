//! The daemon's HTTP endpoints: `/metrics`, `/healthz` (programs attached,
//! daemon responsive), `/readyz` (also synced with the API server), `/pods`
//! (this node's pods by UID, for `imds-guard status`), and `/explain` (why
//! a pod is blocked or allowed, for `imds-guard explain` and the kubectl
//! plugin).
//!
//! The DaemonSet shares the node's network, so every pod on the node
//! reaches the TCP listener: it serves the probes, the metrics, and
//! `/explain/<pod UID>` (the plugin's way in, through the API server's pod
//! proxy, which authenticates and authorises the caller; the UID is known
//! only to those who may read the pod). `/pods` and `/explain` by name tell
//! about any pod and are served only on the node-local unix socket
//! (`--status-socket`), which only the node's root can open.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use enforcer_common::names::PROGRAMS;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    bpf::{owner::EnforcerHandle, pins::PinRoot},
    host::cgroup,
    report::{
        events::PodNames,
        explain::{ExplainRequest, Explanation, Guard, PodQuery, RecentAttempts, Refusals},
        metrics::Metrics,
        status,
    },
};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct ListenError {
    address: String,
    source: std::io::Error,
}

/// What the probes look at.
pub struct Health {
    pins: PinRoot,
    generation: String,
    pub handle: EnforcerHandle,
    /// Kubernetes mode is ready once the first lists are reconciled.
    pub synced: AtomicBool,
    /// The last watch request succeeded.
    pub api_reachable: AtomicBool,
    /// The daemon's tasks that stopped while it runs.
    stopped_tasks: Mutex<Vec<&'static str>>,
}

/// How long the enforcer task may take to answer before the daemon counts
/// as unresponsive.
const RESPONSIVE_WITHIN: Duration = Duration::from_secs(1);

impl Health {
    /// Health of the generation in force; `needs_sync` keeps readiness back
    /// until [`Health::synced`] is set.
    pub fn new(
        pins: PinRoot,
        generation: String,
        handle: EnforcerHandle,
        needs_sync: bool,
    ) -> Health {
        Health {
            pins,
            generation,
            handle,
            synced: AtomicBool::new(!needs_sync),
            api_reachable: AtomicBool::new(true),
            stopped_tasks: Mutex::new(Vec::new()),
        }
    }

    /// Records that a task of the daemon stopped: the daemon is not live.
    pub fn task_stopped(&self, name: &'static str) {
        self.stopped_tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name);
    }

    /// The programs of the generation in force whose pinned link the kernel
    /// still reports attached to a cgroup.
    pub fn programs_attached(&self) -> usize {
        self.pins
            .attached_programs(&self.generation)
            .values()
            .filter(|attached| **attached)
            .count()
    }

    /// The routes to denied destinations besides pod sockets, and whether
    /// this node closes each one.
    pub fn guards(&self) -> Vec<Guard> {
        status::edge_status(&self.pins, &self.generation)
            .routes
            .into_iter()
            .map(|r| Guard {
                what: r.what.to_owned(),
                closed: r.guarded,
            })
            .collect()
    }

    /// Looks at everything the probes judge, once.
    pub async fn assess(&self) -> Assessment {
        let stopped_tasks = self
            .stopped_tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let enforcer_problem =
            match tokio::time::timeout(RESPONSIVE_WITHIN, self.handle.snapshot()).await {
                Ok(Ok(_)) => None,
                Ok(Err(err)) => Some(format!("enforcer: {err}")),
                Err(_) => Some("enforcer did not answer within a second".to_owned()),
            };
        Assessment {
            programs_attached: self.programs_attached(),
            stopped_tasks,
            enforcer_problem,
            synced: self.synced.load(Ordering::Relaxed),
            api_reachable: self.api_reachable.load(Ordering::Relaxed),
        }
    }
}

/// What the probes found. `/healthz`, `/readyz` and the health gauges of
/// `/metrics` all judge it with the methods below, so they cannot disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    /// Programs of the generation in force attached (of [`PROGRAMS`]).
    pub programs_attached: usize,
    /// The daemon's tasks that stopped while it runs.
    pub stopped_tasks: Vec<&'static str>,
    /// Why the enforcer task did not answer, if it did not.
    pub enforcer_problem: Option<String>,
    /// The first lists are reconciled (always, outside Kubernetes mode).
    pub synced: bool,
    /// The last watch request succeeded (always, outside Kubernetes mode).
    pub api_reachable: bool,
}

impl Assessment {
    /// Why the daemon is not live, if it is not.
    pub fn not_live(&self) -> Option<String> {
        if self.programs_attached < PROGRAMS.len() {
            return Some(format!(
                "{} of {} programs attached",
                self.programs_attached,
                PROGRAMS.len()
            ));
        }
        if !self.stopped_tasks.is_empty() {
            return Some(format!("task stopped: {}", self.stopped_tasks.join(", ")));
        }
        self.enforcer_problem.clone()
    }

    /// Why the daemon is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(why) = self.not_live() {
            return Some(why);
        }
        if !self.synced {
            return Some("not synced with the API server yet".to_owned());
        }
        if !self.api_reachable {
            return Some("the API server is not reachable".to_owned());
        }
        None
    }
}

/// What the endpoints serve.
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub pods: Option<PodNames>,
    /// Where `explain` asks the mode; `None` in a mode without pods.
    pub explain: Option<mpsc::Sender<ExplainRequest>>,
    pub recent_attempts: RecentAttempts,
}

/// How long `explain` waits for the mode's answer.
const EXPLAIN_WITHIN: Duration = Duration::from_secs(2);

impl Endpoints {
    /// Why a pod is blocked or allowed, as JSON; 404 for a pod not on this node.
    async fn explain(&self, pod: PodQuery) -> Response<Full<Bytes>> {
        let Some(asker) = &self.explain else {
            return text(
                StatusCode::NOT_FOUND,
                "explain needs Kubernetes mode (imds-guard run)\n".to_owned(),
            );
        };
        let (reply, answer) = oneshot::channel();
        let sent = asker.send(ExplainRequest { pod, reply }).await.is_ok();
        let facts = match tokio::time::timeout(EXPLAIN_WITHIN, answer).await {
            Ok(Ok(facts)) if sent => facts,
            _ => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the daemon did not answer within 2 s\n".to_owned(),
                );
            }
        };
        let Some(facts) = facts else {
            return text(
                StatusCode::NOT_FOUND,
                "no such pod on this node (as the daemon's pod watch has it)\n".to_owned(),
            );
        };
        let snapshot = match self.health.handle.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(err) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("enforcer: {err}\n"),
                );
            }
        };
        let cgroup_ids = facts
            .cgroup
            .as_ref()
            .map(|c| cgroup::subtree_ids(&c.path))
            .unwrap_or_default();
        let refusals = cgroup_ids
            .iter()
            .filter_map(|id| snapshot.counters.get(id))
            .fold(Refusals::default(), |sum, c| Refusals {
                connect: sum.connect + c.connect,
                sendmsg: sum.sendmsg + c.sendmsg,
                egress: sum.egress + c.egress,
            });
        let explanation = Explanation {
            allow_map_entry: facts
                .cgroup
                .as_ref()
                .and_then(|c| snapshot.allowed.get(&c.id))
                .map(|access| access.name().to_owned()),
            programs_attached: self.health.programs_attached(),
            programs_expected: PROGRAMS.len(),
            guards: self.health.guards(),
            refusals,
            recent_attempts: self.recent_attempts.of(&cgroup_ids),
            pod: facts,
        };
        let mut response = text(
            StatusCode::OK,
            serde_json::to_string(&explanation).unwrap_or_default(),
        );
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn verdict(problem: Option<String>) -> Response<Full<Bytes>> {
    match problem {
        None => text(StatusCode::OK, "ok\n".to_owned()),
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// `/explain/<pod uid>`, served to both audiences.
pub const EXPLAIN_BY_UID: &str = "/explain/";

/// Who a listener serves: anyone on the network, or the node's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// `/metrics`, `/healthz`, `/readyz`.
    Network,
    /// Those, and `/pods`.
    NodeLocal,
}

async fn route(
    endpoints: &Endpoints,
    audience: Audience,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            // Health gauges as the probes would answer now.
            endpoints
                .metrics
                .set_health(&endpoints.health.assess().await);
            let mut response = text(StatusCode::OK, endpoints.metrics.render());
            if let Ok(value) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse()
            {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        "/healthz" => verdict(endpoints.health.assess().await.not_live()),
        "/readyz" => verdict(endpoints.health.assess().await.not_ready()),
        path if path.starts_with(EXPLAIN_BY_UID) => {
            let uid = &path[EXPLAIN_BY_UID.len()..];
            endpoints.explain(PodQuery::Uid(uid.to_owned())).await
        }
        // By name only node-locally: over the network the UID, which only
        // those who may read the pod know, is what asks (README, "explain").
        "/explain" if audience == Audience::NodeLocal => {
            let mut namespace = None;
            let mut name = None;
            for (key, value) in
                form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            {
                match key.as_ref() {
                    "namespace" => namespace = Some(value.into_owned()),
                    "name" => name = Some(value.into_owned()),
                    _ => {}
                }
            }
            match (namespace, name) {
                (Some(namespace), Some(name)) => {
                    endpoints.explain(PodQuery::Name { namespace, name }).await
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "explain needs ?namespace=NS&name=NAME\n".to_owned(),
                ),
            }
        }
        "/pods" if audience == Audience::NodeLocal => {
            let pods = endpoints
                .pods
                .as_ref()
                .map(PodNames::all)
                .unwrap_or_default();
            text(
                StatusCode::OK,
                serde_json::to_string(&pods).unwrap_or_default(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

/// How long a node-local client waits for the daemon.
const NODE_LOCAL_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on the daemon's node-local socket: the status code and body.
/// (The CLI's side; plain HTTP/1.1 with `Connection: close` is all it needs.)
pub fn get_node_local(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(NODE_LOCAL_TIMEOUT))?;
    stream.set_read_timeout(Some(NODE_LOCAL_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: imds-guard\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let malformed =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// A bound listener of either kind, with who it serves.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn audience(&self) -> Audience {
        match self {
            Listener::Tcp(_) => Audience::Network,
            Listener::Unix(_) => Audience::NodeLocal,
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Connection>> {
        Ok(match self {
            Listener::Tcp(listener) => Box::new(listener.accept().await?.0),
            Listener::Unix(listener) => Box::new(listener.accept().await?.0),
        })
    }
}

/// A stream hyper can serve.
trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// Binds `address`, so a failure is reported at start.
pub async fn bind(address: SocketAddr) -> Result<Listener, ListenError> {
    TcpListener::bind(address)
        .await
        .map(Listener::Tcp)
        .map_err(|source| ListenError {
            address: address.to_string(),
            source,
        })
}

/// Binds the node-local socket at `path` (a stale one from an earlier run
/// is replaced), readable and writable by its owner only.
pub fn bind_socket(path: &Path) -> Result<Listener, ListenError> {
    let listen_err = |source| ListenError {
        address: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(listen_err(err)),
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(Listener::Unix(listener))
}

/// Serves until `cancel` fires; then answers the requests under way,
/// closes every connection and returns.
pub async fn serve(listener: Listener, endpoints: Arc<Endpoints>, cancel: CancellationToken) {
    let audience = listener.audience();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => break,
            // Reap finished connections as they go.
            Some(_) = connections.join_next() => continue,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) => {
                warn!("accepting an HTTP connection: {err}");
                continue;
            }
        };
        let endpoints = Arc::clone(&endpoints);
        let cancel = cancel.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let endpoints = Arc::clone(&endpoints);
                async move { Ok::<_, Infallible>(route(&endpoints, audience, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            // A client that goes away mid-request is not our problem.
            tokio::select! {
                _ = connection.as_mut() => {}
                () = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
impl Assessment {
    /// Everything fine, for tests to change one fact of.
    pub(crate) fn healthy() -> Assessment {
        Assessment {
            programs_attached: PROGRAMS.len(),
            stopped_tasks: Vec::new(),
            enforcer_problem: None,
            synced: true,
            api_reachable: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_liveness_sync_and_the_api_server() {
        assert_eq!(Assessment::healthy().not_live(), None);
        assert_eq!(Assessment::healthy().not_ready(), None);
        let detached = Assessment {
            programs_attached: PROGRAMS.len() - 1,
            ..Assessment::healthy()
        };
        let why = detached.not_live().expect("not live");
        assert!(why.contains("programs attached"), "{why}");
        assert_eq!(detached.not_ready(), Some(why));
        let stopped = Assessment {
            stopped_tasks: vec!["http server"],
            ..Assessment::healthy()
        };
        assert_eq!(
            stopped.not_live().as_deref(),
            Some("task stopped: http server")
        );
        let unanswered = Assessment {
            enforcer_problem: Some("enforcer did not answer within a second".to_owned()),
            ..Assessment::healthy()
        };
        assert!(unanswered.not_live().is_some());
        // Sync and the API server decide readiness only.
        for not_ready in [
            Assessment {
                synced: false,
                ..Assessment::healthy()
            },
            Assessment {
                api_reachable: false,
                ..Assessment::healthy()
            },
        ] {
            assert_eq!(not_ready.not_live(), None);
            assert!(not_ready.not_ready().is_some(), "{not_ready:?}");
        }
    }
}
