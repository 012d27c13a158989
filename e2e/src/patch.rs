//! Patches and field ownership: JSON merge patch, JSON patch, a strategic merge patch for the
//! list shapes kubectl sends, and server-side apply over `managedFields`.
//!
//! Field sets follow `fieldsV1`: `f:<field>` for map keys, `k:{"name":...}` for items of lists
//! keyed by a merge key. Lists of built-in kinds whose items all carry a merge key are keyed;
//! every other list is atomic (one leaf), which is also the default for custom resources.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A path of `fieldsV1` elements to one owned leaf.
pub type FieldPath = Vec<String>;
/// The leaves one manager owns.
pub type FieldSet = BTreeSet<FieldPath>;

/// Merge keys of keyed lists, tried in order on the list's items.
const MERGE_KEYS: &[&str] = &[
    "containerPort",
    "port",
    "mountPath",
    "devicePath",
    "uid",
    "type",
    "name",
];

/// The merge key shared by every item of a list of objects, if any.
fn merge_key(items: &[Value]) -> Option<&'static str> {
    if items.is_empty() || !items.iter().all(Value::is_object) {
        return None;
    }
    MERGE_KEYS.iter().copied().find(|k| {
        items
            .iter()
            .all(|i| i.get(*k).is_some_and(|v| !v.is_null()))
    })
}

fn item_key(key: &str, item: &Value) -> String {
    format!("k:{}", json!({ key: item[key] }))
}

/// Metadata fields the server owns; never part of a field set.
fn server_owned(path: &[String]) -> bool {
    match path {
        [top] => top == "f:apiVersion" || top == "f:kind",
        [m, f] if m == "f:metadata" => matches!(
            f.as_str(),
            "f:name"
                | "f:namespace"
                | "f:uid"
                | "f:resourceVersion"
                | "f:generation"
                | "f:creationTimestamp"
                | "f:managedFields"
                | "f:deletionTimestamp"
                | "f:deletionGracePeriodSeconds"
                | "f:selfLink"
        ),
        _ => false,
    }
}

/// The leaf paths of an object. `keyed` turns lists with a merge key into keyed items.
pub fn fields_of(obj: &Value, keyed: bool) -> FieldSet {
    let mut out = FieldSet::new();
    walk(obj, keyed, &mut Vec::new(), &mut out);
    out.retain(|p| !(server_owned(p) || (p.len() > 2 && server_owned(&p[..2]))));
    out
}

fn walk(v: &Value, keyed: bool, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                walk(child, keyed, path, out);
                path.pop();
            }
        }
        Value::Array(items) if keyed && merge_key(items).is_some() => {
            let key = merge_key(items).unwrap_or("name");
            for item in items {
                path.push(item_key(key, item));
                walk(item, keyed, path, out);
                path.pop();
            }
        }
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// The value at a field path, if present.
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        cur = if let Some(f) = seg.strip_prefix("f:") {
            cur.get(f)?
        } else if let Some(k) = seg.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array()?
                .iter()
                .find(|item| want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)))?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Remove the field at a path (no-op when absent).
pub fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for seg in parents {
        let next = if let Some(f) = seg.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = seg.strip_prefix("k:") {
            let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|item| want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:")
        && let Ok(want) = serde_json::from_str::<Map<String, Value>>(k)
        && let Some(a) = cur.as_array_mut()
    {
        a.retain(|item| !want.iter().all(|(wk, wv)| item.get(wk) == Some(wv)));
    }
}

/// Encode a field set as `fieldsV1`.
pub fn encode(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let entry = cur.entry(seg.clone()).or_insert_with(|| json!({}));
            if seg.starts_with("k:")
                && let Some(m) = entry.as_object_mut()
            {
                m.insert(".".into(), json!({}));
            }
            cur = match entry.as_object_mut() {
                Some(m) => m,
                None => break,
            };
        }
    }
    Value::Object(root)
}

/// Decode `fieldsV1` into its leaves.
pub fn decode(fields: &Value) -> FieldSet {
    fn go(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, child) in children {
            path.push(k.clone());
            go(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    go(fields, &mut Vec::new(), &mut out);
    out
}

/// Render a field path as kube-apiserver does in conflict messages (`.spec.replicas`).
pub fn render_path(path: &[String]) -> String {
    path.iter()
        .map(|s| {
            if let Some(f) = s.strip_prefix("f:") {
                format!(".{f}")
            } else if let Some(k) = s.strip_prefix("k:") {
                format!("[{k}]")
            } else {
                s.clone()
            }
        })
        .collect()
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    /// Field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion the fields were set through.
    pub api_version: String,
    /// RFC 3339 time of the last change.
    pub time: String,
    /// `status` or empty.
    pub subresource: String,
    /// Owned leaves.
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn same_slot(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

/// Read `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| ManagedEntry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            subresource: e["subresource"].as_str().unwrap_or_default().to_string(),
            fields: decode(&e["fieldsV1"]),
        })
        .collect()
}

/// Write `metadata.managedFields` (entries with no fields are dropped, as the apiserver does).
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Who is changing the object, for ownership bookkeeping.
#[derive(Debug, Clone)]
pub struct Manager<'a> {
    /// Field manager name.
    pub name: &'a str,
    /// apiVersion of the request.
    pub api_version: &'a str,
    /// Now, RFC 3339.
    pub time: &'a str,
    /// `status` or empty.
    pub subresource: &'a str,
    /// Whether lists are keyed (built-in kinds).
    pub keyed: bool,
}

