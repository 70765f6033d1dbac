//! This node's pods and the cluster's namespaces (their metadata only) as
//! the API server reports them: two watches, each fed into a list that a
//! full (re)list replaces whole. Lists are served from the API server's
//! watch cache (`resourceVersion=0`), and a failed request is retried after
//! a pause spread wide enough that a restarted API server is not met by
//! every node at once.

use std::time::Duration;

use tokio::time::Instant;

use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client, core::PartialObjectMeta, runtime::watcher};
use rand::Rng as _;
use tracing::warn;

use crate::k8s::view::{NamespaceEntry, PodEntry, namespace_entry};

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

/// Which watch an update comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WatchName {
    Pods,
    Namespaces,
}

impl WatchName {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchName::Pods => "pods",
            WatchName::Namespaces => "namespaces",
        }
    }
}

/// Why a watch request failed, as far as readiness cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The API server was not reached, or did not answer.
    Unreachable,
    /// The API server answered with an error status (403, 410, ...): only
    /// a working request of that watch clears it.
    Refused,
}

impl Failure {
    fn of(err: &watcher::Error) -> Failure {
        let kube_error = match err {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => e,
            watcher::Error::WatchError(_) => return Failure::Refused,
            watcher::Error::NoResourceVersion => return Failure::Unreachable,
        };
        match kube_error {
            kube::Error::Api(_) => Failure::Refused,
            _ => Failure::Unreachable,
        }
    }
}

/// What one watch event says.
pub enum Update {
    Pod(Change<PodEntry>),
    Namespace(Change<NamespaceEntry>),
    /// A request of the watch worked (an event came).
    Working(WatchName),
    /// A watch request failed; the watcher retries after a pause.
    Failed(WatchName, Failure),
}

/// Waits for the next event of a watch; `Err` for a failed request.
async fn next_event<K>(
    stream: &mut (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin),
    name: WatchName,
) -> Result<Result<watcher::Event<K>, Failure>, WatchEnded> {
    match stream.next().await {
        Some(Ok(event)) => Ok(Ok(event)),
        Some(Err(err)) => {
            warn!(
                watch = name.as_str(),
                "API server watch failed, retrying after a pause: {err}"
            );
            Ok(Err(Failure::of(&err)))
        }
        None => Err(WatchEnded(name.as_str())),
    }
}

/// Pauses between failed watch requests. The first is drawn at random
/// from the whole of [`FIRST_PAUSE_SPREAD`], whatever failed: the nodes
/// whose watches broke at the same instant (an API server restart, whose
/// clients then find their positions expired, or an overloaded one
/// answering 429) come back spread over it, a few percent of the fleet per
/// second rather than all of it at once. Later pauses double from two
/// seconds up to a minute, each ±50 %, until a request works again.
#[derive(Debug, Default)]
pub struct SpreadBackoff {
    failures: u32,
}

/// Over this span the first retries of a fleet are spread.
pub const FIRST_PAUSE_SPREAD: Duration = Duration::from_secs(30);
const SECOND_PAUSE: Duration = Duration::from_secs(2);
const MAX_PAUSE: Duration = Duration::from_mins(1);

impl SpreadBackoff {
    /// The pause after the next failure.
    pub fn pause(&mut self) -> Duration {
        let mut rng = rand::rng();
        let pause = if self.failures == 0 {
            FIRST_PAUSE_SPREAD.mul_f64(rng.random::<f64>())
        } else {
            let doubled = SECOND_PAUSE.saturating_mul(1 << (self.failures - 1).min(6));
            doubled.min(MAX_PAUSE).mul_f64(rng.random_range(0.5..1.5))
        };
        self.failures = self.failures.saturating_add(1);
        pause
    }

    /// A request worked: the next failure starts over.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// One watch: its stream, and the pause it waits out after a failure
/// before it is polled again (the kube watcher retries when polled).
struct PausedWatch<K> {
    stream: EventStream<K>,
    resume_at: Option<Instant>,
    backoff: SpreadBackoff,
    name: WatchName,
}

impl<K> PausedWatch<K> {
    fn new(stream: EventStream<K>, name: WatchName) -> Self {
        PausedWatch {
            stream,
            resume_at: None,
            backoff: SpreadBackoff::default(),
            name,
        }
    }

