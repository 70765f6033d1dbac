//! What etcd and the watch cache hold for the fake API server: the objects,
//! one resourceVersion counter shared by all of them, and a bounded history
//! of changes to the watched resources that lists and watches are served
//! from.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::{
    Resource as _,
    api::{
        core::v1::{Namespace, Node, Pod},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use serde_json::{Map, Value};

use super::Verb;

/// The resources the fake API server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    Pods,
    Namespaces,
    /// Nodes: read one (GET) and JSON-patched, as the daemon does with its
    /// own node's startup taint.
    Nodes,
    /// `events.k8s.io/v1` events, as kube's event `Recorder` writes them.
    Events,
}

impl ResourceKind {
    /// The object kind, e.g. `Pod`.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Pods => Pod::KIND,
            ResourceKind::Namespaces => Namespace::KIND,
            ResourceKind::Nodes => Node::KIND,
            ResourceKind::Events => Event::KIND,
        }
    }

    /// The collection's path segment, e.g. `pods`.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Pods => Pod::URL_PATH_SEGMENT,
            ResourceKind::Namespaces => Namespace::URL_PATH_SEGMENT,
            ResourceKind::Nodes => Node::URL_PATH_SEGMENT,
            ResourceKind::Events => Event::URL_PATH_SEGMENT,
        }
    }

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Pods => Pod::API_VERSION,
            ResourceKind::Namespaces => Namespace::API_VERSION,
            ResourceKind::Nodes => Node::API_VERSION,
            ResourceKind::Events => Event::API_VERSION,
        }
    }

    fn is_namespaced(self) -> bool {
        matches!(self, ResourceKind::Pods | ResourceKind::Events)
    }

    /// What clients may do with this resource here: the daemon reads pods
    /// and namespaces, gets and patches its node, and its event `Recorder`
    /// only creates and patches events. Anything else is a 405.
    pub(crate) fn verbs(self) -> &'static [Verb] {
        match self {
            ResourceKind::Pods => &[Verb::List, Verb::Watch, Verb::Get],
            ResourceKind::Namespaces => &[Verb::List, Verb::Watch],
            ResourceKind::Nodes => &[Verb::Get, Verb::Patch],
            ResourceKind::Events => &[Verb::Create, Verb::Patch],
        }
    }

    /// The fields the real server accepts in a `fieldSelector` for this
    /// resource; any other is a 400.
    pub(crate) fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Pods => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            ResourceKind::Namespaces => &["metadata.name", "metadata.namespace", "status.phase"],
            // Never listed: see `verbs`.
            ResourceKind::Nodes | ResourceKind::Events => &[],
        }
    }
}

/// Where an object lives: the empty namespace for cluster-scoped objects.
/// Ordered by namespace, then name, the order in which the server lists.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// One write, as the watch cache keeps it: the object before and after
/// (`None` before a create, after a delete), so each watcher can decide
/// with its own selectors whether it saw an add, a change or a removal.
pub(crate) struct Change {
    pub resource_version: u64,
    pub resource: ResourceKind,
    pub key: ObjectKey,
    pub previous: Option<Arc<Value>>,
    pub current: Option<Arc<Value>>,
}

/// A resourceVersion older than the retained history: 410 Gone.
#[derive(Debug)]
pub(crate) struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

pub(crate) struct Store {
    resource_version: u64,
    objects: BTreeMap<ResourceKind, BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Every change up to and including this version has left `history`,
    /// so a list or watch from an older version cannot be served.
    compacted_through: u64,
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        Store {
            resource_version: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted_through: 1,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The stored object at `key`, if any.
    pub fn get(&self, resource: ResourceKind, key: &ObjectKey) -> Option<&Arc<Value>> {
        self.objects.get(&resource)?.get(key)
    }

    /// Creates or replaces an object, filling in what the server owns:
    /// resourceVersion, uid and creationTimestamp (kept across updates),
    /// kind, apiVersion, and the `default` namespace for a namespaced
    /// object without one. Returns the object as stored.
    pub fn apply(&mut self, resource: ResourceKind, mut object: Value) -> Result<Value, String> {
        let metadata = metadata_mut(&mut object)?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .ok_or("metadata.name is required")?
            .to_owned();
        let namespace = if resource.is_namespaced() {
            let namespace = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|namespace| !namespace.is_empty())
                .unwrap_or("default")
                .to_owned();
            metadata.insert("namespace".into(), namespace.clone().into());
            namespace
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let key = ObjectKey { namespace, name };
        let previous = self.get(resource, &key).cloned();

        self.resource_version += 1;
        metadata.insert(
            "resourceVersion".into(),
            self.resource_version.to_string().into(),
        );
        for (field, fresh) in [
            ("uid", Value::from(uid(self.resource_version))),
            ("creationTimestamp", now()),
        ] {
            match previous
                .as_deref()
                .and_then(|p| p.pointer(&format!("/metadata/{field}")))
            {
                Some(kept) => {
                    metadata.insert(field.into(), kept.clone());
                }
                None => {
                    metadata.entry(field).or_insert(fresh);
                }
            }
        }
        object["kind"] = resource.kind().into();
        object["apiVersion"] = resource.api_version().into();

        let current = Arc::new(object);
        self.objects
            .entry(resource)
            .or_default()
            .insert(key.clone(), Arc::clone(&current));
        // The real server keeps a watch cache per resource, so writes to a
        // resource nobody watches here (events) must not push pod changes
        // out of the history that watches resume from.
        if resource.verbs().contains(&Verb::Watch) {
            self.record(Change {
                resource_version: self.resource_version,
                resource,
                key,
                previous,
                current: Some(Arc::clone(&current)),
            });
        }
        Ok(Value::clone(&current))
    }

    /// Removes an object; returns it as watchers see it deleted (its last
    /// state, at the deletion's resourceVersion), or `None` if it is absent.
    pub fn delete(&mut self, resource: ResourceKind, key: &ObjectKey) -> Option<Value> {
        let previous = self.objects.get_mut(&resource)?.remove(key)?;
        self.resource_version += 1;
        let deleted = with_resource_version(&previous, self.resource_version);
        self.record(Change {
            resource_version: self.resource_version,
            resource,
            key: key.clone(),
            previous: Some(previous),
            current: None,
        });
        Some(deleted)
    }

    /// Forgets the history, as etcd compaction does: lists and watches from
    /// older versions get 410; a watch at the newest version goes on.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_through = self.resource_version;
    }

