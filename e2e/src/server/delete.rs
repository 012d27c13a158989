//! `DELETE` of one object or a collection: finalizers and graceful pod deletion keep an object
//! (with a `deletionTimestamp`) until they are done; propagation policies decide what happens to
//! dependents; deleting a CRD or a namespace takes what they hold with them.

use serde_json::{Value, json};

use super::admission::is_crd;
use super::{Answer, AppState, Req, Result, Target, now, selectors, served};
use crate::error::{ApiError, success_status};
use crate::registry::ResourceInfo;
use crate::store::{Key, Write};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Propagation {
    Background,
    Foreground,
    Orphan,
}

fn delete_options(req: &Req) -> Result<(Propagation, Value)> {
    let body: Value = if req.body.is_empty() {
        json!({})
    } else if req
        .header(axum::http::header::CONTENT_TYPE)
        .contains("protobuf")
    {
        crate::protobuf::decode(&req.body)?
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let policy = req
        .q("propagationPolicy")
        .map(String::from)
        .or_else(|| body["propagationPolicy"].as_str().map(String::from));
    let orphan =
        body["orphanDependents"] == json!(true) || req.q("orphanDependents") == Some("true");
    let p = match policy.as_deref() {
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some("Background") | None if !orphan => Propagation::Background,
        None => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{other}\""
            )));
        }
    };
    let mut options = body;
    if let Some(g) = req
        .q("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
    {
        options["gracePeriodSeconds"] = json!(g);
    }
    Ok((p, options))
}

pub(super) fn delete(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let (policy, options) = delete_options(req)?;
    let name = t.name.clone().unwrap_or_default();
    let dry = req.q("dryRun") == Some("All");
    delete_one(st, &t.info, &t.key(&name), policy, &options, dry)
}

