//! The HTTP layer: routing kube-style paths to the store, verbs, subresources, watches,
//! discovery and OpenAPI. One fallback handler parses the path itself, because Kubernetes
//! paths (`/api/v1/namespaces/{ns}/pods/{name}/status`) do not fit a static route table well.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::error::{ApiError, Cause, success_status};
use crate::faults::{Audit, AuditEvent, FaultAction, Faults};
use crate::openapi;
use crate::patch::{self, Manager};
use crate::registry::{Registry, ResourceInfo, infos_from_crd};
use crate::schema;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Key, Objects, Store, Write, owner_uids};
use crate::table::{self, IncludeObject};

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// Objects.
    pub store: Arc<Store>,
    /// Served kinds.
    pub registry: Arc<Registry>,
    /// Injected faults.
    pub faults: Arc<Faults>,
    /// Request log.
    pub audit: Arc<Audit>,
    /// Bearer token → user name.
    pub tokens: HashMap<String, String>,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Wakes the garbage collector.
    pub gc: Notify,
    /// `host:port`, for `/api`'s serverAddressByClientCIDRs.
    pub address: String,
    /// Where process kubelets keep pod logs (`<root>/<ns>/<pod>/<container>.log`), for
    /// `pods/log`.
    pub log_roots: std::sync::Mutex<Vec<std::path::PathBuf>>,
}

type Result<T> = std::result::Result<T, ApiError>;

/// A parsed request.
struct Req {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Req {
    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true" | "1"))
    }
    fn header(&self, k: header::HeaderName) -> &str {
        self.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
    fn wants_table(&self) -> bool {
        self.header(header::ACCEPT)
            .split(',')
            .next()
            .is_some_and(|first| first.contains("as=Table"))
    }
    /// `Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`.
    fn wants_aggregated_discovery(&self) -> bool {
        self.header(header::ACCEPT).split(',').any(|a| {
            let params: Vec<&str> = a.split(';').map(str::trim).collect();
            params.contains(&"as=APIGroupDiscoveryList") && params.contains(&"v=v2")
        })
    }
    /// `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    fn wants_metadata(&self) -> bool {
        self.header(header::ACCEPT)
            .split(',')
            .next()
            .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
    }
}

/// The metadata-only view of an object.
fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

/// Which resource a path names.
struct Target {
    info: Arc<ResourceInfo>,
    namespace: Option<String>,
    name: Option<String>,
    sub: String,
}

