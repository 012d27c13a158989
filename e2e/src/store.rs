//! The one store: a map of JSON objects keyed by group/resource/namespace/name, one global
//! resourceVersion counter, a broadcast of changes and a bounded history for watches that resume.

use std::collections::{BTreeMap, VecDeque};
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

#[derive(Debug)]
struct Inner {
    objects: BTreeMap<Key, Value>,
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
                objects: BTreeMap::new(),
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
            .iter()
            .filter(|(k, _)| {
                k.group == group
                    && k.resource == resource
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (items, g.rv)
    }

    /// Every object (for garbage collection).
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
                g.objects.insert(key.clone(), obj.clone());
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
                    .iter()
                    .filter(|(k, _)| matches(k))
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
