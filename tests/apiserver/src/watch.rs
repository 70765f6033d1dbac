//! WATCH: a chunked stream of newline-delimited JSON events, filtered per
//! watcher, with bookmarks, timeouts and 410 Gone as the real server does.

use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::stream;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::{Response, StatusCode, body::Frame};
use serde_json::{Value, json};
use tokio::{
    sync::watch,
    time::{Instant, Interval, MissedTickBehavior},
};

use super::{
    Shared, lock,
    selector::ObjectFilter,
    serve::{Body, Failure, Query, json_response, requested_version},
    store::{Change, ResourceKind, with_resource_version},
};

/// How long a watch lasts when the client gives no `timeoutSeconds`: the
/// real server's `--min-request-timeout` default.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

/// The annotation on the bookmark that ends the initial events of a
/// `sendInitialEvents=true` watch.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Answers a watch request: validates it, takes the starting position (and
/// the initial events, when asked for) under the store lock, and hands the
/// rest to a [`WatchSession`] that the response body drives.
pub(crate) fn start(
    shared: &Arc<Shared>,
    resource: ResourceKind,
    filter: ObjectFilter,
    query: &Query,
) -> Result<Response<Body>, Failure> {
    match (
        query.send_initial_events,
        query.resource_version_match.as_deref(),
    ) {
        (None, Some(_)) => {
            return Err(Failure::bad_request(
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        (Some(_), match_) if match_ != Some("NotOlderThan") => {
            return Err(Failure::bad_request(
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
            ));
        }
        (Some(true), _) if !query.allow_watch_bookmarks => {
            return Err(Failure::bad_request(
                "sendInitialEvents=true requires allowWatchBookmarks=true",
            ));
        }
        _ => {}
    }

    // Subscribe before reading the store, so no change slips between the
    // two unnoticed.
    let mut changed = shared.changed.subscribe();
    changed.mark_unchanged();
    let store = lock(&shared.store);
    let current = store.resource_version();
    let requested = requested_version(query.resource_version.as_deref(), current)?;
    // Watching from "" or "0" starts with the current state as ADDED events,
    // as the real server's watch cache does.
    let send_initial = query.send_initial_events.unwrap_or(requested.is_none());
    let mut opening = Vec::new();
    let position = if send_initial {
        for object in store
            .objects(resource)
            .filter(|object| filter.matches(object))
        {
            push_event(&mut opening, "ADDED", object);
        }
        if query.send_initial_events == Some(true) {
            push_event(
                &mut opening,
                "BOOKMARK",
                &bookmark(resource, current, Some(INITIAL_EVENTS_END)),
            );
        }
        current
    } else {
        requested.unwrap_or(current)
    };
    drop(store);

    let asked = query
        .timeout_seconds
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let timeout = shared
        .max_watch_timeout
        .map_or(asked, |limit| asked.min(limit));
    let session = WatchSession {
        shared: Arc::clone(shared),
        resource,
        filter,
        position,
        opening: Some(opening).filter(|opening| !opening.is_empty()),
        bookmarks: query.allow_watch_bookmarks.then(|| {
            let every = shared.bookmark_interval;
            let mut timer = tokio::time::interval_at(Instant::now() + every, every);
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            timer
        }),
        deadline: Instant::now() + timeout,
        changed,
        ended: false,
    };
    // Counted down when the session drops.
    shared.open_watches.fetch_add(1, Ordering::SeqCst);

    let frames = stream::unfold(session, |mut session| async move {
        let chunk = session.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), session))
    });
    Ok(json_response(
        StatusCode::OK,
        StreamBody::new(frames).boxed_unsync(),
    ))
}

/// One open watch. Dropped when the stream ends or the client (or a server
/// stop) drops the connection.
struct WatchSession {
    shared: Arc<Shared>,
    resource: ResourceKind,
    filter: ObjectFilter,
    /// Every change up to this version has been considered for this watch.
    position: u64,
    opening: Option<Vec<u8>>,
    bookmarks: Option<Interval>,
    deadline: Instant,
    changed: watch::Receiver<()>,
    ended: bool,
}

