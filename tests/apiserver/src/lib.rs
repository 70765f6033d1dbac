//! A Kubernetes API server for tests, speaking the real protocol as kube-rs
//! uses it: LIST and WATCH of core v1 `pods` and `namespaces` over plain
//! HTTP on loopback, with selectors, pagination, resourceVersion semantics,
//! bookmarks, watch timeouts and 410 Gone; GET and JSON PATCH of `nodes`
//! (the daemon's probe and startup taint); and CREATE and JSON merge PATCH
//! of `events.k8s.io/v1` events, which is all kube's event `Recorder` does;
//! GET of one pod and the pod proxy, with bearer-token users, which is what
//! `kubectl imds-guard explain` uses (see `proxy`).
//! Tests drive it from Rust: they write pods and namespaces, compact its
//! history, stop and restart it on the same port, and read the stored events
//! and what clients asked for.
//!
//! It runs on its own tokio runtime (its own thread), so synchronous tests
//! and a daemon in another process can talk to it alike; dropping it stops
//! it. It binds loopback only.
//!
//! Not served: single-object GETs but of nodes and pods, and other resources (404),
//! other verbs (405; see `ResourceKind::verbs`), patch types other than
//! JSON merge and JSON patch (415), generateName and resourceVersion
//! preconditions on writes (the Recorder uses neither). A new resource is one more route in
//! `serve::Target::parse`.

mod proxy;
mod selector;
mod serve;
mod store;
mod watch;
mod write;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::AtomicUsize, mpsc},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    events::v1::Event,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{
    runtime::{Handle, Runtime},
    sync::oneshot,
};

pub use proxy::User;
pub use store::ResourceKind;
use store::{ObjectKey, Store};

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("starting the fake API server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the fake API server did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("{kind} {name:?} is not stored")]
    NotFound { kind: &'static str, name: String },
    #[error("invalid {kind}: {reason}")]
    InvalidObject { kind: &'static str, reason: String },
}

pub type Result<T, E = ApiServerError> = std::result::Result<T, E>;

/// How long `stop` waits for open connections to be dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of a [`FakeApiServer`].
#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    /// How often a watch that allows bookmarks gets one. The real server
    /// sends about one a minute; the default here is short so tests see
    /// them.
    pub bookmark_interval: Duration,
    /// How many changes the server remembers for watches and paged lists
    /// to resume from; older positions get 410 Gone.
    pub history_limit: usize,
    /// The longest a watch lasts, whatever `timeoutSeconds` asks: the real
    /// server ends watches after `--min-request-timeout` (30 to 60 min);
    /// tests shorten it to see renewals.
    pub max_watch_timeout: Option<Duration>,
    /// Users by bearer token. A request without a token is served as
    /// before, but for the pod proxy, which needs a user granted it.
    pub users: BTreeMap<String, User>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 1000,
            max_watch_timeout: None,
            users: BTreeMap::new(),
        }
    }
}

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET of one object.
    Get,
    List,
    Watch,
    /// POST to a collection.
    Create,
    /// PATCH of one object.
    Patch,
    /// A request through the pod proxy (`pods/NAME/proxy/...`).
    Proxy,
}

/// A request the server received and served, as tests inspect it (even if
/// it was then refused, e.g. a create of an existing name).
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub verb: Verb,
    pub resource: ResourceKind,
    /// The namespace of a namespaced path (`/api/v1/namespaces/NS/pods`).
    pub namespace: Option<String>,
    /// The object of a request on one object (a PATCH).
    pub name: Option<String>,
    /// The query parameters, decoded, in the order sent.
    pub query: Vec<(String, String)>,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl ApiRequest {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What the serving tasks share with the test-control side.
struct Shared {
    store: Mutex<Store>,
    /// Ticks after every write to `store`, waking the watches.
    changed: tokio::sync::watch::Sender<()>,
    requests: Mutex<Vec<ApiRequest>>,
    open_watches: AtomicUsize,
    bookmark_interval: Duration,
    max_watch_timeout: Option<Duration>,
    /// Called with the node's name before a node PATCH is applied.
    node_patch_hook: Mutex<Option<NodePatchHook>>,
    users: BTreeMap<String, User>,
}

type NodePatchHook = Box<dyn Fn(&str) + Send>;

/// A lock that survives a panic elsewhere: the state it guards stays
/// consistent between statements, and tests should see the panic that
/// caused the poisoning rather than a second one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The accept loop while the server listens.
struct Listening {
    stop: oneshot::Sender<()>,
    /// Disconnects when the accept loop has closed the listener and dropped
    /// every connection (its sender is dropped with the task).
    stopped: mpsc::Receiver<()>,
}

/// The fake API server: listening on `127.0.0.1:<ephemeral port>` from
/// `start` until dropped. Its methods may be called from synchronous or
/// async code; only `stop`, `restart` and `drop` wait, briefly, for its
/// connections to close.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    listening: Option<Listening>,
    /// Spawns on, and registers sockets with, `runtime`.
    handle: Handle,
    /// An `Option` only so that `drop` can shut it down without blocking.
    runtime: Option<Runtime>,
}

