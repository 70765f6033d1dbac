//! The fake API server, driven by the real kube-rs client, watcher and
//! event recorder the daemon uses: lists with selectors and pages, watches
//! through selector changes, bookmarks, 410 Gone and relists, a restart on
//! the same port, and Events published and aggregated. No root needed.

use std::{
    fmt::Debug,
    future::Future,
    time::{Duration, Instant},
};

use enforcer_user::{
    k8s::notify::{
        self, ACTION_AUDIT, ACTION_IGNORE_LABEL, ACTION_REFUSE, CONTROLLER, REASON_AUDITED,
        REASON_BLOCKED, REASON_LABEL_IGNORED,
    },
    report::events::{PodNotice, PodRef},
};
use futures::StreamExt as _;
use imds_guard_test_apiserver::{ApiServerOptions, FakeApiServer, ResourceKind, Verb};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, ObjectReference, Pod, PodSpec},
        events::v1::Event as K8sEvent,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams, VersionMatch, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, events::Recorder, watcher},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

/// The longest any single expected thing may take; the watcher's first
/// backoff after an error is 0.8 s (plus jitter).
const WAIT: Duration = Duration::from_secs(5);

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(future)
}

fn start() -> FakeApiServer {
    FakeApiServer::start().expect("fake API server starts")
}

/// A client configured the way the daemon's is: from a kubeconfig.
async fn client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    Client::try_from(config).expect("client")
}

