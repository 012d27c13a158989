//! The one store: a map of JSON objects keyed by group/resource/namespace/name, one global
//! resourceVersion counter, and per resource a bounded history of changes ("feed") that watches
//! read from their own cursor, as kube-apiserver's watch cache does.
//!
//! Costs are kept to what a request touches: objects are shared (`Arc`), never deep-copied to
//! be read; an event is encoded to JSON once however many watchers send it; a label-selected
//! list reads only the objects carrying the selector's labels (an index); a watcher reads only
//! its resource's feed. A watcher that falls so far behind that its next event has left the
//! history learns it (`Err(floor)`) instead of silently missing changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

/// Identity of a stored object. The version is not part of it: each resource has one storage
/// version and objects are served at the requested one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// API group, `""` for core.
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// Namespace, `""` for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The watch event `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, with the object as it is after the change (for deletes: its last state).
#[derive(Debug)]
pub struct Event {
    /// The resourceVersion this change produced.
    pub rv: u64,
    /// Kind of change.
    pub kind: EventType,
    /// Which object.
    pub key: Key,
    /// Object after the change.
    pub object: Arc<Value>,
    /// The watch line `{"type":…,"object":…}\n`, encoded on first use and shared by watchers.
    line: OnceLock<Bytes>,
}

/// One watch-stream line for `object`.
pub fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// What a write decided to do, computed under the store lock from the current object.
#[derive(Debug)]
pub enum Write {
    /// Store this object (create or replace).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Leave it as it is (no resourceVersion bump), answering with the stored object.
    Keep,
    /// Store nothing and answer with this object (dry runs).
    Answer(Value),
}

/// Counters of the store's work, for tests that check costs by counting, not timing.
#[derive(Debug, Default)]
pub struct Stats {
    /// Watch lines encoded (one per event at most, whatever the number of watchers).
    pub encoded_events: AtomicU64,
    /// Objects visited to answer label-selected lists.
    pub list_visits: AtomicU64,
    /// CRD schemas compiled for admission (once per CRD version, not per request).
    pub schema_compilations: AtomicU64,
}

/// `group/resource` → label key → label value → objects carrying it.
type LabelIndex = HashMap<(String, String), HashMap<String, HashMap<String, BTreeSet<Key>>>>;

/// The objects, with the indexes the garbage collector and selected lists need, so that one
/// change or one list costs work proportional to the objects it touches, not to the store.
#[derive(Debug, Default)]
pub struct Objects {
    objects: BTreeMap<Key, Arc<Value>>,
    /// `metadata.uid` → the object carrying it.
    uids: HashMap<String, Key>,
    /// Owner uid → objects whose `ownerReferences` name it (the owner may be gone).
    dependents: HashMap<String, BTreeSet<Key>>,
    /// Objects with a `deletionTimestamp` (waiting on finalizers; usually few).
    deleting: BTreeSet<Key>,
    labels: LabelIndex,
}

/// The owner uids an object's `ownerReferences` name.
pub fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

fn uid_of(obj: &Value) -> Option<&str> {
    obj["metadata"]["uid"].as_str()
}

