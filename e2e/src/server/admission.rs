//! What every write shares: decoding the body, checking its shape and type, the server-set
//! defaults of built-in kinds, and admission (CRD schema and CEL rules for custom resources,
//! CRD shape checks for CustomResourceDefinitions).

use axum::http::header;
use serde_json::{Value, json};

use super::{AppState, Req, Result, Target, now};
use crate::error::{ApiError, Cause};
use crate::patch::Manager;
use crate::registry::{ResourceInfo, infos_from_crd};
use crate::schema;
use crate::store::{Key, Stats};

pub(super) fn parse_body(req: &Req) -> Result<Value> {
    let ct = req.header(header::CONTENT_TYPE);
    if ct.contains("protobuf") {
        let v = crate::protobuf::decode(&req.body)?;
        check_shape(&v, false)?;
        return Ok(v);
    }
    if ct.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})"
            ),
        ));
    }
    // An apply body is YAML, and JSON is YAML: kube-rs and client-go send JSON, which the
    // JSON decoder reads far faster.
    let json_first = req.body.first() == Some(&b'{');
    let v: Value = if ct.contains("yaml") && !json_first {
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
pub(super) fn check_shape(v: &Value, builtin: bool) -> Result<()> {
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

pub(super) fn check_type(t: &Target, obj: &mut Value) -> Result<()> {
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

pub(super) fn manager_name(req: &Req) -> String {
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

pub(super) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Server-set fields for new built-in objects, as the real defaulters and allocators set them.
pub(super) fn builtin_defaults(info: &ResourceInfo, obj: &mut Value, rv: u64) {
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
        ("apps", "deployments") => {
            if obj["spec"]["replicas"].is_null() {
                obj["spec"]["replicas"] = json!(1);
            }
            if obj["spec"]["strategy"].is_null() {
                obj["spec"]["strategy"] = json!({"type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
            }
            if obj["spec"]["revisionHistoryLimit"].is_null() {
                obj["spec"]["revisionHistoryLimit"] = json!(10);
            }
            if obj["spec"]["progressDeadlineSeconds"].is_null() {
                obj["spec"]["progressDeadlineSeconds"] = json!(600);
            }
        }
        _ => {}
    }
}

/// The status a CRD gets once its names are accepted and it is established.
pub(super) fn crd_status(crd: &Value) -> Value {
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

pub(super) fn is_crd(info: &ResourceInfo) -> bool {
    info.group == "apiextensions.k8s.io" && info.resource == "customresourcedefinitions"
}

/// Per-write settings.
pub(super) struct Ctx<'a> {
    pub(super) stats: &'a Stats,
    pub(super) info: &'a ResourceInfo,
    pub(super) api_version: String,
    pub(super) manager: String,
    pub(super) strict: bool,
    pub(super) dry_run: bool,
    pub(super) sub: &'a str,
}

impl Ctx<'_> {
    pub(super) fn new<'a>(st: &'a AppState, t: &'a Target, req: &Req) -> Ctx<'a> {
        Ctx {
            stats: &st.store.stats,
            info: &t.info,
            api_version: t.info.api_version(),
            manager: manager_name(req),
            strict: req.q("fieldValidation") == Some("Strict"),
            dry_run: req.q("dryRun") == Some("All"),
            sub: &t.sub,
        }
    }
    pub(super) fn mgr<'b>(&'b self, time: &'b str) -> Manager<'b> {
        Manager {
            name: &self.manager,
            api_version: &self.api_version,
            time,
            subresource: self.sub,
            keyed: self.info.crd.is_none(),
        }
    }
}

/// The custom resource's compiled schema (compiled on the first object admitted).
fn compiled<'a>(ctx: &'a Ctx<'_>, name: &str) -> Result<&'a schema::Compiled> {
    let crd = ctx
        .info
        .crd
        .as_ref()
        .ok_or_else(|| ApiError::internal("not a custom resource"))?;
    crd.compiled
        .get_or_init(|| {
            ctx.stats
                .schema_compilations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            schema::Compiled::new(&crd.schema).map(std::sync::Arc::new)
        })
        .as_deref()
        .map_err(|m| {
            ApiError::invalid(
                ctx.info,
                name,
                &[Cause {
                    reason: "FieldValueInvalid",
                    field: String::new(),
                    message: m.clone(),
                }],
            )
        })
}

/// Admission shared by create and update: CRD schema + CEL for custom resources, CRD shape
/// checks for CustomResourceDefinitions, name validity.
pub(super) fn admit(
    ctx: &Ctx<'_>,
    obj: Value,
    old: Option<&Value>,
    name: &str,
) -> Result<(Value, Vec<String>)> {
    if ctx.info.crd.is_some() {
        let admitted = schema::admit(compiled(ctx, name)?, &obj, old, ctx.strict).map_err(|c| {
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

/// Whether two maps hold equal values for every key `skip` does not exclude (no copies).
fn equal_except(a: &Value, b: &Value, skip: impl Fn(&str) -> bool) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let mut a = a.iter().filter(|(k, _)| !skip(k));
            let mut b = b.iter().filter(|(k, _)| !skip(k));
            // Maps iterate in key order, so equal maps yield equal sequences.
            loop {
                match (a.next(), b.next()) {
                    (None, None) => return true,
                    (Some(x), Some(y)) if x == y => {}
                    _ => return false,
                }
            }
        }
        _ => a == b,
    }
}

/// Whether the parts of an object that bump `metadata.generation` are equal: everything but
/// metadata (and status, for kinds whose status is a subresource or is never spec).
pub(super) fn same_spec(info: &ResourceInfo, a: &Value, b: &Value) -> bool {
    let skip_status = info.status || info.crd.is_none();
    equal_except(a, b, |k| k == "metadata" || (skip_status && k == "status"))
}

/// Whether two versions of an object differ only in `metadata.resourceVersion`.
pub(super) fn same_but_rv(a: &Value, b: &Value) -> bool {
    equal_except(a, b, |k| k == "metadata")
        && equal_except(&a["metadata"], &b["metadata"], |k| k == "resourceVersion")
}

pub(super) fn ensure_namespace(st: &AppState, t: &Target) -> Result<()> {
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
