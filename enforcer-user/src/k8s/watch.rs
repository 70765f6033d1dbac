//! This node's pods and the cluster's namespaces as the API server reports
//! them: two watches, each fed into a list that a full (re)list replaces
//! whole, and a probe of the API server's reachability for readiness.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::warn;

use crate::{
    k8s::view::{NamespaceEntry, PodEntry, namespace_entry},
    report::http::Health,
};

/// A watch ended; the watcher retries on its own, with backoff, and never
/// ends, so this is a bug to surface.
#[derive(Debug, thiserror::Error)]
#[error("the {0} watch ended")]
pub struct WatchEnded(pub &'static str);

/// Feeds watcher events into a list that a full (re)list replaces whole, so
/// objects deleted while the watch was away disappear.
struct Relist<T> {
    buffer: Option<Vec<T>>,
    synced: bool,
}

/// What a watcher event changes.
pub enum Change<T> {
    Apply(T),
    Delete(T),
    Replace(Vec<T>),
    Nothing,
}

impl<T> Relist<T> {
    fn new() -> Self {
        Relist {
            buffer: None,
            synced: false,
        }
    }

    fn feed<K>(
        &mut self,
        event: watcher::Event<K>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> Change<T> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                Change::Nothing
            }
            watcher::Event::InitApply(object) => {
                if let (Some(buffer), Some(entry)) = (self.buffer.as_mut(), convert(&object)) {
                    buffer.push(entry);
                }
                Change::Nothing
            }
            watcher::Event::InitDone => {
                self.synced = true;
                Change::Replace(self.buffer.take().unwrap_or_default())
            }
            watcher::Event::Apply(object) => {
                convert(&object).map_or(Change::Nothing, Change::Apply)
            }
            watcher::Event::Delete(object) => {
                convert(&object).map_or(Change::Nothing, Change::Delete)
            }
        }
    }
}

/// Waits for the next event of a watch; `None` for a failed request.
async fn next_event<K>(
    stream: &mut (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin),
    what: &'static str,
) -> Result<Option<watcher::Event<K>>, WatchEnded> {
    match stream.next().await {
        Some(Ok(event)) => Ok(Some(event)),
        Some(Err(err)) => {
            warn!(
                watch = what,
                "API server watch failed, retrying with backoff: {err}"
            );
            Ok(None)
        }
        None => Err(WatchEnded(what)),
    }
}

/// What one watch event says.
pub enum Update {
    Pod(Change<PodEntry>),
    Namespace(Change<NamespaceEntry>),
    /// A watch request failed; the watcher retries with backoff.
    Failed,
}

type EventStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The watches of this node's pods and of every namespace.
pub struct Watches {
    pods: EventStream<Pod>,
    namespaces: EventStream<Namespace>,
    pod_list: Relist<PodEntry>,
    namespace_list: Relist<NamespaceEntry>,
}

impl Watches {
    pub fn open(client: Client, node_name: &str) -> Watches {
        let node_field = format!("spec.nodeName={node_name}");
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&node_field),
        )
        .default_backoff()
        .boxed();
        let namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default())
            .default_backoff()
            .boxed();
        Watches {
            pods,
            namespaces,
            pod_list: Relist::new(),
            namespace_list: Relist::new(),
        }
    }

    /// The next event of either watch. Cancel-safe.
    pub async fn next(&mut self) -> Result<Update, WatchEnded> {
        tokio::select! {
            event = next_event(&mut self.pods, "pods") => Ok(event?.map_or(Update::Failed, |e| {
                Update::Pod(self.pod_list.feed(e, PodEntry::from_pod))
            })),
            event = next_event(&mut self.namespaces, "namespaces") => Ok(event?.map_or(Update::Failed, |e| {
                Update::Namespace(self.namespace_list.feed(e, namespace_entry))
            })),
        }
    }

    /// Both watches have listed everything at least once.
    pub fn synced(&self) -> bool {
        self.pod_list.synced && self.namespace_list.synced
    }
}

/// How often the API server's reachability is checked for readiness.
const API_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps `api_reachable` true while the API server answers. Quiet watches
/// yield no events (kube keeps bookmarks to itself), so readiness cannot
/// learn of a recovery from them alone.
pub async fn probe_api(client: Client, health: Arc<Health>) {
    let namespaces = Api::<Namespace>::all(client);
    let one = ListParams::default().limit(1);
    let mut tick = tokio::time::interval(API_PROBE_INTERVAL);
    loop {
        tick.tick().await;
        let reachable = namespaces.list(&one).await.is_ok();
        health.api_reachable.store(reachable, Ordering::Relaxed);
    }
}