fn labels_of(obj: &Value) -> impl Iterator<Item = (&str, &str)> {
    obj["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

/// Parse an object's `metadata.resourceVersion`.
pub fn object_rv(obj: &Value) -> Option<u64> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
}

impl Objects {
    /// One object.
    pub fn get(&self, key: &Key) -> Option<&Arc<Value>> {
        self.objects.get(key)
    }

    /// The object with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<(&Key, &Arc<Value>)> {
        let key = self.uids.get(uid)?;
        self.objects.get_key_value(key)
    }

    /// Objects naming `uid` as an owner.
    pub fn dependents(&self, uid: &str) -> impl Iterator<Item = &Key> {
        self.dependents.get(uid).into_iter().flatten()
    }

    /// Objects of group/resource (in `namespace` when given), in key order: a range of the
    /// map, since keys sort by group, resource, namespace, name.
    pub fn of<'a>(
        &'a self,
        group: &'a str,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Arc<Value>)> {
        let start = Key {
            group: group.to_string(),
            resource: resource.to_string(),
            namespace: namespace.unwrap_or_default().to_string(),
            name: String::new(),
        };
        self.objects.range(start..).take_while(move |(k, _)| {
            k.group == group
                && k.resource == resource
                && namespace.is_none_or(|ns| k.namespace == ns)
        })
    }

    /// The keys of group/resource objects carrying every label in `equal` (`None` when
    /// `equal` is empty: no index applies), in key order.
    fn labelled(&self, group: &str, resource: &str, equal: &[(&str, &str)]) -> Option<Vec<&Key>> {
        let by_key = self.labels.get(&(group.to_string(), resource.to_string()));
        let mut sets = Vec::new();
        for (k, v) in equal {
            match by_key.and_then(|m| m.get(*k)).and_then(|m| m.get(*v)) {
                Some(set) => sets.push(set),
                None => return (!equal.is_empty()).then(Vec::new),
            }
        }
        sets.sort_by_key(|s| s.len());
        let (first, rest) = sets.split_first()?;
        Some(
            first
                .iter()
                .filter(|k| rest.iter().all(|s| s.contains(*k)))
                .collect(),
        )
    }

    /// Objects being deleted (with a `deletionTimestamp`), in key order.
    pub fn deleting(&self) -> impl Iterator<Item = &Key> {
        self.deleting.iter()
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        self.objects.iter()
    }

    fn unindex(&mut self, key: &Key, old: &Value) {
        if let Some(uid) = uid_of(old)
            && self.uids.get(uid) == Some(key)
        {
            self.uids.remove(uid);
        }
        for owner in owner_uids(old) {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(owner);
                }
            }
        }
    }

    fn index(&mut self, key: &Key, new: &Value) {
        if let Some(uid) = uid_of(new) {
            self.uids.insert(uid.to_string(), key.clone());
        }
        for owner in owner_uids(new) {
            self.dependents
                .entry(owner.to_string())
                .or_default()
                .insert(key.clone());
        }
    }

    fn unindex_labels(&mut self, key: &Key, old: &Value) {
        let gr = (key.group.clone(), key.resource.clone());
        let Some(by_key) = self.labels.get_mut(&gr) else {
            return;
        };
        for (k, v) in labels_of(old) {
            if let Some(by_value) = by_key.get_mut(k) {
                if let Some(set) = by_value.get_mut(v) {
                    set.remove(key);
                    if set.is_empty() {
                        by_value.remove(v);
                    }
                }
                if by_value.is_empty() {
                    by_key.remove(k);
                }
            }
        }
    }

    fn index_labels(&mut self, key: &Key, new: &Value) {
        let by_key = self
            .labels
            .entry((key.group.clone(), key.resource.clone()))
            .or_default();
        for (k, v) in labels_of(new) {
            by_key
                .entry(k.to_string())
                .or_default()
                .entry(v.to_string())
                .or_default()
                .insert(key.clone());
        }
    }

    fn insert(&mut self, key: &Key, obj: Arc<Value>) {
        let old = self.objects.remove(key);
        if obj["metadata"]["deletionTimestamp"].is_null() {
            self.deleting.remove(key);
        } else if !self.deleting.contains(key) {
            self.deleting.insert(key.clone());
        }
        // Most writes keep uid, owners and labels; only touch those indexes when they change.
        let same = old
            .as_ref()
            .is_some_and(|o| uid_of(o) == uid_of(&obj) && owner_uids(o).eq(owner_uids(&obj)));
        if !same {
            if let Some(o) = &old {
                self.unindex(key, o);
            }
            self.index(key, &obj);
        }
        let same_labels = old
            .as_ref()
            .is_some_and(|o| o["metadata"]["labels"] == obj["metadata"]["labels"]);
        if !same_labels {
            if let Some(o) = &old {
                self.unindex_labels(key, o);
            }
            self.index_labels(key, &obj);
        }
        self.objects.insert(key.clone(), obj);
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Value>> {
        let old = self.objects.remove(key)?;
        self.deleting.remove(key);
        self.unindex(key, &old);
        self.unindex_labels(key, &old);
        Some(old)
    }
}