fn pod(namespace: &str, name: &str, node: Option<&str>, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: node.map(str::to_owned),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Stores pod `apps/NAME` on node-a, without labels.
fn add_pod(server: &FakeApiServer, name: &str) -> Pod {
    server
        .apply_pod(pod("apps", name, Some("node-a"), &[]))
        .unwrap_or_else(|e| panic!("storing pod {name}: {e}"))
}

fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn relabel(mut pod: Pod, key: &str, value: &str) -> Pod {
    pod.labels_mut().insert(key.to_owned(), value.to_owned());
    pod
}

/// `namespace/name` of each item, in the order listed.
fn keys<K: kube::Resource>(items: &[K]) -> Vec<String> {
    items
        .iter()
        .map(|item| {
            format!(
                "{}/{}",
                item.namespace().unwrap_or_default(),
                item.name_any()
            )
        })
        .collect()
}

/// Polls `condition` until it holds; fails with `what` after [`WAIT`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn api_status(error: kube::Error) -> Box<kube::core::Status> {
    match error {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

/// A watcher on all pods, with a client of its own.
async fn pod_watcher(server: &FakeApiServer, config: watcher::Config) -> Watcher<Pod> {
    Watcher::new(Api::all(client(server).await), config)
}

/// A kube-rs watcher with the daemon's settings (`default_backoff`), polled
/// continuously by its own task as a daemon would, and what it yielded so
/// far for failure messages.
struct Watcher<K> {
    items: mpsc::UnboundedReceiver<Result<watcher::Event<K>, watcher::Error>>,
    seen: Vec<String>,
}

impl<K> Watcher<K>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    fn new(api: Api<K>, config: watcher::Config) -> Self {
        let (sender, items) = mpsc::unbounded_channel();
        let mut stream = watcher(api, config).default_backoff().boxed();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if sender.send(item).is_err() {
                    break;
                }
            }
        });
        Watcher {
            items,
            seen: Vec::new(),
        }
    }

    /// The next event or error, as `Init`, `InitApply(name)`, ...,
    /// `error: ...`.
    async fn next(&mut self) -> Result<watcher::Event<K>, String> {
        let item = tokio::time::timeout(WAIT, self.items.recv())
            .await
            .unwrap_or_else(|_| panic!("no watcher event within {WAIT:?}; so far: {:?}", self.seen))
            .unwrap_or_else(|| panic!("the watcher stream ended; so far: {:?}", self.seen));
        let item = item.map_err(|error| format!("error: {error}"));
        self.seen.push(match &item {
            Ok(event) => event.to_string(),
            Err(error) => error.clone(),
        });
        item
    }

    /// The next event, skipping errors (which the backoff paces).
    async fn next_event(&mut self) -> watcher::Event<K> {
        loop {
            if let Ok(event) = self.next().await {
                return event;
            }
        }
    }

    /// Asserts what the next events are, described as `Init`,
    /// `InitApply(name)`, `Apply(name)`, ...
    async fn expect(&mut self, expected: &[&str]) {
        let mut events = Vec::new();
        for _ in expected {
            events.push(self.next_event().await.to_string());
        }
        assert_eq!(events, expected, "all so far: {:?}", self.seen);
    }

    /// Asserts that the next events are a complete (re)list of `names`.
    async fn expect_listed(&mut self, names: &[&str]) {
        let applied: Vec<String> = names
            .iter()
            .map(|name| format!("InitApply({name})"))
            .collect();
        let mut expected = vec!["Init"];
        expected.extend(applied.iter().map(String::as_str));
        expected.push("InitDone");
        self.expect(&expected).await;
    }

    /// The next error, which must come before any event.
    async fn error(&mut self) -> String {
        match self.next().await {
            Err(error) => error,
            Ok(event) => panic!(
                "expected a watcher error, got {event}; so far: {:?}",
                self.seen
            ),
        }
    }
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn lists_pods_by_node_and_label_selectors() {
    let server = start();
    server
        .apply_pod(pod(
            "apps",
            "web-1",
            Some("node-a"),
            &[("app", "web"), ("tier", "front")],
        ))
        .expect("web-1");
    server
        .apply_pod(pod("apps", "web-2", Some("node-b"), &[("app", "web")]))
        .expect("web-2");
    server
        .apply_pod(pod("apps", "db-1", Some("node-a"), &[("app", "db")]))
        .expect("db-1");
    server
        .apply_pod(pod("kube-system", "agent", Some("node-a"), &[]))
        .expect("agent");
    server
        .apply_pod(pod("apps", "pending", None, &[("app", "batch")]))
        .expect("pending");

    block_on(async {
        let client = client(&server).await;
        let all: Api<Pod> = Api::all(client.clone());
        let list = |params: ListParams| {
            let all = all.clone();
            async move { keys(&all.list(&params).await.expect("list").items) }
        };

        let on_node_a = all
            .list(&ListParams::default().fields("spec.nodeName=node-a"))
            .await
            .expect("list by node");
        assert_eq!(
            keys(&on_node_a.items),
            ["apps/db-1", "apps/web-1", "kube-system/agent"]
        );
        assert_eq!(
            on_node_a.metadata.resource_version,
            Some(server.resource_version().to_string()),
            "a list carries the newest resourceVersion"
        );
        let in_apps: Api<Pod> = Api::namespaced(client.clone(), "apps");
        let apps_on_node_a = in_apps
            .list(&ListParams::default().fields("spec.nodeName=node-a"))
            .await
            .expect("namespaced list");
        assert_eq!(keys(&apps_on_node_a.items), ["apps/db-1", "apps/web-1"]);

        for (params, expected) in [
            (
                ListParams::default().fields("metadata.name=web-2"),
                vec!["apps/web-2"],
            ),
            (
                ListParams::default().fields("spec.nodeName="),
                vec!["apps/pending"],
            ),
            (
                ListParams::default().fields("spec.nodeName!=node-a,metadata.namespace=apps"),
                vec!["apps/pending", "apps/web-2"],
            ),
            (
                ListParams::default().labels("app=web"),
                vec!["apps/web-1", "apps/web-2"],
            ),
            (
                ListParams::default().labels("app!=web"),
                vec!["apps/db-1", "apps/pending", "kube-system/agent"],
            ),
            (
                ListParams::default().labels("app in (db,web),tier"),
                vec!["apps/web-1"],
            ),
            (
                ListParams::default().labels("app notin (web,batch)"),
                vec!["apps/db-1", "kube-system/agent"],
            ),
            (
                ListParams::default().labels("!app"),
                vec!["kube-system/agent"],
            ),
            (
                ListParams::default()
                    .labels("app=web")
                    .fields("spec.nodeName=node-b"),
                vec!["apps/web-2"],
            ),
        ] {
            let description = format!("{:?} {:?}", params.field_selector, params.label_selector);
            assert_eq!(list(params).await, expected, "{description}");
        }

        let refused = all
            .list(&ListParams::default().fields("spec.containers=x"))
            .await
            .expect_err("an unindexed field is refused");
        let status = api_status(refused);
        assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
        assert!(
            status.message.contains("field label not supported"),
            "{status:?}"
        );
    });

    let request = server
        .requests()
        .into_iter()
        .next()
        .expect("a request was recorded");
    assert_eq!(request.verb, Verb::List);
    assert_eq!(request.param("fieldSelector"), Some("spec.nodeName=node-a"));
}