/// Record an Update (PUT or non-apply patch): the manager takes the changed fields from others.
pub fn track_update(old: Option<&Value>, new: &mut Value, m: &Manager<'_>) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let new_fields = fields_of(&strip_meta(new), m.keyed);
    let old_fields = old
        .map(|o| fields_of(&strip_meta(o), m.keyed))
        .unwrap_or_default();
    let changed: FieldSet = new_fields
        .iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    let removed: FieldSet = old_fields.difference(&new_fields).cloned().collect();
    for e in entries.iter_mut() {
        let mine = e.same_slot(m.name, "Update", m.subresource);
        e.fields
            .retain(|p| !removed.contains(p) && (mine || !changed.contains(p)));
        e.fields.retain(|p| new_fields.contains(p));
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.same_slot(m.name, "Update", m.subresource))
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = m.time.to_string();
                e.api_version = m.api_version.to_string();
            }
            None => entries.push(ManagedEntry {
                manager: m.name.to_string(),
                operation: "Update".into(),
                api_version: m.api_version.to_string(),
                time: m.time.to_string(),
                subresource: m.subresource.to_string(),
                fields: changed,
            }),
        }
    }
    write_managed(new, &entries);
}

fn strip_meta(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    o
}

/// Merge an applied configuration into an object: maps recursively, keyed lists by key,
/// everything else replaced.
fn merge_applied(base: &mut Value, applied: &Value, keyed: bool) {
    match (base, applied) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, av) in a {
                if av.is_null() {
                    b.remove(k);
                    continue;
                }
                match b.get_mut(k) {
                    Some(bv) => merge_applied(bv, av, keyed),
                    None => {
                        b.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(a))
            if keyed && merge_key(a).is_some() && merge_key(b).is_some() =>
        {
            let key = merge_key(a).unwrap_or("name");
            let mut out = Vec::new();
            for ai in a {
                match b.iter().position(|bi| bi.get(key) == ai.get(key)) {
                    Some(i) => {
                        let mut bi = b.remove(i);
                        merge_applied(&mut bi, ai, keyed);
                        out.push(bi);
                    }
                    None => out.push(ai.clone()),
                }
            }
            out.append(b);
            *b = out;
        }
        (b, a) => *b = a.clone(),
    }
}

/// A server-side apply conflict: (manager, rendered field path).
pub type Conflicts = Vec<(String, String)>;

/// Server-side apply of `applied` by manager `m` over `current` (None = create). Fields other
/// managers own with a different value conflict unless `force`; fields this manager applied
/// before and no longer applies are removed unless someone else owns them.
pub fn server_side_apply(
    current: Option<&Value>,
    applied: &Value,
    m: &Manager<'_>,
    force: bool,
    scope: impl Fn(&FieldPath) -> bool,
) -> Result<Value, Conflicts> {
    let mut entries = current.map(read_managed).unwrap_or_default();
    let new_fields: FieldSet = fields_of(applied, m.keyed)
        .into_iter()
        .filter(|p| scope(p))
        .collect();
    let base = current.cloned().unwrap_or_else(|| json!({}));
    let mut conflicts = Conflicts::new();
    for e in entries
        .iter()
        .filter(|e| !e.same_slot(m.name, "Apply", m.subresource))
    {
        for p in e.fields.intersection(&new_fields) {
            if value_at(&base, p) != value_at(applied, p) {
                conflicts.push((e.manager.clone(), render_path(p)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut scoped = applied.clone();
    for p in fields_of(applied, m.keyed) {
        if !scope(&p) {
            remove_at(&mut scoped, &p);
        }
    }
    let mut result = base.clone();
    merge_applied(&mut result, &scoped, m.keyed);
    let previous = entries
        .iter()
        .find(|e| e.same_slot(m.name, "Apply", m.subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for p in previous.difference(&new_fields) {
        let shared = entries
            .iter()
            .any(|e| !e.same_slot(m.name, "Apply", m.subresource) && e.fields.contains(p));
        if !shared {
            remove_at(&mut result, p);
        }
    }
    for e in entries
        .iter_mut()
        .filter(|e| !e.same_slot(m.name, "Apply", m.subresource))
    {
        e.fields
            .retain(|p| !(new_fields.contains(p) && value_at(&base, p) != value_at(applied, p)));
    }
    match entries
        .iter_mut()
        .find(|e| e.same_slot(m.name, "Apply", m.subresource))
    {
        Some(e) => {
            e.fields = new_fields;
            e.time = m.time.to_string();
            e.api_version = m.api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: m.name.to_string(),
            operation: "Apply".into(),
            api_version: m.api_version.to_string(),
            time: m.time.to_string(),
            subresource: m.subresource.to_string(),
            fields: new_fields,
        }),
    }
    write_managed(&mut result, &entries);
    Ok(result)
}

/// A strategic merge patch as kubectl computes it for built-in kinds: maps merge, `null`
/// deletes, lists with a merge key merge by it (honouring `$patch: delete` items), primitive
/// `finalizers` lists union, `$deleteFromPrimitiveList/...` removes, `$setElementOrder/...` and
/// `$retainKeys` are ignored, every other list is replaced.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = p.clone();
        clean.remove("$patch");
        *target = Value::Object(clean);
        return;
    }
    for (k, pv) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), pv.as_array()) {
                list.retain(|v| !del.contains(v));
            }
            continue;
        }
        if pv.is_null() {
            t.remove(k);
            continue;
        }
        if pv.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), pv) {
            (Some(tv @ Value::Object(_)), Value::Object(_)) => strategic_merge(tv, pv),
            (Some(Value::Array(tl)), Value::Array(pl)) => merge_list(k, tl, pl),
            _ => {
                let mut fresh = json!({});
                if pv.is_object() {
                    strategic_merge(&mut fresh, pv);
                    t.insert(k.clone(), fresh);
                } else {
                    t.insert(k.clone(), pv.clone());
                }
            }
        }
    }
}