/// One resource's recent changes, oldest first.
#[derive(Debug)]
struct Feed {
    events: VecDeque<Arc<Event>>,
    /// Watches of this resource must start at or after this resourceVersion.
    floor: u64,
    /// The newest resourceVersion of the feed, for watchers waiting on it.
    tick: watch::Sender<u64>,
}

impl Feed {
    fn new(floor: u64) -> Self {
        Self {
            events: VecDeque::new(),
            floor,
            tick: watch::channel(floor).0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    objects: Objects,
    rv: u64,
    feeds: HashMap<(String, String), Feed>,
    /// Compaction floor: no watch or continue token may start before it.
    floor: u64,
}

impl Inner {
    fn feed(&mut self, group: &str, resource: &str) -> &mut Feed {
        let floor = self.floor;
        self.feeds
            .entry((group.to_string(), resource.to_string()))
            .or_insert_with(|| Feed::new(floor))
    }
}

/// Shared, thread-safe object store.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    capacity: usize,
    /// Work counters.
    pub stats: Stats,
}

/// Where a watch reads its resource's feed from.
#[derive(Debug)]
pub struct Cursor {
    group: String,
    resource: String,
    /// Every event up to and including this resourceVersion has been handed out.
    pub after: u64,
    tick: watch::Receiver<u64>,
}

impl Cursor {
    /// Resolves when the feed has an event newer than the last one read (or at once when
    /// unsure); cancel-safe.
    pub async fn changed(&mut self) {
        if self.tick.changed().await.is_err() {
            // The feed is never dropped while the store lives; do not spin if it were.
            std::future::pending::<()>().await;
        }
    }
}

/// How a watch starts.
#[derive(Debug)]
pub struct WatchStart {
    /// Objects existing now (only when the watch starts without a resourceVersion).
    pub current: Vec<Arc<Value>>,
    /// The store's resourceVersion at the start.
    pub rv: u64,
    /// The feed position to read changes from.
    pub cursor: Cursor,
}

/// Events a cursor read.
#[derive(Debug)]
pub struct Batch {
    /// Changes after the cursor, oldest first.
    pub events: Vec<Arc<Event>>,
    /// When the feed holds nothing newer: the store's resourceVersion, which the watcher has
    /// thereby caught up to (what a bookmark may report).
    pub caught_up: Option<u64>,
}

impl Store {
    /// A store keeping `capacity` events of history per resource for resuming watches.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner {
                objects: Objects::default(),
                rv: 1,
                feeds: HashMap::new(),
                floor: 1,
            }),
            tx,
            capacity: capacity.max(1),
            stats: Stats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// The oldest resourceVersion a watch of group/resource may resume from.
    pub fn floor(&self, group: &str, resource: &str) -> u64 {
        let g = self.lock();
        g.feeds
            .get(&(group.to_string(), resource.to_string()))
            .map_or(g.floor, |f| f.floor)
    }

    /// One object (shared, not copied).
    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.lock().objects.get(key).cloned()
    }

    /// Look at the objects under the lock without copying them (writes wait meanwhile).
    pub fn read<R>(&self, f: impl FnOnce(&Objects) -> R) -> R {
        f(&self.lock().objects)
    }

    /// Objects of group/resource (in `namespace` when given), in name order, with the list's
    /// resourceVersion.
    pub fn list(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> (Vec<(Key, Arc<Value>)>, u64) {
        self.list_where(group, resource, namespace, &[], |_| true)
    }

    /// Like [`Store::list`], keeping objects that carry every label of `equal` and that `keep`
    /// accepts. The labels are looked up in an index, so only objects carrying them are
    /// visited; `keep` runs under the lock on those.
    pub fn list_where(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        equal: &[(&str, &str)],
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<(Key, Arc<Value>)>, u64) {
        let g = self.lock();
        let mut visits = 0u64;
        let items = match g.objects.labelled(group, resource, equal) {
            Some(keys) => keys
                .into_iter()
                .filter(|k| namespace.is_none_or(|ns| k.namespace == ns))
                .filter_map(|k| g.objects.get(k).map(|v| (k, v)))
                .inspect(|_| visits += 1)
                .filter(|(_, v)| keep(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => g
                .objects
                .of(group, resource, namespace)
                .inspect(|_| visits += 1)
                .filter(|(_, v)| keep(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        self.stats.list_visits.fetch_add(visits, Ordering::Relaxed);
        (items, g.rv)
    }

    /// Every object.
    pub fn all(&self) -> Vec<(Key, Arc<Value>)> {
        self.lock()
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Atomically read-modify-write one object. `f` sees the current object and the
    /// resourceVersion the write will get. Returns the object as stored (for deletes: its
    /// last state; for [`Write::Answer`]: that object) or `None` when there was nothing to
    /// delete. Keep `f` cheap: every other request waits for it.
    pub fn write<E>(
        &self,
        key: &Key,
        f: impl FnOnce(Option<&Arc<Value>>, u64) -> Result<Write, E>,
    ) -> Result<Option<Arc<Value>>, E> {
        let mut g = self.lock();
        let next = g.rv + 1;
        let current = g.objects.get(key);
        let existed = current.is_some();
        let decision = f(current, next)?;
        let (kind, object) = match decision {
            Write::Keep => return Ok(current.cloned()),
            Write::Answer(v) => return Ok(Some(Arc::new(v))),
            Write::Put(mut obj) => {
                obj["metadata"]["resourceVersion"] = Value::String(next.to_string());
                let obj = Arc::new(obj);
                g.objects.insert(key, obj.clone());
                let kind = if existed {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                (kind, obj)
            }
            Write::Delete => match g.objects.remove(key) {
                Some(old) => {
                    let mut obj = Arc::unwrap_or_clone(old);
                    obj["metadata"]["resourceVersion"] = Value::String(next.to_string());
                    (EventType::Deleted, Arc::new(obj))
                }
                None => return Ok(None),
            },
        };
        g.rv = next;
        let event = Arc::new(Event {
            rv: next,
            kind,
            key: key.clone(),
            object: object.clone(),
            line: OnceLock::new(),
        });
        let capacity = self.capacity;
        let feed = g.feed(&key.group, &key.resource);
        feed.events.push_back(event.clone());
        while feed.events.len() > capacity {
            if let Some(old) = feed.events.pop_front() {
                feed.floor = old.rv;
            }
        }
        feed.tick.send_replace(next);
        // Sent under the lock so in-process followers see events in resourceVersion order.
        let _ = self.tx.send(event);
        Ok(Some(object))
    }

    /// Start a watch of group/resource after `from` (exclusive). `None` = start now, reporting
    /// the objects (in `namespace` when given) that exist. Errors with the oldest resumable
    /// version when `from` is older than the resource's history.
    pub fn watch(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart, u64> {
        let mut g = self.lock();
        let rv = g.rv;
        let feed = g.feed(group, resource);
        let floor = feed.floor;
        let mut tick = feed.tick.subscribe();
        tick.mark_changed();
        let cursor = |after| Cursor {
            group: group.to_string(),
            resource: resource.to_string(),
            after,
            tick,
        };
        match from {
            Some(from) if from < floor => Err(floor),
            Some(from) => Ok(WatchStart {
                current: Vec::new(),
                rv,
                cursor: cursor(from),
            }),
            None => Ok(WatchStart {
                current: g
                    .objects
                    .of(group, resource, namespace)
                    .map(|(_, v)| v.clone())
                    .collect(),
                rv,
                cursor: cursor(rv),
            }),
        }
    }

    /// Up to `max` events after the cursor, advancing it. `Err(floor)` when the next event the
    /// cursor needs has already left the history (the watcher fell too far behind).
    pub fn next(&self, cursor: &mut Cursor, max: usize) -> Result<Batch, u64> {
        let g = self.lock();
        let Some(feed) = g
            .feeds
            .get(&(cursor.group.clone(), cursor.resource.clone()))
        else {
            return Ok(Batch {
                events: Vec::new(),
                caught_up: Some(g.rv),
            });
        };
        if cursor.after < feed.floor {
            return Err(feed.floor);
        }
        let start = feed.events.partition_point(|e| e.rv <= cursor.after);
        let events: Vec<Arc<Event>> = feed.events.range(start..).take(max).cloned().collect();
        let exhausted = start + events.len() == feed.events.len();
        if let Some(last) = events.last() {
            cursor.after = last.rv;
        }
        let caught_up = exhausted.then_some(g.rv);
        if let Some(rv) = caught_up {
            cursor.after = cursor.after.max(rv);
        }
        Ok(Batch { events, caught_up })
    }

    /// The watch line of `event` as stored (encoded once, then shared).
    pub fn line(&self, event: &Event) -> Bytes {
        event
            .line
            .get_or_init(|| {
                self.stats.encoded_events.fetch_add(1, Ordering::Relaxed);
                watch_line(event.kind.as_str(), &event.object)
            })
            .clone()
    }

    /// All changes, for in-process followers (garbage collector).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Forget the history: every watch or continue token handed out so far gets 410 Gone
    /// (what etcd compaction does to versions older than the compacted revision).
    pub fn compact(&self) {
        let mut g = self.lock();
        // Advance past every version handed out so far, so none of them can be resumed.
        g.rv += 1;
        let rv = g.rv;
        g.floor = rv;
        for feed in g.feeds.values_mut() {
            feed.events.clear();
            feed.floor = rv;
            feed.tick.send_replace(rv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> Key {
        Key {
            group: String::new(),
            resource: "configmaps".into(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn put(store: &Store, name: &str, obj: Value) {
        store
            .write(&key(name), |_, _| Ok::<_, ()>(Write::Put(obj)))
            .expect("write");
    }

    #[test]
    fn indexes_follow_owners_uids_and_deletion() {
        let store = Store::new(10);
        put(&store, "owner", json!({"metadata": {"uid": "u1"}}));
        let owned = |owners: &[&str]| {
            let refs: Vec<Value> = owners.iter().map(|u| json!({"uid": u})).collect();
            json!({"metadata": {"uid": "u2", "ownerReferences": refs}})
        };
        put(&store, "child", owned(&["u1"]));
        let deps = |uid: &str| store.read(|o| o.dependents(uid).cloned().collect::<Vec<_>>());
        assert_eq!(deps("u1"), vec![key("child")]);
        assert_eq!(
            store.read(|o| o.by_uid("u1").map(|(k, _)| k.clone())),
            Some(key("owner"))
        );
        // Re-owned: the old owner loses it, the new one (not stored yet) gains it.
        put(&store, "child", owned(&["u3"]));
        assert!(deps("u1").is_empty());
        assert_eq!(deps("u3"), vec![key("child")]);
        // Being deleted, then gone.
        let mut going = owned(&["u3"]);
        going["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        put(&store, "child", going);
        assert_eq!(
            store.read(|o| o.deleting().cloned().collect::<Vec<_>>()),
            vec![key("child")]
        );
        store
            .write(&key("child"), |_, _| Ok::<_, ()>(Write::Delete))
            .expect("delete");
        assert!(deps("u3").is_empty());
        assert!(store.read(|o| o.deleting().next().is_none() && o.by_uid("u2").is_none()));
        // Ranges per resource stop at the resource's end.
        let names: Vec<String> = store.read(|o| {
            o.of("", "configmaps", Some("default"))
                .map(|(k, _)| k.name.clone())
                .collect()
        });
        assert_eq!(names, vec!["owner".to_string()]);
        assert_eq!(store.read(|o| o.of("", "configmap", None).count()), 0);
    }
}
