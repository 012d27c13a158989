//! Writes of whole objects: `create` (POST), `update` (PUT, also through `/status` and
//! `/scale`), and the replace step that patches and server-side apply end in.

use std::sync::Arc;

use serde_json::{Value, json};

use super::admission::{
    Ctx, admit, builtin_defaults, check_shape, check_type, crd_status, ensure_namespace, is_crd,
    is_dns_subdomain, parse_body, same_but_rv, same_spec,
};
use super::delete::drop_crd;
use super::{Answer, AppState, Req, Result, Target, now, served};
use crate::error::{ApiError, Cause};
use crate::patch;
use crate::registry::{ResourceInfo, infos_from_crd};
use crate::selectors::LabelSelector;
use crate::store::Write;
use crate::table;

/// How often a write recomputes when other writers keep moving the object under it.
const RETRIES: usize = 16;

pub(super) fn create(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let mut obj = parse_body(req)?;
    check_type(t, &mut obj)?;
    create_object(st, req, t, obj, false)
}

/// Create `obj`; `applied`: server-side apply has already written its managedFields.
pub(super) fn create_object(
    st: &AppState,
    req: &Req,
    t: &Target,
    mut obj: Value,
    applied: bool,
) -> Result<Answer> {
    check_shape(&obj, t.info.crd.is_none())?;
    let ctx = Ctx::new(st, t, req);
    if t.info.namespaced {
        let ns = t.namespace.clone().unwrap_or_default();
        match obj["metadata"]["namespace"].as_str() {
            Some(n) if n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
        ensure_namespace(st, t)?;
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let name = match (
        obj["metadata"]["name"].as_str(),
        obj["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => {
            let suffix: String = uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(5)
                .collect();
            format!("{prefix}{suffix}")
        }
        _ => {
            return Err(ApiError::invalid(
                &t.info,
                "",
                &[Cause {
                    reason: "FieldValueRequired",
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                }],
            ));
        }
    };
    if !is_dns_subdomain(&name) {
        return Err(ApiError::invalid(
            &t.info,
            &name,
            &[Cause {
                reason: "FieldValueInvalid",
                field: "metadata.name".into(),
                message: format!(
                    "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            }],
        ));
    }
    obj["metadata"]["name"] = json!(name);
    let key = t.key(&name);
    let time = now();
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(time));
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("resourceVersion");
        m.remove("generation");
        if !applied {
            m.remove("managedFields");
        }
    }
    if t.info.crd.is_some()
        && t.info.status
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
    // Ownership is of what the client sent: defaulted fields belong to no manager.
    if !applied {
        patch::track_update(None, &mut obj, &ctx.mgr(&time));
    }
    let (mut obj, warnings) = admit(&ctx, obj, None, &name)?;
    if t.info.generation {
        obj["metadata"]["generation"] = json!(1);
    }
    if is_crd(&t.info) {
        obj["status"] = crd_status(&obj);
    }
    let stored = st.store.write(&key, |cur, rv| {
        if cur.is_some() {
            return Err(ApiError::already_exists(&t.info, &name));
        }
        builtin_defaults(&t.info, &mut obj, rv);
        if ctx.dry_run {
            let mut o = std::mem::take(&mut obj);
            o["metadata"]["resourceVersion"] = json!("");
            return Ok(Write::Answer(o));
        }
        Ok(Write::Put(std::mem::take(&mut obj)))
    })?;
    let stored = stored.ok_or_else(|| ApiError::internal("create stored nothing"))?;
    if is_crd(&t.info) && !ctx.dry_run {
        register_crd(st, &stored);
    }
    Ok((201, served(&t.info, stored), warnings))
}

pub(super) fn register_crd(st: &AppState, crd: &Value) {
    match infos_from_crd(crd) {
        Ok(infos) => st.registry.register_crd(infos),
        Err(e) => tracing::warn!("stored CRD does not describe a kind: {e}"),
    }
}

/// What replacing `old` with `new` under the update rules writes. Pure and possibly slow
/// (admission): it runs outside the store's lock, on a snapshot.
fn replaced(
    ctx: &Ctx<'_>,
    t: &Target,
    name: &str,
    old: &Value,
    mut new: Value,
    tracked: bool,
    time: &str,
) -> Result<(Write, Vec<String>)> {
    if t.sub == "status" {
        let mut base = old.clone();
        match new.get_mut("status") {
            Some(s) => base["status"] = s.take(),
            None => {
                if let Some(m) = base.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        if tracked {
            base["metadata"]["managedFields"] = new["metadata"]["managedFields"].take();
        }
        new = base;
    } else if t.info.status {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "name",
        "namespace",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if !old["metadata"]["deletionTimestamp"].is_null() {
        let old_f = old["metadata"]["finalizers"].as_array();
        let added = new["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| old_f.is_none_or(|o| !o.contains(f)));
        if added {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                    t.info.kind
                ),
            ));
        }
    }
    if is_crd(&t.info) {
        new["status"] = crd_status(&new);
    }
    if !tracked {
        patch::track_update(Some(old), &mut new, &ctx.mgr(time));
    }
    let (mut new, warnings) = admit(ctx, new, Some(old), name)?;
    if t.info.generation && !same_spec(&t.info, old, &new) {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    if same_but_rv(&new, old) {
        return Ok((Write::Keep, warnings));
    }
    if ctx.dry_run {
        return Ok((Write::Answer(new), warnings));
    }
    let finalizers_done = new["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    if !new["metadata"]["deletionTimestamp"].is_null() && finalizers_done {
        return Ok((Write::Delete, warnings));
    }
    Ok((Write::Put(new), warnings))
}

/// Replace the stored object with `new` (already parsed), applying the update rules. A
/// `metadata.resourceVersion` in `new` is a precondition (409 Conflict when the object moved).
/// `tracked`: managedFields already maintained (server-side apply).
pub(super) fn replace(
    st: &AppState,
    req: &Req,
    t: &Target,
    new: Value,
    tracked: bool,
) -> Result<Answer> {
    check_shape(&new, t.info.crd.is_none())?;
    let ctx = Ctx::new(st, t, req);
    let name = t.name.clone().unwrap_or_default();
    let key = t.key(&name);
    if let Some(n) = new["metadata"]["name"].as_str()
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let want_rv = new["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from);
    let conflict = || {
        ApiError::conflict(
            &t.info,
            &name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    };
    let time = now();
    for _ in 0..RETRIES {
        let old = st
            .store
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&t.info, &name))?;
        if want_rv
            .as_deref()
            .is_some_and(|want| Some(want) != old["metadata"]["resourceVersion"].as_str())
        {
            return Err(conflict());
        }
        let (decision, warnings) = replaced(&ctx, t, &name, &old, new.clone(), tracked, &time)?;
        let mut moved = false;
        let result = st.store.write(&key, |cur, _| match cur {
            Some(cur) if Arc::ptr_eq(cur, &old) => Ok(decision),
            Some(_) => {
                moved = true;
                Ok(Write::Keep)
            }
            None => Err(ApiError::not_found(&t.info, &name)),
        })?;
        if moved {
            // Someone wrote in between: a pinned version now conflicts, otherwise recompute.
            if want_rv.is_some() {
                return Err(conflict());
            }
            continue;
        }
        let obj = result.ok_or_else(|| ApiError::not_found(&t.info, &name))?;
        if is_crd(&t.info) && !ctx.dry_run {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                register_crd(st, &obj);
            } else if st.store.get(&key).is_none() {
                drop_crd(st, &obj);
            }
        }
        st.gc.notify_one();
        return Ok((200, served(&t.info, obj), warnings));
    }
    Err(conflict())
}

pub(super) fn update(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let mut body = parse_body(req)?;
    if t.sub == "scale" {
        return write_scale(st, req, t, body);
    }
    check_type(t, &mut body)?;
    replace(st, req, t, body, false)
}

pub(super) fn scale_of(info: &ResourceInfo, obj: &Value) -> Value {
    let Some(paths) = &info.scale else {
        return Value::Null;
    };
    let first = |p: &str| table::json_path(obj, p).into_iter().next();
    let selector = match &paths.label_selector {
        Some(p) => first(p)
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        None => LabelSelector::from_object(&obj["spec"]["selector"]).to_string_form(),
    };
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "uid": obj["metadata"]["uid"],
            "resourceVersion": obj["metadata"]["resourceVersion"], "creationTimestamp": obj["metadata"]["creationTimestamp"]},
        "spec": {"replicas": first(&paths.spec_replicas).unwrap_or(json!(0))},
        "status": {"replicas": first(&paths.status_replicas).unwrap_or(json!(0)), "selector": selector},
    })
}

fn set_path(obj: &mut Value, path: &str, v: Value) {
    let mut cur = obj;
    for seg in path.trim_start_matches('.').split('.') {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = &mut cur[seg];
    }
    *cur = v;
}

pub(super) fn write_scale(st: &AppState, req: &Req, t: &Target, scale: Value) -> Result<Answer> {
    let name = t.name.clone().unwrap_or_default();
    let paths = t.info.scale.clone().ok_or_else(ApiError::not_found_path)?;
    let replicas = scale["spec"]["replicas"]
        .as_i64()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                &t.info,
                &name,
                &[Cause {
                    reason: "FieldValueInvalid",
                    field: "spec.replicas".into(),
                    message: "Invalid value: must be greater than or equal to 0".into(),
                }],
            )
        })?;
    let mut obj = Arc::unwrap_or_clone(
        st.store
            .get(&t.key(&name))
            .ok_or_else(|| ApiError::not_found(&t.info, &name))?,
    );
    if let Some(rv) = scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        obj["metadata"]["resourceVersion"] = json!(rv);
    }
    set_path(&mut obj, &paths.spec_replicas, json!(replicas));
    let main = Target {
        info: t.info.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        sub: String::new(),
    };
    let (_, stored, w) = replace(st, req, &main, obj, false)?;
    Ok((200, Arc::new(scale_of(&t.info, &stored)), w))
}