#[test]
fn pages_come_from_one_snapshot_until_compaction() {
    let server = start();
    for name in ["a", "b", "c", "d", "e"] {
        add_pod(&server, name);
    }
    block_on(async {
        let pods: Api<Pod> = Api::namespaced(client(&server).await, "apps");
        let first = pods
            .list(&ListParams::default().limit(2))
            .await
            .expect("first page");
        assert_eq!(keys(&first.items), ["apps/a", "apps/b"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().expect("a continue token");

        // Changes after the first page do not show in the next ones.
        server.delete_pod("apps", "c").expect("delete c");
        add_pod(&server, "bb");
        let second = pods
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .expect("second page");
        assert_eq!(keys(&second.items), ["apps/c", "apps/d"]);
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );
        let third = pods
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(second.metadata.continue_.as_deref().expect("another token")),
            )
            .await
            .expect("third page");
        assert_eq!(keys(&third.items), ["apps/e"]);
        assert_eq!(third.metadata.continue_, None);

        // An exact read of an older version, then compaction makes it and
        // the token too old.
        let at_first = ListParams::default()
            .at(first
                .metadata
                .resource_version
                .as_deref()
                .expect("a version"))
            .matching(VersionMatch::Exact);
        assert_eq!(
            keys(&pods.list(&at_first).await.expect("exact list").items),
            ["apps/a", "apps/b", "apps/c", "apps/d", "apps/e"]
        );
        server.compact();
        for params in [
            at_first,
            ListParams::default().limit(2).continue_token(&token),
        ] {
            let status = api_status(pods.list(&params).await.expect_err("410 after compaction"));
            assert_eq!(
                (status.code, status.reason.as_str()),
                (410, "Expired"),
                "{status:?}"
            );
        }

        // kube's watcher pages its initial list the same way.
        let mut watcher = Watcher::new(pods, watcher::Config::default().page_size(2));
        watcher.expect_listed(&["a", "b", "bb", "d", "e"]).await;
    });
    let continued = server
        .requests()
        .into_iter()
        .filter(|request| request.param("continue").is_some())
        .count();
    assert!(continued >= 4, "the watcher's pages used continue tokens");
}

#[test]
fn watcher_sees_added_modified_deleted_on_its_node() {
    let server = start();
    add_pod(&server, "a");
    let listed_at = server.resource_version();
    block_on(async {
        let mut watcher = pod_watcher(
            &server,
            watcher::Config::default().fields("spec.nodeName=node-a"),
        )
        .await;
        watcher.expect_listed(&["a"]).await;

        server
            .apply_pod(pod("apps", "elsewhere", Some("node-b"), &[]))
            .expect("elsewhere");
        let c = add_pod(&server, "c");
        watcher.expect(&["Apply(c)"]).await;
        server
            .apply_pod(relabel(c, "app", "web"))
            .expect("relabel c");
        match watcher.next_event().await {
            watcher::Event::Apply(modified) => {
                assert_eq!(
                    modified.labels().get("app").map(String::as_str),
                    Some("web")
                );
            }
            other => panic!("expected the relabelled pod, got {other}"),
        }
        let deleted = server.delete_pod("apps", "c").expect("delete c");
        match watcher.next_event().await {
            watcher::Event::Delete(gone) => {
                assert_eq!(gone.resource_version(), deleted.resource_version());
                assert_eq!(
                    gone.resource_version(),
                    Some(server.resource_version().to_string())
                );
            }
            other => panic!("expected the deletion, got {other}"),
        }
    });

    // What kube's default watcher config sends, and what this server honours.
    let requests = server.requests();
    let list = requests
        .iter()
        .find(|r| r.verb == Verb::List)
        .expect("a list");
    assert_eq!(list.param("limit"), Some("500"));
    assert_eq!(list.param("resourceVersion"), None);
    let watch = requests
        .iter()
        .find(|r| r.verb == Verb::Watch)
        .expect("a watch");
    assert_eq!(watch.param("watch"), Some("true"));
    assert_eq!(
        watch.param("resourceVersion"),
        Some(listed_at.to_string().as_str())
    );
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("timeoutSeconds"), Some("290"));
    assert_eq!(watch.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(watch.param("sendInitialEvents"), None);
}