fn merge_list(field: &str, target: &mut Vec<Value>, patch: &[Value]) {
    if field == "finalizers" {
        for v in patch {
            if !target.contains(v) {
                target.push(v.clone());
            }
        }
        return;
    }
    let Some(key) = merge_key(patch) else {
        *target = patch.to_vec();
        return;
    };
    for pi in patch {
        let pos = target.iter().position(|ti| ti.get(key) == pi.get(key));
        let delete = pi.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                target.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut target[i], pi),
            (None, false) => {
                let mut fresh = json!({});
                strategic_merge(&mut fresh, pi);
                target.push(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mgr(name: &str) -> Manager<'_> {
        Manager {
            name,
            api_version: "v1",
            time: "2026-01-01T00:00:00Z",
            subresource: "",
            keyed: true,
        }
    }

    #[test]
    fn fields_round_trip_through_fields_v1() {
        let obj = json!({"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let set = fields_of(&obj, true);
        assert!(set.contains(&vec![
            "f:metadata".to_string(),
            "f:labels".into(),
            "f:a".into()
        ]));
        assert!(
            !set.iter()
                .any(|p| p.last().is_some_and(|l| l == "f:name") && p.len() == 2)
        );
        assert_eq!(decode(&encode(&set)), set);
        let path = vec![
            "f:spec".to_string(),
            "f:containers".into(),
            r#"k:{"name":"c"}"#.into(),
            "f:image".into(),
        ];
        assert_eq!(value_at(&obj, &path), Some(&json!("i")));
    }

    #[test]
    fn apply_conflicts_unless_forced_and_removes_dropped_fields() {
        let a1 =
            json!({"metadata": {"name": "x", "labels": {"a": "1", "b": "2"}}, "data": {"k": "v"}});
        let obj =
            server_side_apply(None, &a1, &mgr("alice"), false, |_| true).expect("first apply");
        let a2 = json!({"metadata": {"name": "x"}, "data": {"k": "other"}});
        let err =
            server_side_apply(Some(&obj), &a2, &mgr("bob"), false, |_| true).expect_err("conflict");
        assert_eq!(err, vec![("alice".to_string(), ".data.k".to_string())]);
        let forced =
            server_side_apply(Some(&obj), &a2, &mgr("bob"), true, |_| true).expect("forced");
        assert_eq!(forced["data"]["k"], "other");
        let a3 = json!({"metadata": {"name": "x", "labels": {"a": "1"}}});
        let dropped =
            server_side_apply(Some(&forced), &a3, &mgr("alice"), false, |_| true).expect("reapply");
        assert_eq!(dropped["metadata"]["labels"], json!({"a": "1"}));
        assert_eq!(dropped["data"]["k"], "other", "bob still owns data.k");
    }

    #[test]
    fn strategic_merge_keys_containers_by_name() {
        let mut target = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]},
            "metadata": {"finalizers": ["x"]}});
        let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "3"}, {"name": "a", "$patch": "delete"}]},
            "metadata": {"finalizers": ["y"], "$deleteFromPrimitiveList/finalizers": ["x"]}});
        strategic_merge(&mut target, &patch);
        assert_eq!(
            target["spec"]["containers"],
            json!([{"name": "b", "image": "3"}])
        );
        assert_eq!(target["metadata"]["finalizers"], json!(["y"]));
    }
}
