//! The HTTP layer: routing kube-style paths to the store. One fallback handler parses the path
//! itself, because Kubernetes paths (`/api/v1/namespaces/{ns}/pods/{name}/status`) do not fit a
//! static route table well; each verb lives in its own module.
//!
//! Requests do their expensive work (decoding, admission, patch computation, encoding) outside
//! the store's lock, on a snapshot, and commit only if the object has not moved meanwhile (else
//! they recompute): the lock is held for a map update, so one slow request never stalls the
//! others.

mod admission;
mod delete;
mod discovery;
mod evict;
mod gc;
mod patching;
mod read;
mod watch;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::faults::{Audit, AuditEvent, FaultAction, Faults};
use crate::openapi;
use crate::registry::{Registry, ResourceInfo};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Key, Store};

pub use gc::{collect_garbage, collect_garbage_after};

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

/// User names of service accounts: `system:serviceaccount:<namespace>:<name>`.
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

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

fn json_response(code: u16, body: &impl serde::Serialize, warnings: &[String]) -> Response {
    // Serializing a Value (or our list wrappers) into a Vec cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
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
        // The process kubelet hands each pod a kubeconfig whose token is its service account's
        // user name (see `kubelet::service_account_kubeconfig`): taken at its word, like basic
        // auth, so the audit log shows a chart's operator as its service account.
        if token.trim().starts_with(SERVICE_ACCOUNT_PREFIX) {
            return Ok(token.trim().to_string());
        }
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
        ["version"] => Some(Ok(discovery::version())),
        ["healthz" | "livez" | "readyz"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return r;
        }
        ["api"] | ["apis"] if req.wants_aggregated_discovery() && req.method == Method::GET => {
            return discovery::aggregated_discovery(&st.registry, segs[0] == "api");
        }
        ["api"] => Some(Ok(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": st.address}]}))),
        ["apis"] => Some(Ok(discovery::group_list(&st.registry))),
        ["api", "v1"] => Some(Ok(discovery::resource_list(&st.registry, "", "v1"))),
        ["apis", g] => Some(discovery::group(&st.registry, g)),
        ["apis", g, v] if st.registry.has_group_version(g, v) => {
            Some(Ok(discovery::resource_list(&st.registry, g, v)))
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
        "get" if target.sub == "log" => return read::pod_log(st, req, &target),
        "get" => read::get(st, req, &target),
        "list" => return read::list(st, req, &target).unwrap_or_else(|e| error_response(&e)),
        "watch" => return watch::watch(st.clone(), req, target),
        "create" if target.sub == "eviction" => evict::evict(st, req, &target),
        "create" if target.name.is_none() => write::create(st, req, &target),
        "update" if target.name.is_some() => write::update(st, req, &target),
        "patch" if target.name.is_some() => patching::patch_object(st, req, &target),
        "delete" => delete::delete(st, req, &target),
        "deletecollection" => delete::delete_collection(st, req, &target),
        _ => Err(ApiError::method_not_allowed()),
    };
    match result {
        Ok((code, body, warnings)) => json_response(code, &*body, &warnings),
        Err(e) => error_response(&e),
    }
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
        "log" | "eviction" => info.group.is_empty() && info.resource == "pods",
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

/// Serve an object at the requested version (no schema conversion between versions). Objects
/// stored at that version are shared as they are, not copied.
fn served(info: &ResourceInfo, obj: Arc<Value>) -> Arc<Value> {
    let api_version = info.api_version();
    if obj["apiVersion"].as_str() == Some(api_version.as_str())
        && obj["kind"].as_str() == Some(info.kind.as_str())
    {
        return obj;
    }
    let mut v = Arc::unwrap_or_clone(obj);
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(info.kind);
    Arc::new(v)
}

/// A verb's answer: status code, body, `Warning` headers.
type Answer = (u16, Arc<Value>, Vec<String>);
fn selectors(req: &Req) -> Result<(LabelSelector, FieldSelector)> {
    Ok((
        LabelSelector::parse(req.q("labelSelector").unwrap_or_default())?,
        FieldSelector::parse(req.q("fieldSelector").unwrap_or_default())?,
    ))
}