#[test]
fn pod_leaving_the_label_selector_arrives_as_deleted() {
    const PROTECTED: &str = "imds-guard.test/protected";
    let server = start();
    let p = server
        .apply_pod(pod("apps", "p", Some("node-a"), &[(PROTECTED, "true")]))
        .expect("p");
    add_pod(&server, "other");
    block_on(async {
        let selector = format!("{PROTECTED}=true");
        let mut watcher = pod_watcher(&server, watcher::Config::default().labels(&selector)).await;
        watcher.expect_listed(&["p"]).await;

        let unprotected = server
            .apply_pod(relabel(p, PROTECTED, "false"))
            .expect("relabel");
        match watcher.next_event().await {
            watcher::Event::Delete(gone) => {
                // Its last state that matched, at the version of the change.
                assert_eq!(
                    gone.labels().get(PROTECTED).map(String::as_str),
                    Some("true")
                );
                assert_eq!(gone.resource_version(), unprotected.resource_version());
            }
            other => panic!("expected a Delete for the pod leaving the selector, got {other}"),
        }
        server
            .apply_pod(relabel(unprotected, PROTECTED, "true"))
            .expect("relabel back");
        watcher.expect(&["Apply(p)"]).await;
        server.delete_pod("apps", "p").expect("delete");
        watcher.expect(&["Delete(p)"]).await;
    });
}

#[test]
fn bookmarks_carry_the_newest_version_and_watches_time_out() {
    let server = FakeApiServer::start_with(&ApiServerOptions {
        bookmark_interval: Duration::from_millis(100),
        ..ApiServerOptions::default()
    })
    .expect("fake API server starts");
    block_on(async {
        let pods: Api<Pod> = Api::all(client(&server).await);
        let start = server.resource_version().to_string();
        let mut events = pods
            .watch(&WatchParams::default(), &start)
            .await
            .expect("watch")
            .boxed();
        let mut next = async || {
            tokio::time::timeout(WAIT, events.next())
                .await
                .expect("a watch event in time")
                .expect("the watch goes on")
                .expect("a well-formed event")
        };
        match next().await {
            WatchEvent::Bookmark(bookmark) => assert_eq!(bookmark.metadata.resource_version, start),
            other => panic!("expected a bookmark, got {other:?}"),
        }
        add_pod(&server, "a");
        match next().await {
            WatchEvent::Added(added) => assert_eq!(added.name_any(), "a"),
            other => panic!("expected the new pod, got {other:?}"),
        }
        match next().await {
            WatchEvent::Bookmark(bookmark) => assert_eq!(
                bookmark.metadata.resource_version,
                server.resource_version().to_string()
            ),
            other => panic!("expected a bookmark, got {other:?}"),
        }

        // Without allowWatchBookmarks nothing comes, and timeoutSeconds
        // ends the response.
        let quiet = pods
            .watch(
                &WatchParams::default().disable_bookmarks().timeout(1),
                &start,
            )
            .await
            .expect("watch");
        let rest: Vec<_> = tokio::time::timeout(WAIT, quiet.collect::<Vec<_>>())
            .await
            .expect("the watch ends after its timeout");
        assert_eq!(rest.len(), 1, "only the change since `start`: {rest:?}");
    });
}

