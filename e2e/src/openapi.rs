//! OpenAPI v3 as kubectl reads it: the `/openapi/v3` index and one document per group-version.
//! Custom resources get their CRD schema (for `kubectl explain`); built-ins get a permissive
//! object schema. Every resource path advertises the `fieldValidation` parameter on PATCH, so
//! kubectl validates through the server (`fieldValidation=Strict`) instead of downloading the
//! protobuf-only OpenAPI v2.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde_json::{Map, Value, json};

use crate::registry::ResourceInfo;

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// `apis/whaleflux.io/v1alpha1` or `api/v1`.
pub fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The schema name, e.g. `io.whaleflux.v1alpha1.LlmDeployment` or `io.k8s.api.core.v1.Pod`.
pub fn schema_name(info: &ResourceInfo) -> String {
    let prefix = match info.group.as_str() {
        _ if info.crd.is_some() => info.group.split('.').rev().collect::<Vec<_>>().join("."),
        "" => "io.k8s.api.core".to_string(),
        "apiextensions.k8s.io" => {
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions".to_string()
        }
        g => format!("io.k8s.api.{}", g.split('.').next().unwrap_or(g)),
    };
    format!("{prefix}.{}.{}", info.version, info.kind)
}

fn gvk(info: &ResourceInfo, kind: &str) -> Value {
    json!({"group": info.group, "version": info.version, "kind": kind})
}

fn resource_schema(info: &ResourceInfo) -> Value {
    let meta = json!({"allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}], "default": {},
        "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"});
    let mut schema = match &info.crd {
        Some(crd) => crd.schema.clone(),
        None => {
            json!({"type": "object", "description": format!("{} (schema not modelled by the e2e API server)", info.kind),
            "x-kubernetes-preserve-unknown-fields": true})
        }
    };
    if let Some(m) = schema.as_object_mut() {
        let props = m.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            p.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
            p.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
            p.insert("metadata".into(), meta);
        }
        m.insert(
            "x-kubernetes-group-version-kind".into(),
            json!([gvk(info, &info.kind)]),
        );
    }
    schema
}

fn operation(info: &ResourceInfo, action: &str, kind: &str) -> Value {
    let mut op = json!({
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(info, kind),
        "parameters": [],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(info))}}}}},
    });
    if matches!(action, "patch" | "put" | "post") {
        op["parameters"] = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
    }
    if action == "patch" {
        if let Some(p) = op["parameters"].as_array_mut() {
            p.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}));
        }
        let body = json!({"schema": {"type": "object"}});
        op["requestBody"] = json!({"content": {
            "application/apply-patch+yaml": body, "application/json-patch+json": body, "application/merge-patch+json": body}});
    }
    op
}

/// The OpenAPI v3 document of one group-version.
pub fn gv_document(infos: &[&ResourceInfo]) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(
        OBJECT_META.into(),
        json!({"type": "object", "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": {"name": {"type": "string", "description": "Name must be unique within a namespace."},
                "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be unique."},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}, "description": "Map of string keys and values that can be used to organize and categorize (scope and select) objects."},
                "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""}, "description": "Annotations is an unstructured key value map stored with a resource."}}}),
    );
    for info in infos {
        let base = format!("/{}", gv_path(&info.group, &info.version));
        let coll = if info.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", info.resource)
        } else {
            format!("{base}/{}", info.resource)
        };
        let list_kind = format!("{}List", info.kind);
        paths.insert(coll.clone(), json!({"get": operation(info, "list", &info.kind), "post": operation(info, "post", &info.kind)}));
        paths.insert(
            format!("{coll}/{{name}}"),
            json!({"get": operation(info, "get", &info.kind), "put": operation(info, "put", &info.kind),
                "patch": operation(info, "patch", &info.kind), "delete": operation(info, "delete", &info.kind)}),
        );
        if info.status {
            paths.insert(format!("{coll}/{{name}}/status"), json!({"get": operation(info, "get", &info.kind), "patch": operation(info, "patch", &info.kind)}));
        }
        schemas.insert(schema_name(info), resource_schema(info));
        schemas.insert(
            format!("{}List", schema_name(info)),
            json!({"type": "object", "x-kubernetes-group-version-kind": [gvk(info, &list_kind)],
                "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{}", schema_name(info))}}}}),
        );
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": schemas}})
}

/// A stable hash of a document, for the `?hash=` in the index.
pub fn hash(doc: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.to_string().hash(&mut h);
    format!("{:016X}", h.finish())
}

/// Group-versions with their resources.
pub fn by_group_version(
    all: &[std::sync::Arc<ResourceInfo>],
) -> BTreeMap<String, Vec<&ResourceInfo>> {
    let mut m: BTreeMap<String, Vec<&ResourceInfo>> = BTreeMap::new();
    for i in all {
        m.entry(gv_path(&i.group, &i.version)).or_default().push(i);
    }
    m
}

/// The `/openapi/v3` index.
pub fn index(all: &[std::sync::Arc<ResourceInfo>]) -> Value {
    let mut paths = Map::new();
    for (gv, infos) in by_group_version(all) {
        let doc = gv_document(&infos);
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", hash(&doc))}),
        );
    }
    json!({"paths": paths})
}
