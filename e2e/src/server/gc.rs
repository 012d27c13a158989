//! The garbage collector: objects whose owners are gone go, foreground deletions finish when
//! their dependents have gone. It follows the store's changes and looks only at what they touch.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Value, json};

use super::AppState;
use super::delete::{Propagation, delete_one};
use crate::error::ApiError;
use crate::store::{Event, EventType, Key, Objects, Write, owner_uids};

type Result<T> = std::result::Result<T, ApiError>;

/// What the garbage collector decided about one object.
enum GcAction {
    /// Delete it: its owners are gone, or its one live owner is being deleted in the foreground.
    Delete(Key, Propagation),
    /// Its foreground deletion has no dependents left: drop the `foregroundDeletion` finalizer.
    Finish(Key),
}

fn foreground_deleting(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("foregroundDeletion")))
}

/// The collector's decision for one object, from the indexes (no copies of the store).
fn gc_decide(objects: &Objects, key: &Key, obj: &Value) -> Option<GcAction> {
    let mut refs = owner_uids(obj).peekable();
    if refs.peek().is_some() {
        let (mut live, mut owner_foreground) = (0, false);
        for owner in refs.filter_map(|uid| objects.by_uid(uid)) {
            live += 1;
            owner_foreground |= foreground_deleting(owner.1);
        }
        if (live == 0 || (owner_foreground && live == 1))
            && obj["metadata"]["deletionTimestamp"].is_null()
        {
            let policy = if owner_foreground {
                Propagation::Foreground
            } else {
                Propagation::Background
            };
            return Some(GcAction::Delete(key.clone(), policy));
        }
    }
    if foreground_deleting(obj) {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        if objects.dependents(uid).next().is_none() {
            return Some(GcAction::Finish(key.clone()));
        }
    }
    None
}

fn gc_apply(st: &AppState, actions: Vec<GcAction>) {
    for action in actions {
        match action {
            GcAction::Delete(key, policy) => {
                let info = st
                    .registry
                    .all()
                    .into_iter()
                    .find(|i| i.group == key.group && i.resource == key.resource);
                if let Some(info) = info {
                    let _ = delete_one(st, &info, &key, policy, &Value::Null, false);
                }
            }
            GcAction::Finish(key) => {
                let _ = st.store.write(&key, |cur, _| -> Result<Write> {
                    let Some(cur) = cur else {
                        return Ok(Write::Keep);
                    };
                    if !foreground_deleting(cur) {
                        return Ok(Write::Keep);
                    }
                    let rest: Vec<Value> = cur["metadata"]["finalizers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|f| **f != json!("foregroundDeletion"))
                        .cloned()
                        .collect();
                    if rest.is_empty() {
                        return Ok(Write::Delete);
                    }
                    let mut new = Value::clone(cur);
                    new["metadata"]["finalizers"] = Value::Array(rest);
                    Ok(Write::Put(new))
                });
            }
        }
    }
}

/// One full pass of the garbage collector: delete objects whose owners are all gone, and finish
/// foreground deletions whose dependents are gone.
pub fn collect_garbage(st: &AppState) {
    let actions = st.store.read(|objects| {
        objects
            .iter()
            .filter_map(|(k, o)| gc_decide(objects, k, o))
            .collect()
    });
    gc_apply(st, actions);
}

/// Garbage collection after these changes: looks only at the changed objects, their owners,
/// the dependents of the ones deleted or being deleted, and the objects waiting in deletion,
/// so one change costs what it touches, not what the store holds.
pub fn collect_garbage_after(st: &AppState, events: &[Arc<Event>]) {
    let actions = st.store.read(|objects| {
        let mut keys: BTreeSet<&Key> = objects.deleting().collect();
        for ev in events {
            keys.insert(&ev.key);
            let going = ev.kind == EventType::Deleted
                || !ev.object["metadata"]["deletionTimestamp"].is_null();
            if going && let Some(uid) = ev.object["metadata"]["uid"].as_str() {
                keys.extend(objects.dependents(uid));
            }
            keys.extend(owner_uids(&ev.object).filter_map(|u| objects.by_uid(u).map(|(k, _)| k)));
        }
        keys.into_iter()
            .filter_map(|k| objects.get(k).and_then(|o| gc_decide(objects, k, o)))
            .collect()
    });
    gc_apply(st, actions);
}