    /// The next event, after the pause if one is running; `Err(failure)`
    /// for a failed request. Cancel-safe: the pause is a deadline.
    async fn next(&mut self) -> Result<Result<watcher::Event<K>, Failure>, WatchEnded> {
        if let Some(at) = self.resume_at {
            tokio::time::sleep_until(at).await;
            self.resume_at = None;
        }
        let event = next_event(&mut self.stream, self.name).await?;
        match &event {
            // `Init` is the watcher's own step before it lists: no request
            // has worked yet.
            Ok(watcher::Event::Init) => {}
            Ok(_) => self.backoff.reset(),
            Err(_) => self.resume_at = Some(Instant::now() + self.backoff.pause()),
        }
        Ok(event)
    }
}

/// Lists served from the API server's watch cache (`resourceVersion=0`)
/// rather than by a quorum read of etcd. Unpaged, as client-go's reflector
/// does it: the API server does not page cache reads, and kube drops the
/// `resourceVersion=0` of a paged list.
fn from_watch_cache() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
}

type EventStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The watches of this node's pods and of every namespace's metadata.
pub struct Watches {
    pods: PausedWatch<Pod>,
    namespaces: PausedWatch<PartialObjectMeta<Namespace>>,
    pod_list: Relist<PodEntry>,
    namespace_list: Relist<NamespaceEntry>,
}

impl Watches {
    pub fn open(client: Client, node_name: &str) -> Watches {
        let node_field = format!("spec.nodeName={node_name}");
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            from_watch_cache().fields(&node_field),
        )
        .boxed();
        // Metadata only: labels are all the policy reads of a namespace.
        let namespaces = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client),
            from_watch_cache(),
        )
        .boxed();
        Watches {
            pods: PausedWatch::new(pods, WatchName::Pods),
            namespaces: PausedWatch::new(namespaces, WatchName::Namespaces),
            pod_list: Relist::new(),
            namespace_list: Relist::new(),
        }
    }

    /// The next event of either watch. Cancel-safe.
    pub async fn next(&mut self) -> Result<Vec<Update>, WatchEnded> {
        let (name, worked, change) = tokio::select! {
            event = self.pods.next() => {
                let event = event?;
                let worked = matches!(event, Ok(ref e) if !matches!(e, watcher::Event::Init));
                (WatchName::Pods, worked, event.map(|e| Update::Pod(self.pod_list.feed(e, PodEntry::from_pod))))
            }
            event = self.namespaces.next() => {
                let event = event?;
                let worked = matches!(event, Ok(ref e) if !matches!(e, watcher::Event::Init));
                (WatchName::Namespaces, worked, event.map(|e| Update::Namespace(self.namespace_list.feed(e, namespace_entry))))
            }
        };
        Ok(match change {
            // Only an event a request brought proves the API server works.
            Ok(update) if worked => vec![Update::Working(name), update],
            Ok(update) => vec![update],
            Err(failure) => vec![Update::Failed(name, failure)],
        })
    }

    /// Both watches have listed everything at least once.
    pub fn synced(&self) -> bool {
        self.pod_list.synced && self.namespace_list.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pauses_spread_over_the_window_later_ones_double() {
        let firsts: Vec<Duration> = (0..2000)
            .map(|_| SpreadBackoff::default().pause())
            .collect();
        assert!(firsts.iter().all(|p| *p < FIRST_PAUSE_SPREAD));
        // Every sixth of the window gets a share: the fleet is spread.
        let sixth = FIRST_PAUSE_SPREAD / 6;
        for slot in 0..6 {
            let count = firsts
                .iter()
                .filter(|p| **p >= sixth * slot && **p < sixth * (slot + 1))
                .count();
            assert!((200..500).contains(&count), "slot {slot}: {count}");
        }
        let mut backoff = SpreadBackoff::default();
        backoff.pause();
        let bounds = [2, 4, 8, 16, 32, 60, 60, 60];
        for bound in bounds {
            let pause = backoff.pause();
            let bound = Duration::from_secs(bound);
            assert!(
                pause >= bound / 2 && pause <= bound.mul_f64(1.5),
                "{pause:?} vs {bound:?}"
            );
        }
        backoff.reset();
        assert!(backoff.pause() < FIRST_PAUSE_SPREAD);
    }
}