    /// Compacts past every version handed out so far (the counter moves on,
    /// as it would with writes to other resources), so every watch position
    /// and continue token now held by a client is too old.
    pub fn expire(&mut self) {
        self.resource_version += 1;
        self.compact();
    }

    /// The objects of one resource now, in key order.
    pub fn objects(&self, resource: ResourceKind) -> impl Iterator<Item = &Arc<Value>> {
        self.objects
            .get(&resource)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    /// The objects of one resource as they were at `at`, which must not be
    /// newer than the current version.
    pub fn objects_at(
        &self,
        resource: ResourceKind,
        at: u64,
    ) -> Result<BTreeMap<ObjectKey, Arc<Value>>, Expired> {
        self.check_retained(at)?;
        let mut objects = self.objects.get(&resource).cloned().unwrap_or_default();
        // Undo, newest first, what happened after `at`.
        for change in self
            .history
            .iter()
            .rev()
            .take_while(|change| change.resource_version > at)
            .filter(|change| change.resource == resource)
        {
            match &change.previous {
                Some(previous) => objects.insert(change.key.clone(), Arc::clone(previous)),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects)
    }

    /// The changes to one resource after `position`, oldest first.
    pub fn changes_after(
        &self,
        resource: ResourceKind,
        position: u64,
    ) -> Result<impl Iterator<Item = &Change>, Expired> {
        self.check_retained(position)?;
        let start = self
            .history
            .partition_point(|change| change.resource_version <= position);
        Ok(self
            .history
            .range(start..)
            .filter(move |change| change.resource == resource))
    }

    fn check_retained(&self, position: u64) -> Result<(), Expired> {
        if position < self.compacted_through {
            return Err(Expired {
                requested: position,
                oldest: self.compacted_through,
            });
        }
        Ok(())
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_through = dropped.resource_version;
            }
        }
    }
}

/// The metadata of an object, created empty if absent.
pub(crate) fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, String> {
    object
        .as_object_mut()
        .ok_or("an object must be a JSON object")?
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| "metadata must be a JSON object".to_owned())
}

/// A copy of `object` carrying another resourceVersion.
pub(crate) fn with_resource_version(object: &Value, resource_version: u64) -> Value {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = resource_version.to_string().into();
    object
}

/// A UUID-shaped uid, unique within the server since no two writes share a
/// resourceVersion.
fn uid(resource_version: u64) -> String {
    format!("00000000-0000-4000-8000-{resource_version:012x}")
}

/// The current time as the API server writes timestamps.
fn now() -> Value {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    i64::try_from(seconds)
        .ok()
        .and_then(|seconds| Timestamp::from_second(seconds).ok())
        .and_then(|timestamp| serde_json::to_value(Time(timestamp)).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn names(objects: &BTreeMap<ObjectKey, Arc<Value>>) -> Vec<&str> {
        objects.keys().map(|key| key.name.as_str()).collect()
    }

    #[test]
    fn history_is_bounded_and_replays_older_snapshots() {
        let mut store = Store::new(2);
        let start = store.resource_version();
        for name in ["a", "b", "c"] {
            store
                .apply(ResourceKind::Pods, json!({"metadata": {"name": name}}))
                .expect("apply");
        }
        let after_b = start + 2;
        assert!(
            store.changes_after(ResourceKind::Pods, start).is_err(),
            "the first change fell out of a two-change history"
        );
        let since_b = store
            .changes_after(ResourceKind::Pods, after_b)
            .expect("retained")
            .map(|change| change.key.name.as_str())
            .collect::<Vec<_>>();
        assert_eq!(since_b, ["c"]);

        let key = ObjectKey {
            namespace: "default".to_owned(),
            name: "a".to_owned(),
        };
        store.delete(ResourceKind::Pods, &key).expect("delete a");
        let at_b = store
            .objects_at(ResourceKind::Pods, after_b)
            .expect("retained");
        assert_eq!(names(&at_b), ["a", "b"]);
        assert_eq!(
            at_b[&key].pointer("/metadata/resourceVersion"),
            Some(&json!((start + 1).to_string()))
        );
        assert!(store.objects_at(ResourceKind::Pods, start + 1).is_err());
    }

    #[test]
    fn event_writes_keep_pod_history() {
        let mut store = Store::new(1);
        let start = store.resource_version();
        store
            .apply(ResourceKind::Pods, json!({"metadata": {"name": "a"}}))
            .expect("apply pod");
        for note in ["one", "two"] {
            store
                .apply(
                    ResourceKind::Events,
                    json!({"metadata": {"name": "a.1"}, "note": note}),
                )
                .expect("apply event");
        }
        assert_eq!(store.resource_version(), start + 3);
        let pods = store
            .changes_after(ResourceKind::Pods, start)
            .expect("the pod change is retained")
            .count();
        assert_eq!(pods, 1);
    }
}