impl Target {
    fn key(&self, name: &str) -> Key {
        Key {
            group: self.info.group.clone(),
            resource: self.info.resource.clone(),
            namespace: if self.info.namespaced {
                self.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\""))) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn error_response(e: &ApiError) -> Response {
    let mut resp = json_response(e.code, &e.to_status(), &[]);
    if e.code == 429
        && let Ok(v) = HeaderValue::from_str("1")
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn injected(code: u16) -> ApiError {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    ApiError::new(code, reason, format!("injected fault: {reason}"))
}

/// The single entry point for every request.
pub async fn handle(State(st): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let query = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let req = Req {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        headers: parts.headers,
        body,
    };
    let mut event = AuditEvent {
        path: req.path.clone(),
        ..AuditEvent::default()
    };
    let response = match authenticate(&st, &req) {
        Ok(user) => {
            event.user = user;
            route(&st, &req, &mut event).await
        }
        Err(e) => error_response(&e),
    };
    event.code = response.status().as_u16();
    tracing::debug!(verb = %event.verb, path = %req.path, code = event.code, "request");
    st.audit.record(event);
    response
}

fn authenticate(st: &AppState, req: &Req) -> Result<String> {
    let auth = req.header(header::AUTHORIZATION);
    if let Some(token) = auth.strip_prefix("Bearer ") {
        return st
            .tokens
            .get(token.trim())
            .cloned()
            .ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    if let Some(basic) = auth.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::new(401, "Unauthorized", "Unauthorized"))?;
        return Ok(decoded.split(':').next().unwrap_or_default().to_string());
    }
    Ok("system:anonymous".into())
}

async fn route(st: &Arc<AppState>, req: &Req, event: &mut AuditEvent) -> Response {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    event.verb = req.method.as_str().to_ascii_lowercase();
    let non_resource = match segs.as_slice() {
        ["version"] => Some(Ok(version())),
        ["healthz" | "livez" | "readyz"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return r;
        }
        ["api"] | ["apis"] if req.wants_aggregated_discovery() && req.method == Method::GET => {
            return aggregated_discovery(&st.registry, segs[0] == "api");
        }
        ["api"] => Some(Ok(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": st.address}]}))),
        ["apis"] => Some(Ok(group_list(&st.registry))),
        ["api", "v1"] => Some(Ok(resource_list(&st.registry, "", "v1"))),
        ["apis", g] => Some(group(&st.registry, g)),
        ["apis", g, v] if st.registry.has_group_version(g, v) => {
            Some(Ok(resource_list(&st.registry, g, v)))
        }
        ["openapi", "v3"] => Some(Ok(openapi::index(&st.registry.all()))),
        ["openapi", "v3", rest @ ..] => {
            let gv = rest.join("/");
            let all = st.registry.all();
            let by = openapi::by_group_version(&all);
            Some(
                by.get(&gv)
                    .map(|infos| openapi::gv_document(infos))
                    .ok_or_else(ApiError::not_found_path),
            )
        }
        ["openapi", "v2"] => Some(Err(ApiError::new(
            406,
            "NotAcceptable",
            "OpenAPI v2 is not served by the e2e API server; use /openapi/v3",
        ))),
        _ => None,
    };
    if let Some(result) = non_resource {
        return match (req.method.clone(), result) {
            (Method::GET, Ok(v)) => json_response(200, &v, &[]),
            (Method::GET, Err(e)) => error_response(&e),
            _ => error_response(&ApiError::method_not_allowed()),
        };
    }
    let target = match parse_target(&st.registry, &segs) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    event.group = target.info.group.clone();
    event.resource = target.info.resource.clone();
    event.subresource = target.sub.clone();
    event.namespace = target.namespace.clone().unwrap_or_default();
    event.name = target.name.clone().unwrap_or_default();
    event.verb = match (&req.method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if req.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
    .to_string();
    for action in st.faults.take(event) {
        match action {
            FaultAction::Delay(d) => tokio::time::sleep(d).await,
            FaultAction::Fail(code) => return error_response(&injected(code)),
        }
    }
    let result = match event.verb.as_str() {
        "get" if target.sub == "log" => return pod_log(st, req, &target),
        "get" => get(st, req, &target),
        "list" => list(st, req, &target),
        "watch" => return watch(st.clone(), req, target),
        "create" if target.name.is_none() => create(st, req, &target),
        "update" if target.name.is_some() => update(st, req, &target),
        "patch" if target.name.is_some() => patch_object(st, req, &target),
        "delete" => delete(st, req, &target),
        "deletecollection" => delete_collection(st, req, &target),
        _ => Err(ApiError::method_not_allowed()),
    };
    match result {
        Ok((code, body, warnings)) => json_response(code, &body, &warnings),
        Err(e) => error_response(&e),
    }
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2`) of the core group (`/api`) or of every
/// other group (`/apis`), as kubectl 1.32 and kube-rs ask for first.
fn aggregated_discovery(reg: &Registry, core: bool) -> Response {
    // (group, [(version, [resource entries])]), in registry order.
    type Versions = Vec<(String, Vec<Value>)>;
    let mut groups: Vec<(String, Versions)> = Vec::new();
    for i in reg.all().iter().filter(|i| i.group.is_empty() == core) {
        let g = match groups.iter_mut().position(|(g, _)| *g == i.group) {
            Some(p) => &mut groups[p].1,
            None => {
                groups.push((i.group.clone(), Vec::new()));
                let last = groups.len() - 1;
                &mut groups[last].1
            }
        };
        match g.iter_mut().find(|(v, _)| *v == i.version) {
            Some((_, rs)) => rs.push(i.aggregated_entry()),
            None => g.push((i.version.clone(), vec![i.aggregated_entry()])),
        }
    }
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|(v, resources)| json!({"version": v, "resources": resources, "freshness": "Current"}))
                .collect();
            json!({"metadata": {"name": g}, "versions": versions})
        })
        .collect();
    let body = json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items});
    let mut resp = json_response(200, &body, &[]);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    resp
}

fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-whaleflux-e2e", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"})
}

fn group_list(reg: &Registry) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for i in reg.all().iter().filter(|i| !i.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == i.group) {
            Some((_, vs)) if !vs.contains(&i.version) => vs.push(i.version.clone()),
            Some(_) => {}
            None => groups.push((i.group.clone(), vec![i.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups.iter().map(|(g, vs)| group_value(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group_value(g: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

fn group(reg: &Registry, g: &str) -> Result<Value> {
    let mut versions: Vec<String> = reg
        .all()
        .iter()
        .filter(|i| i.group == g)
        .map(|i| i.version.clone())
        .collect();
    versions.dedup();
    if versions.is_empty() {
        return Err(ApiError::not_found_path());
    }
    let mut v = group_value(g, &versions);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Ok(v)
}

fn resource_list(reg: &Registry, g: &str, v: &str) -> Value {
    let resources: Vec<Value> = reg
        .all()
        .iter()
        .filter(|i| i.group == g && i.version == v)
        .flat_map(|i| i.discovery_entries())
        .collect();
    let gv = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn parse_target(reg: &Registry, segs: &[&str]) -> Result<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::not_found_path()),
    };
    let lookup = |r: &str| reg.get(group, version, r);
    let (namespace, rest) = match rest {
        ["namespaces", ns, r, tail @ ..] if lookup(r).is_some_and(|i| i.namespaced) => {
            (Some(ns.to_string()), {
                let mut v = vec![*r];
                v.extend_from_slice(tail);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let (resource, name, sub) = match rest.as_slice() {
        [r] => (*r, None, ""),
        [r, n] => (*r, Some(n.to_string()), ""),
        [r, n, s] => (*r, Some(n.to_string()), *s),
        _ => return Err(ApiError::not_found_path()),
    };
    let info = lookup(resource).ok_or_else(ApiError::not_found_path)?;
    let sub_ok = match sub {
        "" => true,
        "status" => info.status,
        "scale" => info.scale.is_some(),
        "log" => info.group.is_empty() && info.resource == "pods",
        _ => false,
    };
    if !sub_ok || (!info.namespaced && namespace.is_some()) {
        return Err(ApiError::not_found_path());
    }
    if info.namespaced && name.is_some() && namespace.is_none() {
        return Err(ApiError::not_found_path());
    }
    Ok(Target {
        info,
        namespace,
        name,
        sub: sub.to_string(),
    })
}

/// Serve an object at the requested version (no schema conversion between versions).
fn served(info: &ResourceInfo, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(info.api_version());
    obj["kind"] = json!(info.kind);
    obj
}

type Answer = (u16, Value, Vec<String>);

fn get(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let name = t.name.as_deref().unwrap_or_default();
    let obj = st
        .store
        .get(&t.key(name))
        .ok_or_else(|| ApiError::not_found(&t.info, name))?;
    if t.sub == "scale" {
        return Ok((200, scale_of(&t.info, &obj), vec![]));
    }
    let obj = served(&t.info, obj);
    if req.wants_table() {
        let include = IncludeObject::parse(req.q("includeObject"));
        let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
        return Ok((200, table::table(&t.info, &[obj], include, meta), vec![]));
    }
    if req.wants_metadata() {
        return Ok((200, partial(&obj), vec![]));
    }
    Ok((200, obj, vec![]))
}

/// `GET pods/{name}/log`: the container's output so far, from the kubelet's log file
/// (`follow`, `since*` and `tailLines` are not supported; `tailLines` is honoured).
fn pod_log(st: &AppState, req: &Req, t: &Target) -> Response {
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

fn selectors(req: &Req) -> Result<(LabelSelector, FieldSelector)> {
    Ok((
        LabelSelector::parse(req.q("labelSelector").unwrap_or_default())?,
        FieldSelector::parse(req.q("fieldSelector").unwrap_or_default())?,
    ))
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

fn list(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let (labels, fields) = selectors(req)?;
    let (mut matching, rv) = st.store.list_where(
        &t.info.group,
        &t.info.resource,
        t.namespace.as_deref(),
        |o| labels.matches(o) && fields.matches(o),
    );
    let mut list_rv = rv;
    if let Some(token) = req.q("continue").filter(|s| !s.is_empty()) {
        let (token_rv, start) = decode_continue(token)?;
        if token_rv < st.store.floor() {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        list_rv = token_rv;
        matching.retain(|(k, _)| format!("{}\u{0}{}", k.namespace, k.name) > start);
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
    let objects: Vec<Value> = matching
        .into_iter()
        .map(|(_, o)| served(&t.info, o))
        .collect();
    if req.wants_table() {
        return Ok((
            200,
            table::table(
                &t.info,
                &objects,
                IncludeObject::parse(req.q("includeObject")),
                meta,
            ),
            vec![],
        ));
    }
    if req.wants_metadata() {
        let items: Vec<Value> = objects.iter().map(partial).collect();
        let list = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "items": items});
        return Ok((200, list, vec![]));
    }
    let items: Vec<Value> = objects
        .into_iter()
        .map(|mut o| {
            // Typed lists of built-ins carry no apiVersion/kind on their items.
            if t.info.crd.is_none()
                && let Some(m) = o.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    Ok((
        200,
        json!({"kind": format!("{}List", t.info.kind), "apiVersion": t.info.api_version(), "metadata": meta, "items": items}),
        vec![],
    ))
}

fn parse_body(req: &Req) -> Result<Value> {
    let ct = req.header(header::CONTENT_TYPE);
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})"
            ),
        ));
    }
    let v: Value = if ct.contains("yaml") {
        serde_yaml::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?
    };
    check_shape(&v, false)?;
    Ok(v)
}

/// Reject bodies whose well-known fields have the wrong JSON type (a decoding error on a real
/// apiserver) before anything indexes into them.
fn check_shape(v: &Value, builtin: bool) -> Result<()> {
    if !v.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    let mut maps = vec![("metadata", &v["metadata"])];
    if builtin {
        maps.push(("spec", &v["spec"]));
        maps.push(("status", &v["status"]));
    }
    for (name, field) in maps {
        if !(field.is_object() || field.is_null()) {
            return Err(ApiError::bad_request(format!(
                "error decoding body: {name} must be an object"
            )));
        }
    }
    for field in ["labels", "annotations"] {
        let m = &v["metadata"][field];
        let ok = m.is_null()
            || m.as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
        if !ok {
            return Err(ApiError::bad_request(format!(
                "error decoding body: metadata.{field} must map strings to strings"
            )));
        }
    }
    Ok(())
}

fn check_type(t: &Target, obj: &mut Value) -> Result<()> {
    let want = t.info.api_version();
    match obj["apiVersion"].as_str() {
        Some(v) if v != want && t.sub.is_empty() => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )));
        }
        _ => obj["apiVersion"] = json!(want),
    }
    match obj["kind"].as_str() {
        Some(k) if k != t.info.kind && t.sub.is_empty() => Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            t.info.kind
        ))),
        _ => {
            obj["kind"] = json!(t.info.kind);
            Ok(())
        }
    }
}

fn manager_name(req: &Req) -> String {
    req.q("fieldManager").map(String::from).unwrap_or_else(|| {
        let ua = req.header(header::USER_AGENT);
        let m = ua.split('/').next().unwrap_or_default();
        if m.is_empty() {
            "unknown".into()
        } else {
            m.to_string()
        }
    })
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Server-set fields for new built-in objects, as the real defaulters and allocators set them.
fn builtin_defaults(info: &ResourceInfo, obj: &mut Value, rv: u64) {
    match (info.group.as_str(), info.resource.as_str()) {
        ("", "namespaces") => obj["status"]["phase"] = json!("Active"),
        ("", "pods") => {
            if obj["status"]["phase"].is_null() {
                obj["status"]["phase"] = json!("Pending");
            }
            if obj["spec"]["restartPolicy"].is_null() {
                obj["spec"]["restartPolicy"] = json!("Always");
            }
        }
        ("", "services") => {
            if obj["spec"]["type"].is_null() {
                obj["spec"]["type"] = json!("ClusterIP");
            }
            if obj["spec"]["clusterIP"].is_null() && obj["spec"]["type"] != json!("ExternalName") {
                let ip = format!("10.96.{}.{}", (rv / 250) % 250, rv % 250 + 1);
                obj["spec"]["clusterIP"] = json!(ip);
                obj["spec"]["clusterIPs"] = json!([ip]);
            }
            if obj["spec"]["sessionAffinity"].is_null() {
                obj["spec"]["sessionAffinity"] = json!("None");
            }
        }
        ("apps", "statefulsets") => {
            if obj["spec"]["replicas"].is_null() {
                obj["spec"]["replicas"] = json!(1);
            }
            if obj["spec"]["podManagementPolicy"].is_null() {
                obj["spec"]["podManagementPolicy"] = json!("OrderedReady");
            }
            if obj["spec"]["updateStrategy"].is_null() {
                obj["spec"]["updateStrategy"] =
                    json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
            }
            if obj["spec"]["revisionHistoryLimit"].is_null() {
                obj["spec"]["revisionHistoryLimit"] = json!(10);
            }
        }
        _ => {}
    }
}

/// The status a CRD gets once its names are accepted and it is established.
fn crd_status(crd: &Value) -> Value {
    let t = now();
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == json!(true))
        .map(|v| v["name"].clone())
        .collect();
    json!({
        "acceptedNames": crd["spec"]["names"],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": t, "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": t, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
        ],
        "storedVersions": stored,
    })
}

fn is_crd(info: &ResourceInfo) -> bool {
    info.group == "apiextensions.k8s.io" && info.resource == "customresourcedefinitions"
}

/// Per-write settings.
struct Ctx<'a> {
    info: &'a ResourceInfo,
    api_version: String,
    manager: String,
    strict: bool,
    dry_run: bool,
    sub: &'a str,
}

impl Ctx<'_> {
    fn new<'a>(t: &'a Target, req: &Req) -> Ctx<'a> {
        Ctx {
            info: &t.info,
            api_version: t.info.api_version(),
            manager: manager_name(req),
            strict: req.q("fieldValidation") == Some("Strict"),
            dry_run: req.q("dryRun") == Some("All"),
            sub: &t.sub,
        }
    }
    fn mgr<'b>(&'b self, time: &'b str) -> Manager<'b> {
        Manager {
            name: &self.manager,
            api_version: &self.api_version,
            time,
            subresource: self.sub,
            keyed: self.info.crd.is_none(),
        }
    }
}

/// Admission shared by create and update: CRD schema + CEL for custom resources, CRD shape
/// checks for CustomResourceDefinitions, name validity.
fn admit(
    ctx: &Ctx<'_>,
    obj: Value,
    old: Option<&Value>,
    name: &str,
) -> Result<(Value, Vec<String>)> {
    if let Some(crd) = &ctx.info.crd {
        let admitted = schema::admit(&crd.schema, &obj, old, ctx.strict).map_err(|c| {
            if ctx.strict && c.iter().all(|c| c.message.starts_with("unknown field")) {
                let list: Vec<String> = c.iter().map(|c| c.message.clone()).collect();
                ApiError::bad_request(format!(
                    "{} in {}: strict decoding error: {}",
                    ctx.info.kind,
                    ctx.info.api_version(),
                    list.join(", ")
                ))
            } else {
                ApiError::invalid(ctx.info, name, &c)
            }
        })?;
        return Ok((admitted.object, admitted.warnings));
    }
    if is_crd(ctx.info) {
        infos_from_crd(&obj).map_err(|m| {
            let (field, message) = m
                .split_once(": ")
                .map(|(f, m)| (f.to_string(), m.to_string()))
                .unwrap_or((String::new(), m));
            ApiError::invalid(
                ctx.info,
                name,
                &[Cause {
                    reason: "FieldValueInvalid",
                    field,
                    message,
                }],
            )
        })?;
    }
    Ok((obj, vec![]))
}

fn spec_view(info: &ResourceInfo, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        if info.status || info.crd.is_none() {
            m.remove("status");
        }
    }
    v
}

fn without_rv(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    v
}

fn ensure_namespace(st: &AppState, t: &Target) -> Result<()> {
    if !t.info.namespaced {
        return Ok(());
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let key = Key {
        group: String::new(),
        resource: "namespaces".into(),
        namespace: String::new(),
        name: ns.clone(),
    };
    if st.store.get(&key).is_none() {
        let info = st
            .registry
            .get("", "v1", "namespaces")
            .ok_or_else(|| ApiError::internal("namespaces not served"))?;
        return Err(ApiError::not_found(&info, &ns));
    }
    Ok(())
}

fn create(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let mut obj = parse_body(req)?;
    check_type(t, &mut obj)?;
    create_object(st, req, t, obj, false)
}

/// Create `obj`; `applied`: server-side apply has already written its managedFields.
fn create_object(
    st: &AppState,
    req: &Req,
    t: &Target,
    mut obj: Value,
    applied: bool,
) -> Result<Answer> {
    check_shape(&obj, t.info.crd.is_none())?;
    let ctx = Ctx::new(t, req);
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
            let mut o = obj.clone();
            o["metadata"]["resourceVersion"] = json!("");
            return Ok(Write::Unchanged(o));
        }
        Ok(Write::Put(obj.clone()))
    })?;
    let stored = stored.ok_or_else(|| ApiError::internal("create stored nothing"))?;
    if is_crd(&t.info) && !ctx.dry_run {
        register_crd(st, &stored);
    }
    Ok((201, served(&t.info, stored), warnings))
}

fn register_crd(st: &AppState, crd: &Value) {
    match infos_from_crd(crd) {
        Ok(infos) => st.registry.register_crd(infos),
        Err(e) => tracing::warn!("stored CRD does not describe a kind: {e}"),
    }
}

/// Replace the stored object with `new` (already parsed), applying the update rules.
/// `tracked`: managedFields already maintained (server-side apply).
fn replace(
    st: &AppState,
    req: &Req,
    t: &Target,
    new: Value,
    tracked: bool,
    precondition: bool,
) -> Result<Answer> {
    check_shape(&new, t.info.crd.is_none())?;
    let ctx = Ctx::new(t, req);
    let name = t.name.clone().unwrap_or_default();
    let key = t.key(&name);
    if let Some(n) = new["metadata"]["name"].as_str()
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let mut warnings = Vec::new();
    let time = now();
    let result = st.store.write(&key, |cur, _rv| {
        let Some(old) = cur else { return Err(ApiError::not_found(&t.info, &name)) };
        let mut new = new.clone();
        if precondition
            && let Some(want) = new["metadata"]["resourceVersion"].as_str().filter(|s| !s.is_empty())
            && Some(want) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(&t.info, &name, "the object has been modified; please apply your changes to the latest version and try again"));
        }
        if t.sub == "status" {
            let mut base = old.clone();
            match new.get("status") {
                Some(s) => base["status"] = s.clone(),
                None => {
                    if let Some(m) = base.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if tracked {
                base["metadata"]["managedFields"] = new["metadata"]["managedFields"].clone();
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
        for field in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "name", "namespace", "generation"] {
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
            let old_f: Vec<Value> = old["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
            let added = new["metadata"]["finalizers"].as_array().into_iter().flatten().any(|f| !old_f.contains(f));
            if added {
                return Err(ApiError::new(422, "Invalid", format!(
                    "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                    t.info.kind
                )));
            }
        }
        if is_crd(&t.info) {
            new["status"] = crd_status(&new);
        }
        if !tracked {
            patch::track_update(Some(old), &mut new, &ctx.mgr(&time));
        }
        let (mut new, w) = admit(&ctx, new, Some(old), &name)?;
        warnings = w;
        if t.info.generation && spec_view(&t.info, old) != spec_view(&t.info, &new) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if without_rv(&new) == without_rv(old) {
            return Ok(Write::Unchanged(old.clone()));
        }
        if ctx.dry_run {
            return Ok(Write::Unchanged(new));
        }
        let finalizers_done = new["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
        if !new["metadata"]["deletionTimestamp"].is_null() && finalizers_done {
            return Ok(Write::Delete);
        }
        Ok(Write::Put(new))
    })?;
    let obj = result.ok_or_else(|| ApiError::not_found(&t.info, &name))?;
    if is_crd(&t.info) && !ctx.dry_run {
        if obj["metadata"]["deletionTimestamp"].is_null() {
            register_crd(st, &obj);
        } else if st.store.get(&key).is_none() {
            drop_crd(st, &obj);
        }
    }
    st.gc.notify_one();
    Ok((200, served(&t.info, obj), warnings))
}

fn update(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let mut body = parse_body(req)?;
    if t.sub == "scale" {
        return write_scale(st, req, t, body);
    }
    check_type(t, &mut body)?;
    replace(st, req, t, body, false, true)
}

fn scale_of(info: &ResourceInfo, obj: &Value) -> Value {
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

fn write_scale(st: &AppState, req: &Req, t: &Target, scale: Value) -> Result<Answer> {
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
    let mut obj = st
        .store
        .get(&t.key(&name))
        .ok_or_else(|| ApiError::not_found(&t.info, &name))?;
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
    let (_, stored, w) = replace(st, req, &main, obj, false, true)?;
    Ok((200, scale_of(&t.info, &stored), w))
}

/// Patches are computed from the object as read, then written on condition that it has not
/// changed; when it has (and the client did not pin a resourceVersion itself) the patch is
/// recomputed, as kube-apiserver's update loop does.
fn patch_object(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
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
        served(&t.info, current.clone())
    };
    let mut target = base.clone();
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
            let mut work = target.clone();
            for (i, op) in p.iter().enumerate() {
                if let json_patch::PatchOperation::Test(t) = op
                    && t.value.is_null()
                    && work.pointer(t.path.as_str()).is_none()
                {
                    continue;
                }
                json_patch::patch(&mut work, std::slice::from_ref(op)).map_err(|mut e| {
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
            target = work;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    // A resourceVersion the patch sets itself is the client's precondition (a conflict goes
    // back to it); otherwise the version read is ours, and a conflict means "recompute".
    let patched_rv = target["metadata"]["resourceVersion"] != base["metadata"]["resourceVersion"];
    if !patched_rv {
        target["metadata"]["resourceVersion"] = base["metadata"]["resourceVersion"].clone();
        *retryable = true;
    }
    if t.sub == "scale" {
        return write_scale(st, req, t, target);
    }
    if t.sub.is_empty() {
        check_type(t, &mut target)?;
    }
    replace(st, req, t, target, false, true)
}

fn apply(
    st: &AppState,
    req: &Req,
    t: &Target,
    current: Option<Value>,
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
    let merged = patch::server_side_apply(current.as_ref(), &applied, &m, force, scope)
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
            replace(st, req, t, merged, true, true)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Propagation {
    Background,
    Foreground,
    Orphan,
}

fn delete_options(req: &Req) -> Result<(Propagation, Value)> {
    let body: Value = if req.body.is_empty() {
        json!({})
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

fn delete(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let (policy, options) = delete_options(req)?;
    let name = t.name.clone().unwrap_or_default();
    let dry = req.q("dryRun") == Some("All");
    delete_one(st, &t.info, &t.key(&name), policy, &options, dry)
}

/// Delete one object: with finalizers (or Foreground) it gets a deletionTimestamp and stays;
/// otherwise it goes now and garbage collection handles dependents.
fn delete_one(
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
            return Ok(Write::Unchanged(old.clone()));
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
            return Ok(Write::Unchanged(old.clone()));
        }
        let mut new = old.clone();
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
            success_status(
                info,
                &name,
                obj["metadata"]["uid"].as_str().unwrap_or_default(),
            ),
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
                return Ok(Write::Unchanged(Value::Null));
            };
            let refs = cur["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !refs.iter().any(|r| r["uid"] == json!(uid)) {
                return Ok(Write::Unchanged(cur.clone()));
            }
            let mut new = cur.clone();
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

fn drop_crd(st: &AppState, crd: &Value) {
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

fn delete_collection(st: &AppState, req: &Req, t: &Target) -> Result<Answer> {
    let (policy, options) = delete_options(req)?;
    let (labels, fields) = selectors(req)?;
    let (items, _) = st
        .store
        .list(&t.info.group, &t.info.resource, t.namespace.as_deref());
    let dry = req.q("dryRun") == Some("All");
    let mut deleted = Vec::new();
    for (key, obj) in items
        .into_iter()
        .filter(|(_, o)| labels.matches(o) && fields.matches(o))
    {
        match delete_one(st, &t.info, &key, policy, &options, dry) {
            Ok(_) | Err(ApiError { code: 404, .. }) => deleted.push(served(&t.info, obj)),
            Err(e) => return Err(e),
        }
    }
    let rv = st.store.current_rv().to_string();
    Ok((
        200,
        json!({"kind": format!("{}List", t.info.kind), "apiVersion": t.info.api_version(), "metadata": {"resourceVersion": rv}, "items": deleted}),
        vec![],
    ))
}

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
                        return Ok(Write::Unchanged(Value::Null));
                    };
                    if !foreground_deleting(cur) {
                        return Ok(Write::Unchanged(cur.clone()));
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
                    let mut new = cur.clone();
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

fn watch_event(kind: &str, object: Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(st: Arc<AppState>, req: &Req, t: Target) -> Response {
    let (labels, fields) = match selectors(req) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let from = match req
        .q("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0")
    {
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version: {s}"
                )));
            }
        },
        None => None,
    };
    let table = req.wants_table();
    let metadata_only = req.wants_metadata();
    let include = IncludeObject::parse(req.q("includeObject"));
    let bookmarks = req.flag("allowWatchBookmarks");
    let initial_end = req.flag("sendInitialEvents");
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let info = t.info.clone();
    let render = move |kind: EventType, obj: Value| -> Option<Bytes> {
        let obj = served(&info, obj);
        if !(labels.matches(&obj) && fields.matches(&obj)) {
            return None;
        }
        let obj = if table {
            table::table(&info, &[obj], include, json!({}))
        } else if metadata_only {
            partial(&obj)
        } else {
            obj
        };
        Some(watch_event(kind.as_str(), obj))
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = st.store.watch(
        &t.info.group,
        &t.info.resource,
        t.namespace.as_deref(),
        from,
    );
    let mut closer = st.faults.closer();
    let info = t.info.clone();
    tokio::spawn(async move {
        let start = match start {
            Ok(s) => s,
            Err(floor) => {
                let e = ApiError::expired(format!(
                    "too old resource version: {} ({floor})",
                    from.unwrap_or_default()
                ));
                let _ = tx.send(watch_event("ERROR", e.to_status())).await;
                return;
            }
        };
        for obj in start.current {
            if let Some(b) = render(EventType::Added, obj)
                && tx.send(b).await.is_err()
            {
                return;
            }
        }
        if initial_end {
            let bm = json!({"kind": info.kind, "apiVersion": info.api_version(),
                "metadata": {"resourceVersion": start.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx.send(watch_event("BOOKMARK", bm)).await.is_err() {
                return;
            }
        }
        for ev in start.backlog {
            if let Some(b) = render(ev.kind, ev.object.clone())
                && tx.send(b).await.is_err()
            {
                return;
            }
        }
        // Everything up to the start version has been sent (backlog) or reported (current).
        let mut seen = start.rv;
        let mut live = start.live;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(st.bookmark_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= seen || ev.key.group != info.group || ev.key.resource != info.resource {
                            continue;
                        }
                        seen = ev.rv;
                        if t.namespace.as_deref().is_some_and(|ns| ns != ev.key.namespace) {
                            continue;
                        }
                        if let Some(b) = render(ev.kind, ev.object.clone()) && tx.send(b).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": {"resourceVersion": seen.to_string()}});
                    if tx.send(watch_event("BOOKMARK", bm)).await.is_err() {
                        return;
                    }
                }
                _ = closer.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
