//! `PATCH`: JSON merge patch, JSON patch, strategic merge patch and server-side apply, each
//! computed from the object as read and then written through the replace step.

use std::sync::Arc;

use axum::http::header;
use serde_json::{Value, json};

use super::admission::{check_type, parse_body};
use super::write::{create_object, replace, scale_of, write_scale};
use super::{Answer, AppState, Req, Result, Target, now, served};
use crate::error::{ApiError, Cause};
use crate::patch::{self, Manager};
use crate::registry::ResourceInfo;

/// Patches are computed from the object as read, then written on condition that it has not
/// changed; when it has (and the client did not pin a resourceVersion itself) the patch is
/// recomputed, as kube-apiserver's update loop does.
pub(super) fn patch_object(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let mut last = ApiError::internal("patch was not attempted");
    for _ in 0..8 {
        let mut retryable = false;
        match patch_once(st, req, t, &mut retryable) {
            Err(e) if retryable && matches!(e.reason, "Conflict" | "AlreadyExists") => last = e,
            result => return result,
        }
    }
    Err(last)
}

fn patch_once(st: &AppState, req: &Req, t: &Target, retryable: &mut bool) -> Result<Answer> {
    let ct = req
        .header(header::CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let name = t.name.clone().unwrap_or_default();
    let current = st.store.get(&t.key(&name));
    if ct == "application/apply-patch+yaml" {
        return apply(st, req, t, current, retryable);
    }
    let current = current.ok_or_else(|| ApiError::not_found(&t.info, &name))?;
    let base = if t.sub == "scale" {
        scale_of(&t.info, &current)
    } else {
        Arc::unwrap_or_clone(served(&t.info, current))
    };
    let base_rv = base["metadata"]["resourceVersion"].clone();
    let mut target = base;
    match ct.as_str() {
        "application/merge-patch+json" => {
            let p: Value = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::merge(&mut target, &p);
        }
        "application/strategic-merge-patch+json" => {
            if t.info.crd.is_some() {
                return Err(ApiError::unsupported_media_type(&ct));
            }
            let p: Value = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            patch::strategic_merge(&mut target, &p);
        }
        "application/json-patch+json" => {
            let p: json_patch::Patch = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            // All or nothing, one operation at a time: kube-apiserver's JSON patch
            // (evanphx/json-patch) lets a `test` against null pass when the path is missing,
            // which kube-rs's finalizer helper relies on for objects without finalizers.
            // A failed patch returns an error, so `target` may be patched in place.
            let work = &mut target;
            for (i, op) in p.iter().enumerate() {
                if let json_patch::PatchOperation::Test(t) = op
                    && t.value.is_null()
                    && work.pointer(t.path.as_str()).is_none()
                {
                    continue;
                }
                json_patch::patch(work, std::slice::from_ref(op)).map_err(|mut e| {
                    e.operation = i;
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
            }
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    // A resourceVersion the patch sets itself is the client's precondition (a conflict goes
    // back to it); otherwise the version read is ours, and a conflict means "recompute".
    let patched_rv = target["metadata"]["resourceVersion"] != base_rv;
    if !patched_rv {
        target["metadata"]["resourceVersion"] = base_rv;
        *retryable = true;
    }
    if t.sub == "scale" {
        return write_scale(st, req, t, target);
    }
    if t.sub.is_empty() {
        check_type(t, &mut target)?;
    }
    replace(st, req, t, target, false)
}

fn apply(
    st: &AppState,
    req: &Req,
    t: &Target,
    current: Option<Arc<Value>>,
    retryable: &mut bool,
) -> Result<Answer> {
    let name = t.name.clone().unwrap_or_default();
    let Some(manager) = req.q("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::invalid(
            &ResourceInfo {
                kind: "PatchOptions".into(),
                group: "meta.k8s.io".into(),
                ..(*t.info).clone()
            },
            "",
            &[Cause {
                reason: "FieldValueRequired",
                field: "fieldManager".into(),
                message: "Required value: is required for apply patch".into(),
            }],
        ));
    };
    let mut applied = parse_body(req)?;
    if applied["apiVersion"].as_str().is_none() || applied["kind"].as_str().is_none() {
        return Err(ApiError::bad_request(
            "apiVersion and kind must be set in an applied configuration",
        ));
    }
    check_type(t, &mut applied)?;
    let time = now();
    let status = t.info.status;
    let sub = t.sub.clone();
    let scope = move |p: &patch::FieldPath| {
        let is_status = p.first().is_some_and(|f| f == "f:status");
        if sub == "status" {
            is_status
        } else {
            !(status && is_status)
        }
    };
    let api_version = t.info.api_version();
    let m = Manager {
        name: manager,
        api_version: &api_version,
        time: &time,
        subresource: &t.sub,
        keyed: t.info.crd.is_none(),
    };
    let force = req.flag("force");
    let merged = patch::server_side_apply(current.as_deref(), &applied, &m, force, scope)
        .map_err(|c| ApiError::apply_conflict(&t.info, &name, &c))?;
    // A resourceVersion in the applied configuration is the client's precondition.
    let client_rv = applied["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
        .map(String::from);
    *retryable = client_rv.is_none();
    match current {
        None if t.sub.is_empty() => {
            let mut obj = merged;
            obj["metadata"]["name"] = json!(name);
            create_object(st, req, t, obj, true)
        }
        None => Err(ApiError::not_found(&t.info, &name)),
        Some(cur) => {
            let mut merged = merged;
            merged["metadata"]["resourceVersion"] = match client_rv {
                Some(rv) => json!(rv),
                None => cur["metadata"]["resourceVersion"].clone(),
            };
            replace(st, req, t, merged, true)
        }
    }
}
