//! Request bodies in Kubernetes protobuf (`application/vnd.kubernetes.protobuf`), as client-go's
//! typed clients send them (Helm's release storage, `kubectl create configmap|secret|namespace`).
//!
//! The wire format is the `k8s\0` magic followed by a `runtime.Unknown` envelope whose `raw`
//! bytes are the object's message; `k8s-pb` has the message types. The store keeps JSON, so each
//! decoded message is turned into the object's JSON form (the same field names and shapes
//! kube-apiserver's JSON serializer writes). Only the kinds typed clients send in practice are
//! converted; any other kind is a 415 naming the kinds accepted, so a test learns at once what
//! it needs rather than storing a half-converted object.

use base64::Engine;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The four bytes every Kubernetes protobuf body starts with.
const MAGIC: &[u8] = b"k8s\0";

/// Kinds whose protobuf bodies this server converts.
pub const ACCEPTED: &[&str] = &[
    "meta.k8s.io/v1/DeleteOptions",
    "v1/ConfigMap",
    "v1/Secret",
    "v1/Namespace",
    "v1/ServiceAccount",
];

/// Decodes a protobuf request body into the object's JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        ApiError::bad_request("protobuf body does not start with the Kubernetes magic k8s\\0")
    })?;
    let unknown = Unknown::decode(rest)
        .map_err(|e| ApiError::bad_request(format!("error decoding protobuf envelope: {e}")))?;
    if unknown
        .content_encoding
        .as_deref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(ApiError::bad_request(
            "protobuf envelope: contentEncoding is not supported",
        ));
    }
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let bad = |e: prost::DecodeError| {
        ApiError::bad_request(format!("error decoding protobuf {api_version} {kind}: {e}"))
    };
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => config_map(core::ConfigMap::decode(raw.as_slice()).map_err(bad)?),
        ("v1", "Secret") => secret(core::Secret::decode(raw.as_slice()).map_err(bad)?),
        ("v1", "Namespace") => namespace(core::Namespace::decode(raw.as_slice()).map_err(bad)?),
        ("v1" | "meta.k8s.io/v1", "DeleteOptions") => {
            delete_options(meta::DeleteOptions::decode(raw.as_slice()).map_err(bad)?)
        }
        ("v1", "ServiceAccount") => {
            service_account(core::ServiceAccount::decode(raw.as_slice()).map_err(bad)?)
        }
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "this test API server decodes protobuf only for {}; send {api_version} {kind} as application/json",
                    ACCEPTED.join(", ")
                ),
            ));
        }
    };
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

/// Inserts `v` under `key` unless it is null, an empty string, object or array: Go's protobuf
/// encoder writes non-pointer fields even when empty, and its JSON encoder omits them
/// (`omitempty`).
fn put(obj: &mut Map<String, Value>, key: &str, v: Value) {
    let empty = match &v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if !empty {
        obj.insert(key.into(), v);
    }
}

fn opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Null, Into::into)
}

fn strings<I: IntoIterator<Item = (String, String)>>(m: I) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

fn bytes_map<I: IntoIterator<Item = (String, Vec<u8>)>>(m: I) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Object(
        m.into_iter()
            .map(|(k, v)| (k, Value::String(b64.encode(v))))
            .collect(),
    )
}

/// RFC 3339 in UTC with second precision, as `metav1.Time` marshals.
fn time(t: Option<meta::Time>) -> Value {
    let Some(secs) = t.and_then(|t| t.seconds) else {
        return Value::Null;
    };
    jiff::Timestamp::from_second(secs)
        .map(|ts| Value::String(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
        .unwrap_or(Value::Null)
}

fn object_meta(m: Option<meta::ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut o = Map::new();
    put(&mut o, "name", opt(m.name));
    put(&mut o, "generateName", opt(m.generate_name));
    put(&mut o, "namespace", opt(m.namespace));
    put(&mut o, "uid", opt(m.uid));
    put(&mut o, "resourceVersion", opt(m.resource_version));
    put(&mut o, "generation", opt(m.generation.filter(|g| *g != 0)));
    put(&mut o, "creationTimestamp", time(m.creation_timestamp));
    put(&mut o, "deletionTimestamp", time(m.deletion_timestamp));
    put(
        &mut o,
        "deletionGracePeriodSeconds",
        opt(m.deletion_grace_period_seconds),
    );
    put(&mut o, "labels", strings(m.labels));
    put(&mut o, "annotations", strings(m.annotations));
    let owners = m
        .owner_references
        .into_iter()
        .map(|r| {
            let mut o = Map::new();
            put(&mut o, "apiVersion", opt(r.api_version));
            put(&mut o, "kind", opt(r.kind));
            put(&mut o, "name", opt(r.name));
            put(&mut o, "uid", opt(r.uid));
            put(&mut o, "controller", opt(r.controller));
            put(&mut o, "blockOwnerDeletion", opt(r.block_owner_deletion));
            Value::Object(o)
        })
        .collect();
    put(&mut o, "ownerReferences", Value::Array(owners));
    put(&mut o, "finalizers", json!(m.finalizers));
    // managedFields are the server's to write; a client's are dropped as on a create.
    Value::Object(o)
}

fn config_map(c: core::ConfigMap) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "metadata", object_meta(c.metadata));
    put(&mut o, "data", strings(c.data));
    put(&mut o, "binaryData", bytes_map(c.binary_data));
    put(&mut o, "immutable", opt(c.immutable));
    o
}

