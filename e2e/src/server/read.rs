//! Reads: `get` (with the scale view, tables and metadata-only answers), `list` (selectors,
//! pages with continue tokens) and `pods/{name}/log`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use base64::Engine;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Value, json};

use super::write::scale_of;
use super::{
    Answer, AppState, Req, Result, Target, error_response, json_response, partial, selectors,
    served,
};
use crate::error::ApiError;
use crate::table::{self, IncludeObject};

pub(super) fn get(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let name = t.name.as_deref().unwrap_or_default();
    let obj = st
        .store
        .get(&t.key(name))
        .ok_or_else(|| ApiError::not_found(&t.info, name))?;
    if t.sub == "scale" {
        return Ok((200, Arc::new(scale_of(&t.info, &obj)), vec![]));
    }
    let obj = served(&t.info, obj);
    if req.wants_table() {
        let include = IncludeObject::parse(req.q("includeObject"));
        let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
        let table = table::table(&t.info, &[obj], include, meta);
        return Ok((200, Arc::new(table), vec![]));
    }
    if req.wants_metadata() {
        return Ok((200, Arc::new(partial(&obj)), vec![]));
    }
    Ok((200, obj, vec![]))
}

/// `GET pods/{name}/log`: the container's output so far, from the kubelet's log file
/// (`follow`, `since*` and `tailLines` are not supported; `tailLines` is honoured).
pub(super) fn pod_log(st: &AppState, req: &Req, t: &Target) -> Response {
    let name = t.name.as_deref().unwrap_or_default();
    let Some(pod) = st.store.get(&t.key(name)) else {
        return error_response(&ApiError::not_found(&t.info, name));
    };
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match (req.q("container"), containers.as_slice()) {
        (Some(c), _) if containers.contains(&c) => c,
        (Some(c), _) => {
            return error_response(&ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        (None, [only]) => *only,
        (None, all) => {
            return error_response(&ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                all.join(" ")
            )));
        }
    };
    let ns = t.namespace.clone().unwrap_or_default();
    let roots = st.log_roots.lock().map(|r| r.clone()).unwrap_or_default();
    let text = roots.iter().find_map(|r| {
        std::fs::read_to_string(r.join(&ns).join(name).join(format!("{container}.log"))).ok()
    });
    let Some(mut text) = text else {
        return error_response(&ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: no logs yet"
        )));
    };
    if let Some(n) = req.q("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(n);
        text = lines[start..].iter().map(|l| format!("{l}\n")).collect();
    }
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn decode_continue(token: &str) -> Result<(u64, String)> {
    let bad = || ApiError::bad_request("continue key is not valid: malformed token");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        v["start"].as_str().ok_or_else(bad)?.to_string(),
    ))
}

fn encode_continue(rv: u64, start: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rv, "start": start}).to_string())
}

/// A list item as served: the stored object, without `apiVersion`/`kind` for built-in kinds
/// (typed lists of built-ins carry none on their items). Serialized straight from the shared
/// object, never copied.
struct Item<'a> {
    obj: &'a Value,
    untyped: bool,
}

impl Serialize for Item<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let Some(m) = self.obj.as_object().filter(|_| self.untyped) else {
            return self.obj.serialize(s);
        };
        let mut out = s.serialize_map(None)?;
        for (k, v) in m {
            if k != "apiVersion" && k != "kind" {
                out.serialize_entry(k, v)?;
            }
        }
        out.end()
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListBody<'a> {
    kind: String,
    api_version: String,
    metadata: Value,
    items: Vec<Item<'a>>,
}

/// `(namespace, name)` a continue token resumes after.
fn split_start(start: &str) -> (&str, &str) {
    start.split_once('\u{0}').unwrap_or(("", start))
}

pub(super) fn list(st: &AppState, req: &Req, t: &Target) -> Result<Response> {
    let (labels, fields) = selectors(req)?;
    let equal = labels.equalities();
    let (mut matching, rv) = st.store.list_where(
        &t.info.group,
        &t.info.resource,
        t.namespace.as_deref(),
        &equal,
        |o| labels.matches(o) && fields.matches(o),
    );
    let mut list_rv = rv;
    if let Some(token) = req.q("continue").filter(|s| !s.is_empty()) {
        let (token_rv, start) = decode_continue(token)?;
        if token_rv < st.store.floor(&t.info.group, &t.info.resource) {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        list_rv = token_rv;
        let after = split_start(&start);
        matching.retain(|(k, _)| (k.namespace.as_str(), k.name.as_str()) > after);
    }
    let limit = req
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if let Some(limit) = limit
        && matching.len() > limit
    {
        let remaining = matching.len() - limit;
        matching.truncate(limit);
        if let Some((k, _)) = matching.last() {
            meta["continue"] = json!(encode_continue(
                list_rv,
                &format!("{}\u{0}{}", k.namespace, k.name)
            ));
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    let objects: Vec<Arc<Value>> = matching
        .into_iter()
        .map(|(_, o)| served(&t.info, o))
        .collect();
    if req.wants_table() {
        let include = IncludeObject::parse(req.q("includeObject"));
        let table = table::table(&t.info, &objects, include, meta);
        return Ok(json_response(200, &table, &[]));
    }
    if req.wants_metadata() {
        let items: Vec<Value> = objects.iter().map(|o| partial(o)).collect();
        let list = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items});
        return Ok(json_response(200, &list, &[]));
    }
    let untyped = t.info.crd.is_none();
    let body = ListBody {
        kind: format!("{}List", t.info.kind),
        api_version: t.info.api_version(),
        metadata: meta,
        items: objects.iter().map(|o| Item { obj: o, untyped }).collect(),
    };
    Ok(json_response(200, &body, &[]))
}