#[test]
fn compaction_gives_410_to_old_versions_only() {
    let server = start();
    let old = server.resource_version().to_string();
    block_on(async {
        let pods: Api<Pod> = Api::all(client(&server).await);
        let mut watcher = Watcher::new(pods.clone(), watcher::Config::default());
        watcher.expect_listed(&[]).await;
        add_pod(&server, "a");
        watcher.expect(&["Apply(a)"]).await;

        server.compact();
        let mut stale = pods
            .watch(&WatchParams::default(), &old)
            .await
            .expect("watch")
            .boxed();
        match stale.next().await {
            Some(Ok(WatchEvent::Error(status))) => {
                assert_eq!(
                    (status.code, status.reason.as_str()),
                    (410, "Expired"),
                    "{status:?}"
                );
            }
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(
            stale.next().await.is_none(),
            "the watch ends after its ERROR event"
        );

        // The watcher was up to date: it goes on without relisting.
        add_pod(&server, "b");
        watcher.expect(&["Apply(b)"]).await;
    });
    assert_eq!(server.request_count(Verb::List, ResourceKind::Pods), 1);
}

#[test]
fn expired_watch_makes_the_watcher_relist() {
    let server = start();
    for name in ["a", "b"] {
        add_pod(&server, name);
    }
    block_on(async {
        let mut watcher = pod_watcher(&server, watcher::Config::default()).await;
        watcher.expect_listed(&["a", "b"]).await;
        wait_until("the watcher is watching", || server.open_watches() == 1).await;

        server.expire_watches();
        // Deleted while the watcher is away: only the relist can tell it.
        server.delete_pod("apps", "b").expect("delete b");
        let error = watcher.error().await;
        assert!(
            error.contains("Expired") || error.contains("410"),
            "{error}"
        );
        watcher.expect_listed(&["a"]).await;
        assert_eq!(server.request_count(Verb::List, ResourceKind::Pods), 2);

        add_pod(&server, "c");
        watcher.expect(&["Apply(c)"]).await;
    });
}

#[test]
fn watcher_recovers_from_a_restart_on_the_same_port() {
    let mut server = start();
    let a = add_pod(&server, "a");
    add_pod(&server, "b");
    let url = server.url();
    block_on(async {
        let mut watcher = pod_watcher(&server, watcher::Config::default()).await;
        watcher.expect_listed(&["a", "b"]).await;
        wait_until("the watcher is watching", || server.open_watches() == 1).await;

        server.stop().expect("stop");
        assert_eq!(server.open_watches(), 0);
        let refused = std::net::TcpStream::connect(server.address())
            .expect_err("connecting to a stopped server fails");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

        add_pod(&server, "c");
        server.delete_pod("apps", "b").expect("delete b");
        server
            .apply_pod(relabel(a, "app", "web"))
            .expect("relabel a");
        watcher.error().await;

        server.restart().expect("restart");
        assert_eq!(server.url(), url);
        // Resumed from its last version: the changes come as events.
        watcher.expect(&["Apply(c)", "Delete(b)", "Apply(a)"]).await;
    });
    assert_eq!(
        server.request_count(Verb::List, ResourceKind::Pods),
        1,
        "the history survived the restart, so no relist was needed"
    );
}

#[test]
fn streaming_list_sends_initial_events_then_changes() {
    let server = start();
    add_pod(&server, "a");
    block_on(async {
        let mut watcher = pod_watcher(&server, watcher::Config::default().streaming_lists()).await;
        watcher.expect_listed(&["a"]).await;
        add_pod(&server, "b");
        watcher.expect(&["Apply(b)"]).await;
    });
    let watch = server.requests().into_iter().next().expect("a request");
    assert_eq!(watch.verb, Verb::Watch);
    assert_eq!(watch.param("sendInitialEvents"), Some("true"));
    assert_eq!(watch.param("resourceVersionMatch"), Some("NotOlderThan"));
    assert_eq!(server.request_count(Verb::List, ResourceKind::Pods), 0);
}

#[test]
fn namespaces_are_listed_and_watched() {
    let server = start();
    let mut apps = namespace("apps");
    apps.labels_mut()
        .insert("team".to_owned(), "payments".to_owned());
    server.apply_namespace(apps).expect("apps");
    block_on(async {
        let client = client(&server).await;
        let namespaces: Api<Namespace> = Api::all(client);
        let mut watcher = Watcher::new(namespaces.clone(), watcher::Config::default());
        watcher.expect_listed(&["apps"]).await;
        server.apply_namespace(namespace("tools")).expect("tools");
        watcher.expect(&["Apply(tools)"]).await;
        server.delete_namespace("apps").expect("delete apps");
        watcher.expect(&["Delete(apps)"]).await;

        let listed = namespaces
            .list(&ListParams::default().fields("metadata.name=tools"))
            .await
            .expect("list");
        assert_eq!(keys(&listed.items), ["/tools"]);
        let labelled = namespaces
            .list(&ListParams::default().labels("team"))
            .await
            .expect("list");
        assert!(labelled.items.is_empty(), "the labelled namespace is gone");
    });
}

#[test]
fn watch_1_from_version_0_starts_with_the_current_state() {
    let server = start();
    add_pod(&server, "a");
    block_on(async {
        let client = client(&server).await;
        let request =
            hyper::http::Request::get("/api/v1/namespaces/apps/pods?watch=1&resourceVersion=0")
                .body(Vec::new())
                .expect("request");
        let mut events = client
            .request_events::<Pod>(request)
            .await
            .expect("watch")
            .boxed();
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(Ok(WatchEvent::Added(added)))) => assert_eq!(added.name_any(), "a"),
            other => panic!("expected the existing pod as ADDED, got {other:?}"),
        }
    });
}

const EXPECTED_POD_ENV: &str = "FAKE_APISERVER_EXPECTED_POD";