impl WatchSession {
    /// The next piece of the response body: one or more event lines, or
    /// `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(opening) = self.opening.take() {
            return Some(opening.into());
        }
        if self.ended {
            return None;
        }
        loop {
            self.changed.mark_unchanged();
            let mut lines = Vec::new();
            match self.collect_changes(&mut lines) {
                Ok(()) if lines.is_empty() => {}
                Ok(()) => return Some(lines.into()),
                Err(failure) => {
                    // The real server ends a watch after its ERROR event.
                    self.ended = true;
                    push_event(&mut lines, "ERROR", &failure.status());
                    return Some(lines.into());
                }
            }
            match self.wait().await {
                Wake::Changed => {}
                Wake::BookmarkDue => {
                    let mut line = Vec::new();
                    push_event(
                        &mut line,
                        "BOOKMARK",
                        &bookmark(self.resource, self.position, None),
                    );
                    return Some(line.into());
                }
                Wake::TimedOut => return None,
            }
        }
    }

    async fn wait(&mut self) -> Wake {
        let bookmarks = &mut self.bookmarks;
        let bookmark_due = async {
            match bookmarks {
                Some(timer) => {
                    timer.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(self.deadline) => Wake::TimedOut,
            () = bookmark_due => Wake::BookmarkDue,
            // An error means the store is gone (this session's own reference
            // to it rules that out): end the watch.
            changed = self.changed.changed() => match changed {
                Ok(()) => Wake::Changed,
                Err(_) => Wake::TimedOut,
            },
        }
    }

    /// Appends the events this watcher should see since `position`, and
    /// moves `position` to the newest version.
    fn collect_changes(&mut self, lines: &mut Vec<u8>) -> Result<(), Failure> {
        let store = lock(&self.shared.store);
        let changes = store
            .changes_after(self.resource, self.position)
            .map_err(|expired| Failure::too_old(&expired))?;
        for change in changes {
            if let Some((kind, object)) = self.event_for(change) {
                push_event(lines, kind, &object);
            }
        }
        self.position = store.resource_version();
        Ok(())
    }

    /// What a change looks like through this watcher's selectors: an object
    /// that starts matching is ADDED, one that stops matching is DELETED
    /// (its last matching state at the change's version), as the real
    /// server's watch cache does.
    fn event_for<'a>(&self, change: &'a Change) -> Option<(&'static str, Value)> {
        let matched =
            |object: Option<&'a Value>| object.filter(|object| self.filter.matches(object));
        match (
            matched(change.previous.as_deref()),
            matched(change.current.as_deref()),
        ) {
            (None, Some(current)) => Some(("ADDED", current.clone())),
            (Some(_), Some(current)) => Some(("MODIFIED", current.clone())),
            (Some(previous), None) => Some((
                "DELETED",
                with_resource_version(previous, change.resource_version),
            )),
            (None, None) => None,
        }
    }
}

/// What ends a wait between chunks.
enum Wake {
    Changed,
    BookmarkDue,
    TimedOut,
}

impl Drop for WatchSession {
    fn drop(&mut self) {
        self.shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn push_event(lines: &mut Vec<u8>, kind: &str, object: &Value) {
    lines.extend_from_slice(
        json!({ "type": kind, "object": object })
            .to_string()
            .as_bytes(),
    );
    lines.push(b'\n');
}

/// A BOOKMARK object: the kind and a resourceVersion, nothing else.
fn bookmark(resource: ResourceKind, resource_version: u64, annotation: Option<&str>) -> Value {
    let mut object = json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": { "resourceVersion": resource_version.to_string() },
    });
    if let Some(annotation) = annotation {
        object["metadata"]["annotations"] = json!({ annotation: "true" });
    }
    object
}