fn secret(s: core::Secret) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "metadata", object_meta(s.metadata));
    put(&mut o, "data", bytes_map(s.data));
    put(&mut o, "stringData", strings(s.string_data));
    put(&mut o, "type", opt(s.r#type));
    put(&mut o, "immutable", opt(s.immutable));
    o
}

fn namespace(n: core::Namespace) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "metadata", object_meta(n.metadata));
    let finalizers = n.spec.map(|s| s.finalizers).unwrap_or_default();
    let mut spec = Map::new();
    put(&mut spec, "finalizers", json!(finalizers));
    o.insert("spec".into(), Value::Object(spec));
    o
}

fn delete_options(d: meta::DeleteOptions) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "gracePeriodSeconds", opt(d.grace_period_seconds));
    if let Some(p) = d.preconditions {
        let mut pre = Map::new();
        put(&mut pre, "uid", opt(p.uid));
        put(&mut pre, "resourceVersion", opt(p.resource_version));
        put(&mut o, "preconditions", Value::Object(pre));
    }
    put(&mut o, "orphanDependents", opt(d.orphan_dependents));
    put(&mut o, "propagationPolicy", opt(d.propagation_policy));
    put(&mut o, "dryRun", json!(d.dry_run));
    o
}

fn service_account(s: core::ServiceAccount) -> Map<String, Value> {
    let mut o = Map::new();
    put(&mut o, "metadata", object_meta(s.metadata));
    let secrets = s
        .secrets
        .into_iter()
        .map(|r| {
            let mut o = Map::new();
            put(&mut o, "kind", opt(r.kind));
            put(&mut o, "namespace", opt(r.namespace));
            put(&mut o, "name", opt(r.name));
            put(&mut o, "uid", opt(r.uid));
            put(&mut o, "apiVersion", opt(r.api_version));
            Value::Object(o)
        })
        .collect();
    put(&mut o, "secrets", Value::Array(secrets));
    let pulls = s
        .image_pull_secrets
        .into_iter()
        .map(|r| json!({"name": r.name.unwrap_or_default()}))
        .collect();
    put(&mut o, "imagePullSecrets", Value::Array(pulls));
    put(
        &mut o,
        "automountServiceAccountToken",
        opt(s.automount_service_account_token),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    #[test]
    fn a_secret_becomes_its_json_form() {
        let s = core::Secret {
            metadata: Some(meta::ObjectMeta {
                name: Some("sh.helm.release.v1.demo.v1".into()),
                namespace: Some("default".into()),
                labels: BTreeMap::from([("owner".into(), "helm".into())]),
                creation_timestamp: Some(meta::Time {
                    seconds: Some(0),
                    nanos: Some(0),
                }),
                ..Default::default()
            }),
            data: BTreeMap::from([("release".into(), b"\x00\xffhi".to_vec())]),
            r#type: Some("helm.sh/release.v1".into()),
            ..Default::default()
        };
        let v = decode(&envelope("v1", "Secret", s.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "sh.helm.release.v1.demo.v1", "namespace": "default",
                    "labels": {"owner": "helm"}, "creationTimestamp": "1970-01-01T00:00:00Z"},
                "data": {"release": "AP9oaQ=="},
                "type": "helm.sh/release.v1",
            })
        );
    }

    #[test]
    fn config_maps_namespaces_and_service_accounts_convert() {
        let cm = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                name: Some("c".into()),
                ..Default::default()
            }),
            data: BTreeMap::from([("k".into(), "v".into())]),
            ..Default::default()
        };
        let v = decode(&envelope("v1", "ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(v["data"], json!({"k": "v"}));
        assert_eq!(v["metadata"], json!({"name": "c"}));
        let ns = core::Namespace {
            metadata: Some(meta::ObjectMeta {
                name: Some("team".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = decode(&envelope("v1", "Namespace", ns.encode_to_vec())).unwrap();
        assert_eq!(v["metadata"]["name"], "team");
        let sa = core::ServiceAccount {
            metadata: Some(meta::ObjectMeta {
                name: Some("op".into()),
                ..Default::default()
            }),
            automount_service_account_token: Some(false),
            ..Default::default()
        };
        let v = decode(&envelope("v1", "ServiceAccount", sa.encode_to_vec())).unwrap();
        assert_eq!(v["automountServiceAccountToken"], false);
        let del = meta::DeleteOptions {
            propagation_policy: Some("Foreground".into()),
            preconditions: Some(meta::Preconditions {
                uid: Some("u-1".into()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let v = decode(&envelope(
            "meta.k8s.io/v1",
            "DeleteOptions",
            del.encode_to_vec(),
        ))
        .unwrap();
        assert_eq!(v["propagationPolicy"], "Foreground");
        assert_eq!(v["preconditions"], json!({"uid": "u-1"}));
    }

    #[test]
    fn other_kinds_and_bad_bytes_are_refused_with_a_reason() {
        let e = decode(&envelope("apps/v1", "Deployment", vec![])).unwrap_err();
        assert_eq!(e.code, 415);
        assert!(e.message.contains("v1/Secret"), "{}", e.message);
        assert!(e.message.contains("apps/v1 Deployment"), "{}", e.message);
        let e = decode(b"{\"json\": true}").unwrap_err();
        assert_eq!(e.code, 400);
        let e = decode(&envelope("v1", "Secret", vec![0xff, 0xff, 0xff])).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("v1 Secret"), "{}", e.message);
    }
}