/// Delete one object: with finalizers (or Foreground) it gets a deletionTimestamp and stays;
/// otherwise it goes now and garbage collection handles dependents.
pub(super) fn delete_one(
    st: &AppState,
    info: &ResourceInfo,
    key: &Key,
    policy: Propagation,
    options: &Value,
    dry: bool,
) -> Result<Answer> {
    let name = key.name.clone();
    let pre = &options["preconditions"];
    let result = st.store.write(key, |cur, _| {
        let Some(old) = cur else { return Err(ApiError::not_found(info, &name)) };
        if let Some(uid) = pre["uid"].as_str()
            && Some(uid) != old["metadata"]["uid"].as_str()
        {
            return Err(ApiError::conflict(info, &name, &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", old["metadata"]["uid"].as_str().unwrap_or_default())));
        }
        if let Some(rv) = pre["resourceVersion"].as_str()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(info, &name, "the object has been modified; please apply your changes to the latest version and try again"));
        }
        let mut finalizers: Vec<Value> = old["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        if policy == Propagation::Foreground && !finalizers.contains(&json!("foregroundDeletion")) && old["metadata"]["deletionTimestamp"].is_null() {
            finalizers.push(json!("foregroundDeletion"));
        }
        if dry {
            return Ok(Write::Keep);
        }
        // Pods on a node are deleted gracefully: the kubelet stops them, then removes them.
        let grace = options["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| old["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30);
        let graceful = info.group.is_empty()
            && info.resource == "pods"
            && old["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
            && grace > 0
            && !matches!(old["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        if finalizers.is_empty() && !graceful {
            return Ok(Write::Delete);
        }
        if !old["metadata"]["deletionTimestamp"].is_null() {
            // A later delete of a Terminating pod may shorten its grace period (never lengthen
            // it): `kubectl delete --grace-period=1` hurries a slow stop along.
            let wanted = if graceful { grace } else { 0 };
            let shorter = info.group.is_empty()
                && info.resource == "pods"
                && old["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .is_some_and(|g| wanted < g);
            if !shorter {
                return Ok(Write::Keep);
            }
            let mut new = Value::clone(old);
            new["metadata"]["deletionGracePeriodSeconds"] = json!(wanted);
            return Ok(Write::Put(new));
        }
        let mut new = Value::clone(old);
        new["metadata"]["finalizers"] = Value::Array(finalizers);
        new["metadata"]["deletionTimestamp"] = json!(now());
        new["metadata"]["deletionGracePeriodSeconds"] = json!(if graceful { grace } else { 0 });
        if info.generation {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        Ok(Write::Put(new))
    })?;
    let obj = result.ok_or_else(|| ApiError::not_found(info, &name))?;
    let gone = st.store.get(key).is_none();
    if gone && !dry {
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if policy == Propagation::Orphan {
            orphan_dependents(st, &uid);
        }
        if is_crd(info) {
            drop_crd(st, &obj);
        }
        if info.group.is_empty() && info.resource == "namespaces" {
            empty_namespace(st, &name);
        }
    }
    st.gc.notify_one();
    if gone && info.crd.is_some() {
        return Ok((
            200,
            std::sync::Arc::new(success_status(
                info,
                &name,
                obj["metadata"]["uid"].as_str().unwrap_or_default(),
            )),
            vec![],
        ));
    }
    Ok((200, served(info, obj), vec![]))
}

fn orphan_dependents(st: &AppState, uid: &str) {
    let keys: Vec<Key> = st.store.read(|o| o.dependents(uid).cloned().collect());
    for key in keys {
        let _ = st.store.write(&key, |cur, _| -> Result<Write> {
            let Some(cur) = cur else {
                return Ok(Write::Keep);
            };
            let refs = cur["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !refs.iter().any(|r| r["uid"] == json!(uid)) {
                return Ok(Write::Keep);
            }
            let mut new = Value::clone(cur);
            let kept: Vec<Value> = refs
                .into_iter()
                .filter(|r| r["uid"] != json!(uid))
                .collect();
            if kept.is_empty() {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove("ownerReferences");
                }
            } else {
                new["metadata"]["ownerReferences"] = Value::Array(kept);
            }
            Ok(Write::Put(new))
        });
    }
}

pub(super) fn drop_crd(st: &AppState, crd: &Value) {
    let group = crd["spec"]["group"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let plural = crd["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (items, _) = st.store.list(&group, &plural, None);
    for (key, _) in items {
        let _ = st
            .store
            .write(&key, |_, _| -> Result<Write> { Ok(Write::Delete) });
    }
    st.registry.unregister(&group, &plural);
}

fn empty_namespace(st: &AppState, ns: &str) {
    for (key, _) in st
        .store
        .all()
        .into_iter()
        .filter(|(k, _)| k.namespace == ns)
    {
        let Some(info) = st
            .registry
            .all()
            .into_iter()
            .find(|i| i.group == key.group && i.resource == key.resource)
        else {
            continue;
        };
        let _ = delete_one(
            st,
            &info,
            &key,
            Propagation::Background,
            &Value::Null,
            false,
        );
    }
}

pub(super) fn delete_collection(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let (policy, options) = delete_options(req)?;
    let (labels, fields) = selectors(req)?;
    let (items, _) = st.store.list_where(
        &t.info.group,
        &t.info.resource,
        t.namespace.as_deref(),
        &labels.equalities(),
        |o| labels.matches(o) && fields.matches(o),
    );
    let dry = req.q("dryRun") == Some("All");
    let mut deleted = Vec::new();
    for (key, obj) in items {
        match delete_one(st, &t.info, &key, policy, &options, dry) {
            Ok(_) | Err(ApiError { code: 404, .. }) => {
                deleted.push(Value::clone(&served(&t.info, obj)))
            }
            Err(e) => return Err(e),
        }
    }
    let rv = st.store.current_rv().to_string();
    Ok((
        200,
        std::sync::Arc::new(
            json!({"kind": format!("{}List", t.info.kind), "apiVersion": t.info.api_version(), "metadata": {"resourceVersion": rv}, "items": deleted}),
        ),
        vec![],
    ))
}