#[test]
fn kubeconfig_file_works_through_the_kubeconfig_env_var() {
    let server = start();
    server
        .apply_pod(pod("default", "from-env", Some("node-a"), &[]))
        .expect("pod");
    // Unique to this process: test binaries may run side by side.
    let path =
        std::env::temp_dir().join(format!("fake-apiserver-{}.kubeconfig", std::process::id()));
    server.write_kubeconfig(&path).expect("write kubeconfig");
    // KUBECONFIG is process-wide, so the client runs in a child test process.
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "kubeconfig_child", "--ignored", "--nocapture"])
        .env("KUBECONFIG", &path)
        .env(EXPECTED_POD_ENV, "from-env")
        .output()
        .expect("run the child test");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "run by kubeconfig_file_works_through_the_kubeconfig_env_var, with KUBECONFIG set"]
fn kubeconfig_child() {
    let expected = std::env::var(EXPECTED_POD_ENV).expect("run by the parent test");
    let names: Vec<String> = block_on(async {
        let client = Client::try_default()
            .await
            .expect("a client from KUBECONFIG");
        // The context's namespace, `default`.
        let pods: Api<Pod> = Api::default_namespaced(client);
        pods.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect()
    });
    assert_eq!(names, [expected]);
}

/// The node the daemon's recorder reports from.
const NODE: &str = "node-a";

/// The daemon's own recorder, as it publishes its Events.
async fn daemon_recorder(server: &FakeApiServer) -> Recorder {
    notify::recorder(client(server).await, NODE.to_owned())
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().expect("a stored pod has a uid"),
    }
}

/// What the daemon tells `pod` about an attempt to reach `destination`.
fn attempt(pod: &Pod, destination: &str, audited: bool) -> PodNotice {
    PodNotice::Attempt {
        pod: pod_ref(pod),
        destination: destination.to_owned(),
        audited,
    }
}

/// The note of the Event the daemon sends for `notice`.
fn note(notice: &PodNotice) -> String {
    notify::event_for(notice)
        .0
        .note
        .expect("the daemon's Events have a note")
}

/// Publishes the daemon's Event for `notice`, as the daemon does.
async fn send(recorder: &Recorder, notice: &PodNotice) {
    notify::send(recorder, notice)
        .await
        .unwrap_or_else(|e| panic!("publishing {notice:?}: {e}"));
}

fn stored_events(server: &FakeApiServer) -> Vec<K8sEvent> {
    server.events().expect("stored events decode")
}