impl FakeApiServer {
    /// Starts listening with the default options.
    pub fn start() -> Result<FakeApiServer> {
        FakeApiServer::start_with(&ApiServerOptions::default())
    }

    pub fn start_with(options: &ApiServerOptions) -> Result<FakeApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let (changed, _) = tokio::sync::watch::channel(());
        let mut server = FakeApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::new(options.history_limit)),
                changed,
                requests: Mutex::new(Vec::new()),
                open_watches: AtomicUsize::new(0),
                bookmark_interval: options.bookmark_interval,
                max_watch_timeout: options.max_watch_timeout,
                node_patch_hook: Mutex::new(None),
                users: options.users.clone(),
            }),
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listening: None,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        };
        server.listen()?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`, the same across `restart`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A kubeconfig for this server: one cluster with its URL, a user
    /// without credentials, one context (namespace `default`) that is the
    /// current context.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_as(None)
    }

    /// [`kubeconfig`](Self::kubeconfig) with the user's bearer token, if any.
    pub fn kubeconfig_as(&self, token: Option<&str>) -> String {
        let url = self.url();
        let user = token.map_or_else(|| "{}".to_owned(), |t| format!("{{token: {t}}}"));
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake-apiserver
  cluster:
    server: {url}
users:
- name: fake-apiserver
  user: {user}
contexts:
- name: fake-apiserver
  context:
    cluster: fake-apiserver
    user: fake-apiserver
    namespace: default
current-context: fake-apiserver
preferences: {{}}
"
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`, for a client that
    /// reads `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig()).map_err(|source| ApiServerError::Kubeconfig {
            path: path.to_owned(),
            source,
        })
    }

    /// Creates or replaces a pod (namespace `default` if it names none) and
    /// returns it as stored, with its new resourceVersion.
    pub fn apply_pod(&self, pod: Pod) -> Result<Pod> {
        self.apply(ResourceKind::Pods, pod)
    }

    /// Creates or replaces a namespace and returns it as stored.
    pub fn apply_namespace(&self, namespace: Namespace) -> Result<Namespace> {
        self.apply(ResourceKind::Namespaces, namespace)
    }

    /// Creates or replaces a node and returns it as stored.
    pub fn apply_node(&self, node: Node) -> Result<Node> {
        self.apply(ResourceKind::Nodes, node)
    }

    /// A node as stored now.
    pub fn node(&self, name: &str) -> Result<Node> {
        let key = ObjectKey {
            namespace: String::new(),
            name: name.to_owned(),
        };
        let stored = lock(&self.shared.store)
            .get(ResourceKind::Nodes, &key)
            .map(|node| Value::clone(node))
            .ok_or_else(|| ApiServerError::NotFound {
                kind: ResourceKind::Nodes.kind(),
                name: name.to_owned(),
            })?;
        decode(ResourceKind::Nodes, stored)
    }

    /// Runs `hook` with the node's name on every node PATCH, before it is
    /// applied: a test looks at the world as it is when the patch arrives.
    pub fn on_node_patch(&self, hook: impl Fn(&str) + Send + 'static) {
        *lock(&self.shared.node_patch_hook) = Some(Box::new(hook));
    }

    /// Deletes a pod at once (as after its grace period), returning it as
    /// watchers see it deleted.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        self.delete(ResourceKind::Pods, namespace, name)
    }

    /// Deletes a namespace object. Unlike a real cluster it does not delete
    /// the pods in it: tests do that themselves, in the order they want.
    pub fn delete_namespace(&self, name: &str) -> Result<Namespace> {
        self.delete(ResourceKind::Namespaces, "", name)
    }

    /// Forgets the change history, as etcd compaction does: a watch or a
    /// paged list resuming from an older resourceVersion gets 410 Gone. Open
    /// watches that are up to date go on; one with changes not yet sent
    /// gets 410 too.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
        self.shared.changed.send_replace(());
    }

    /// Makes every resourceVersion handed out so far too old: each open
    /// watch gets an `ERROR` event with a 410 `Expired` status and ends, and
    /// resuming from any version seen so far gets 410, so clients relist.
    pub fn expire_watches(&self) {
        lock(&self.shared.store).expire();
        self.shared.changed.send_replace(());
    }

    /// Every stored event as it is now (after the patches it got), ordered
    /// by namespace, then name.
    pub fn events(&self) -> Result<Vec<Event>> {
        let stored: Vec<Arc<Value>> = lock(&self.shared.store)
            .objects(ResourceKind::Events)
            .cloned()
            .collect();
        stored
            .iter()
            .map(|event| decode(ResourceKind::Events, Value::clone(event)))
            .collect()
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests of this verb on this resource were received, e.g.
    /// to wait for "a relist happened".
    pub fn request_count(&self, verb: Verb, resource: ResourceKind) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|request| request.verb == verb && request.resource == resource)
            .count()
    }

    /// How many watch responses are streaming now.
    pub fn open_watches(&self) -> usize {
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops listening and drops every connection, open watches included;
    /// connecting is refused until `restart`. Stored objects and history
    /// stay. Stopping a stopped server does nothing.
    pub fn stop(&mut self) -> Result<()> {
        let Some(listening) = self.listening.take() else {
            return Ok(());
        };
        // An error means the accept loop has ended already.
        let _ = listening.stop.send(());
        match listening.stopped.recv_timeout(STOP_TIMEOUT) {
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiServerError::StopTimeout(STOP_TIMEOUT)),
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
        }
    }

    /// Stops (if listening) and listens again on the same port with the
    /// same objects and history, as an API server restarting over the same
    /// etcd.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.listen()
    }

    /// Binds `self.address` (port 0 the first time, then the port it got)
    /// and spawns the accept loop.
    fn listen(&mut self) -> Result<()> {
        let listen_error = |source| ApiServerError::Listen {
            address: self.address,
            source,
        };
        // std binds with SO_REUSEADDR, so connections of the previous run
        // left in TIME_WAIT do not keep a restart from the same port.
        let listener = TcpListener::bind(self.address).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        let listener = {
            let _runtime = self.handle.enter();
            tokio::net::TcpListener::from_std(listener).map_err(listen_error)?
        };
        let (stop, stop_requested) = oneshot::channel();
        let (stopped_sender, stopped) = mpsc::channel::<()>();
        let shared = Arc::clone(&self.shared);
        self.handle.spawn(async move {
            let _stopped_on_drop = stopped_sender;
            serve::serve(listener, shared, stop_requested).await;
        });
        self.address = address;
        self.listening = Some(Listening { stop, stopped });
        Ok(())
    }

    fn apply<K: Serialize + DeserializeOwned>(
        &self,
        resource: ResourceKind,
        object: K,
    ) -> Result<K> {
        let invalid = |reason: String| ApiServerError::InvalidObject {
            kind: resource.kind(),
            reason,
        };
        let value = serde_json::to_value(object).map_err(|e| invalid(e.to_string()))?;
        let stored = lock(&self.shared.store)
            .apply(resource, value)
            .map_err(invalid)?;
        self.shared.changed.send_replace(());
        decode(resource, stored)
    }

    fn delete<K: DeserializeOwned>(
        &self,
        resource: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<K> {
        let key = ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let deleted = lock(&self.shared.store)
            .delete(resource, &key)
            .ok_or_else(|| ApiServerError::NotFound {
                kind: resource.kind(),
                name: format!("{namespace}/{name}")
                    .trim_start_matches('/')
                    .to_owned(),
            })?;
        self.shared.changed.send_replace(());
        decode(resource, deleted)
    }
}

/// A stored object as its Rust type.
fn decode<K: DeserializeOwned>(resource: ResourceKind, object: Value) -> Result<K> {
    serde_json::from_value(object).map_err(|e| ApiServerError::InvalidObject {
        kind: resource.kind(),
        reason: e.to_string(),
    })
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Close the port and the connections before returning, then let the
        // runtime's thread go without blocking (drop may run in async code).
        let _ = self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
