//! The one store: a map of JSON objects keyed by group/resource/namespace/name, one global
//! resourceVersion counter, a broadcast of changes and a bounded history for watches that resume.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

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
#[derive(Debug, Clone)]
pub struct Event {
    /// The resourceVersion this change produced.
    pub rv: u64,
    /// Kind of change.
    pub kind: EventType,
    /// Which object.
    pub key: Key,
    /// Object after the change.
    pub object: Value,
}

/// What a write decided to do, computed under the store lock from the current object.
#[derive(Debug)]
pub enum Write {
    /// Store this object (create or replace).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Leave it as it is (no resourceVersion bump), answering with this object.
    Unchanged(Value),
}

/// The objects, with the indexes the garbage collector needs so that one change costs work
/// proportional to the objects it touches, not to the whole store.
#[derive(Debug, Default)]
pub struct Objects {
    objects: BTreeMap<Key, Value>,
    /// `metadata.uid` → the object carrying it.
    uids: HashMap<String, Key>,
    /// Owner uid → objects whose `ownerReferences` name it (the owner may be gone).
    dependents: HashMap<String, BTreeSet<Key>>,
    /// Objects with a `deletionTimestamp` (waiting on finalizers; usually few).
    deleting: BTreeSet<Key>,
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

impl Objects {
    /// One object.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The object with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<(&Key, &Value)> {
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
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> {
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

    /// Objects being deleted (with a `deletionTimestamp`), in key order.
    pub fn deleting(&self) -> impl Iterator<Item = &Key> {
        self.deleting.iter()
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
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

    fn insert(&mut self, key: &Key, obj: Value) {
        let old = self.objects.remove(key);
        if obj["metadata"]["deletionTimestamp"].is_null() {
            self.deleting.remove(key);
        } else if !self.deleting.contains(key) {
            self.deleting.insert(key.clone());
        }
        // Most writes keep uid and owners; only touch those indexes when they change.
        let same = old
            .as_ref()
            .is_some_and(|o| uid_of(o) == uid_of(&obj) && owner_uids(o).eq(owner_uids(&obj)));
        if !same {
            if let Some(o) = &old {
                self.unindex(key, o);
            }
            self.index(key, &obj);
        }
        self.objects.insert(key.clone(), obj);
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.deleting.remove(key);
        self.unindex(key, &old);
        Some(old)
    }
}

#[derive(Debug)]
struct Inner {
    objects: Objects,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Watches must start at or after this resourceVersion; older ones get 410 Gone.
    floor: u64,
}

/// Shared, thread-safe object store.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    capacity: usize,
}

/// Where a watch starts: the backlog of events after the requested version, then the live feed.
pub struct WatchStart {
    /// Events already past the requested resourceVersion.
    pub backlog: Vec<Arc<Event>>,
    /// Live events after the backlog.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Objects existing now (used when the watch starts without a resourceVersion).
    pub current: Vec<Value>,
    /// The store's resourceVersion at the start.
    pub rv: u64,
}

/// Parse an object's `metadata.resourceVersion`.
pub fn object_rv(obj: &Value) -> Option<u64> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
}

impl Store {
    /// A store keeping `capacity` events of history for resuming watches.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner {
                objects: Objects::default(),
                rv: 1,
                history: VecDeque::new(),
                floor: 1,
            }),
            tx,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// The oldest resourceVersion a watch may resume from.
    pub fn floor(&self) -> u64 {
        self.lock().floor
    }

    /// One object.
    pub fn get(&self, key: &Key) -> Option<Value> {
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
    ) -> (Vec<(Key, Value)>, u64) {
        let g = self.lock();
        let items = g
            .objects
            .of(group, resource, namespace)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (items, g.rv)
    }

    /// Like [`Store::list`], keeping only objects `keep` accepts; the test runs under the lock
    /// so only the matching objects are copied (a selector over thousands of objects).
    pub fn list_where(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<(Key, Value)>, u64) {
        let g = self.lock();
        let items = g
            .objects
            .of(group, resource, namespace)
            .filter(|(_, v)| keep(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (items, g.rv)
    }

    /// Every object.
    pub fn all(&self) -> Vec<(Key, Value)> {
        self.lock()
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Atomically read-modify-write one object. `f` sees the current object and the
    /// resourceVersion the write will get. Returns the object as stored (for deletes: its
    /// last state) or `None` when there was nothing to delete.
    pub fn write<E>(
        &self,
        key: &Key,
        f: impl FnOnce(Option<&Value>, u64) -> Result<Write, E>,
    ) -> Result<Option<Value>, E> {
        let mut g = self.lock();
        let next = g.rv + 1;
        let current = g.objects.get(key);
        let existed = current.is_some();
        let decision = f(current, next)?;
        let (kind, object) = match decision {
            Write::Unchanged(v) => return Ok(Some(v)),
            Write::Put(mut obj) => {
                obj["metadata"]["resourceVersion"] = Value::String(next.to_string());
                g.objects.insert(key, obj.clone());
                (
                    if existed {
                        EventType::Modified
                    } else {
                        EventType::Added
                    },
                    obj,
                )
            }
            Write::Delete => match g.objects.remove(key) {
                Some(mut obj) => {
                    obj["metadata"]["resourceVersion"] = Value::String(next.to_string());
                    (EventType::Deleted, obj)
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
        });
        g.history.push_back(event.clone());
        while g.history.len() > self.capacity {
            if let Some(old) = g.history.pop_front() {
                g.floor = old.rv;
            }
        }
        // Sent under the lock so subscribers see events in resourceVersion order.
        let _ = self.tx.send(event);
        Ok(Some(object))
    }

    /// Start a watch after `from` (exclusive). `None` = start now, reporting current objects.
    /// Errors with the oldest resumable version when `from` is older than the history.
    pub fn watch(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart, u64> {
        let g = self.lock();
        let live = self.tx.subscribe();
        let matches = |k: &Key| {
            k.group == group
                && k.resource == resource
                && namespace.is_none_or(|ns| k.namespace == ns)
        };
        match from {
            Some(rv) if rv < g.floor => Err(g.floor),
            Some(rv) => Ok(WatchStart {
                backlog: g
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && matches(&e.key))
                    .cloned()
                    .collect(),
                live,
                current: Vec::new(),
                rv: g.rv,
            }),
            None => Ok(WatchStart {
                backlog: Vec::new(),
                live,
                current: g
                    .objects
                    .of(group, resource, namespace)
                    .map(|(_, v)| v.clone())
                    .collect(),
                rv: g.rv,
            }),
        }
    }

    /// All changes, for in-process followers (garbage collector).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Forget the history: every watch or continue token handed out so far gets 410 Gone
    /// (what etcd compaction does to versions older than the compacted revision).
    pub fn compact(&self) {
        let mut g = self.lock();
        g.history.clear();
        // Advance past every version handed out so far, so none of them can be resumed.
        g.rv += 1;
        g.floor = g.rv;
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
