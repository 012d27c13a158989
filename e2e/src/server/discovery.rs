//! Discovery: `/version`, `/api`, `/apis` (legacy and aggregated v2) and per group/version
//! resource lists, all read from the registry.

use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Result, json_response};
use crate::error::ApiError;
use crate::registry::Registry;

/// Aggregated discovery (`apidiscovery.k8s.io/v2`) of the core group (`/api`) or of every
/// other group (`/apis`), as kubectl 1.32 and kube-rs ask for first.
pub(super) fn aggregated_discovery(reg: &Registry, core: bool) -> Response {
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

pub(super) fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-whaleflux-e2e", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"})
}

pub(super) fn group_list(reg: &Registry) -> Value {
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

pub(super) fn group(reg: &Registry, g: &str) -> Result<Value> {
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

pub(super) fn resource_list(reg: &Registry, g: &str, v: &str) -> Value {
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