#[test]
fn recorder_publishes_an_event_regarding_the_pod() {
    let server = start();
    let pod = add_pod(&server, "web-1");
    let notice = attempt(&pod, "169.254.169.254:80", false);
    block_on(async {
        send(&daemon_recorder(&server).await, &notice).await;
    });

    let events = stored_events(&server);
    let [event] = events.as_slice() else {
        panic!("expected one event, got {events:#?}");
    };
    let regarding = event.regarding.clone().expect("a regarding object");
    assert!(pod.uid().is_some());
    assert_eq!(
        (
            regarding.api_version.as_deref(),
            regarding.kind.as_deref(),
            regarding.namespace.as_deref(),
            regarding.name.as_deref(),
            regarding.uid,
        ),
        (
            Some("v1"),
            Some("Pod"),
            Some("apps"),
            Some("web-1"),
            pod.uid()
        )
    );
    assert_eq!(event.reason.as_deref(), Some(REASON_BLOCKED));
    assert_eq!(event.action.as_deref(), Some(ACTION_REFUSE));
    assert_eq!(event.note.as_deref(), Some(note(&notice).as_str()));
    assert!(
        note(&notice).contains("169.254.169.254:80"),
        "the note names the destination: {event:?}"
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reporting_controller.as_deref(), Some(CONTROLLER));
    assert_eq!(event.reporting_instance.as_deref(), Some(NODE));
    assert!(event.event_time.is_some());
    assert_eq!(event.series, None, "a first occurrence has no series");
    assert_eq!(event.related, None);

    // The Recorder names it `<pod>.<nanoseconds in hex>` in the pod's
    // namespace; the server adds what it owns.
    let metadata = &event.metadata;
    assert_eq!(metadata.namespace.as_deref(), Some("apps"));
    assert!(
        metadata
            .name
            .as_deref()
            .is_some_and(|name| name.starts_with("web-1.")),
        "{metadata:?}"
    );
    assert!(metadata.uid.is_some() && metadata.creation_timestamp.is_some());
    assert_eq!(
        metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    let request = server.requests().pop().expect("a request was recorded");
    assert_eq!(
        (
            request.verb,
            request.resource,
            request.namespace.as_deref(),
            request.name
        ),
        (Verb::Create, ResourceKind::Events, Some("apps"), None)
    );
}

#[test]
fn repeats_of_an_event_become_one_event_with_a_series() {
    const PUBLISHED: i32 = 10;
    let server = start();
    let pod = add_pod(&server, "web-1");
    let notice = attempt(&pod, "169.254.169.254:80", false);
    let first = block_on(async {
        let recorder = daemon_recorder(&server).await;
        send(&recorder, &notice).await;
        let first = stored_events(&server);
        for _ in 1..PUBLISHED {
            send(&recorder, &notice).await;
        }
        first
    });

    // kube 5.0.0's Recorder caches the event it created, keyed by type,
    // reason, action, reporter, regarding and related object (not the
    // note). A repeat within 6 minutes of the last one PATCHes that event
    // (a JSON merge patch of the whole cached event) with `series: {count:
    // n, lastObservedTime: now}`, n being 2 for the first repeat: so after
    // N publishes there is one event, created once, patched N-1 times,
    // with a series count of N and the eventTime of the first.
    let events = stored_events(&server);
    let ([first], [event]) = (first.as_slice(), events.as_slice()) else {
        panic!("expected one event, got {events:#?}");
    };
    let series = event.series.as_ref().expect("a series after repeats");
    assert_eq!(series.count, PUBLISHED);
    let first_time = first.event_time.as_ref().expect("an eventTime").0;
    assert_eq!(event.event_time, first.event_time);
    assert!(series.last_observed_time.0 >= first_time, "{series:?}");
    assert_eq!(event.metadata.name, first.metadata.name);
    assert_eq!(event.metadata.uid, first.metadata.uid);
    assert_eq!(
        event.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    assert_eq!(server.request_count(Verb::Create, ResourceKind::Events), 1);
    assert_eq!(
        server.request_count(Verb::Patch, ResourceKind::Events),
        usize::try_from(PUBLISHED - 1).expect("a small count")
    );
    assert!(
        server
            .requests()
            .iter()
            .filter(|request| request.verb == Verb::Patch)
            .all(|request| request.name == event.metadata.name),
        "every patch was of the created event"
    );
}

#[test]
fn reasons_and_pods_make_distinct_events_but_notes_and_pod_changes_do_not() {
    const METADATA: &str = "169.254.169.254:80";
    let server = start();
    let web_1 = add_pod(&server, "web-1");
    let web_2 = add_pod(&server, "web-2");
    let first = attempt(&web_1, METADATA, false);
    let audited = attempt(&web_1, METADATA, true);
    let ignored = PodNotice::LabelIgnored {
        pod: pod_ref(&web_1),
    };
    let other_pod = attempt(&web_2, METADATA, false);
    let recreated = block_on(async {
        let recorder = daemon_recorder(&server).await;
        send(&recorder, &first).await;
        send(&recorder, &audited).await;
        send(&recorder, &ignored).await;
        // The note is not part of the Recorder's key: another destination
        // is a repeat, patched with the cached event, so its note stays the
        // first one's.
        send(&recorder, &attempt(&web_1, "[fd00:ec2::254]:80", false)).await;
        send(&recorder, &other_pod).await;
        // The daemon's reference carries no resourceVersion, so the pod
        // after a change is the same key: another repeat.
        let changed = server
            .apply_pod(relabel(web_1, "app", "web"))
            .expect("relabel web-1");
        send(&recorder, &attempt(&changed, METADATA, false)).await;
        // It carries the uid, so a pod recreated under the same name is a
        // new key: a new event.
        server.delete_pod("apps", "web-1").expect("delete web-1");
        let recreated = add_pod(&server, "web-1");
        assert_ne!(recreated.uid(), changed.uid());
        let recreated = attempt(&recreated, "169.254.170.2:80", false);
        send(&recorder, &recreated).await;
        recreated
    });

    let describe = |name: &str, reason: &str, type_: &str, action: &str, note: &str, count| {
        format!("{name} {reason} {type_} {action} {note:?} count={count:?}")
    };
    let mut described: Vec<String> = stored_events(&server)
        .iter()
        .map(|event| {
            describe(
                event
                    .regarding
                    .as_ref()
                    .and_then(|regarding| regarding.name.as_deref())
                    .unwrap_or_default(),
                event.reason.as_deref().unwrap_or_default(),
                event.type_.as_deref().unwrap_or_default(),
                event.action.as_deref().unwrap_or_default(),
                event.note.as_deref().unwrap_or_default(),
                event.series.as_ref().map(|series| series.count),
            )
        })
        .collect();
    described.sort();
    let (blocked, warning) = (REASON_BLOCKED, "Warning");
    let mut expected = [
        describe(
            "web-1",
            REASON_AUDITED,
            warning,
            ACTION_AUDIT,
            &note(&audited),
            None,
        ),
        describe(
            "web-1",
            blocked,
            warning,
            ACTION_REFUSE,
            &note(&first),
            Some(3),
        ),
        describe(
            "web-1",
            blocked,
            warning,
            ACTION_REFUSE,
            &note(&recreated),
            None,
        ),
        describe(
            "web-1",
            REASON_LABEL_IGNORED,
            warning,
            ACTION_IGNORE_LABEL,
            &note(&ignored),
            None,
        ),
        describe(
            "web-2",
            blocked,
            warning,
            ACTION_REFUSE,
            &note(&other_pod),
            None,
        ),
    ];
    expected.sort();
    assert_eq!(described, expected);
    assert_eq!(server.request_count(Verb::Create, ResourceKind::Events), 5);
    assert_eq!(server.request_count(Verb::Patch, ResourceKind::Events), 2);
}

/// The status code and reason of a refused request.
fn refusal<T: Debug>(result: kube::Result<T>) -> (u16, String) {
    let status = api_status(result.expect_err("the request is refused"));
    (status.code, status.reason)
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn event_writes_follow_the_api_server_rules() {
    let server = start();
    block_on(async {
        let client = client(&server).await;
        let events: Api<K8sEvent> = Api::namespaced(client.clone(), "apps");
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some("web-1.1".to_owned()),
                ..ObjectMeta::default()
            },
            reason: Some(REASON_BLOCKED.to_owned()),
            note: Some("blocked".to_owned()),
            regarding: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some("web-1".to_owned()),
                ..ObjectReference::default()
            }),
            event_time: Some(MicroTime(Timestamp::now())),
            ..K8sEvent::default()
        };
        let post = PostParams::default();
        let created = events.create(&post, &event).await.expect("create");
        assert_eq!(
            created.metadata.namespace.as_deref(),
            Some("apps"),
            "the namespace comes from the URL"
        );

        // JSON merge patch: null removes a field, objects merge key by key.
        let patched = events
            .patch(
                "web-1.1",
                &PatchParams::default(),
                &Patch::Merge(json!({"note": null, "regarding": {"fieldPath": "spec"}})),
            )
            .await
            .expect("patch");
        assert_eq!(patched.note, None);
        let regarding = patched.regarding.clone().unwrap_or_default();
        assert_eq!(
            (regarding.name.as_deref(), regarding.field_path.as_deref()),
            (Some("web-1"), Some("spec"))
        );
        assert_eq!(patched.metadata.uid, created.metadata.uid);
        assert_ne!(
            patched.metadata.resource_version,
            created.metadata.resource_version
        );

        let params = PatchParams::default();
        let elsewhere = K8sEvent {
            metadata: ObjectMeta {
                name: Some("web-1.2".to_owned()),
                namespace: Some("apps".to_owned()),
                ..ObjectMeta::default()
            },
            ..event.clone()
        };
        let refusals = [
            refusal(events.create(&post, &event).await),
            refusal(
                events
                    .patch("web-1.9", &params, &Patch::Merge(json!({})))
                    .await,
            ),
            refusal(
                events
                    .patch("web-1.1", &params, &Patch::Strategic(json!({})))
                    .await,
            ),
            refusal(
                events
                    .patch(
                        "web-1.1",
                        &params,
                        &Patch::Merge(json!({"metadata": {"name": "renamed"}})),
                    )
                    .await,
            ),
            refusal(
                Api::<K8sEvent>::namespaced(client, "other")
                    .create(&post, &elsewhere)
                    .await,
            ),
            refusal(events.list(&ListParams::default()).await),
        ];
        let refusals: Vec<(u16, &str)> = refusals
            .iter()
            .map(|(code, reason)| (*code, reason.as_str()))
            .collect();
        assert_eq!(
            refusals,
            [
                (409, "AlreadyExists"),
                (404, "NotFound"),
                (415, "UnsupportedMediaType"),
                (400, "BadRequest"),
                (400, "BadRequest"),
                (405, "MethodNotAllowed"),
            ]
        );
    });
    let events = stored_events(&server);
    assert_eq!(
        events.len(),
        1,
        "refused writes stored nothing: {events:#?}"
    );
}
