//! `as=Table` responses: the CRD's printer columns (evaluated JSONPaths) or a few default
//! columns for built-ins, so `kubectl get` prints what it prints against a cluster.

use serde_json::{Value, json};

use crate::registry::{PrinterColumn, ResourceInfo};

/// Evaluate the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.k=="v")].b`, optionally wrapped in `{}`.
pub fn json_path(obj: &Value, path: &str) -> Vec<Value> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(p);
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut cur = vec![obj.clone()];
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            cur = cur.iter().filter_map(|v| v.get(field).cloned()).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let sel = &r[..end];
            rest = &r[end + 1..];
            cur = cur
                .iter()
                .flat_map(|v| {
                    let items = v.as_array().cloned().unwrap_or_default();
                    if sel == "*" {
                        items
                    } else if let Ok(i) = sel.parse::<usize>() {
                        items.get(i).cloned().into_iter().collect()
                    } else if let Some(filter) =
                        sel.strip_prefix("?(@.").and_then(|s| s.strip_suffix(')'))
                    {
                        let (k, want) = match filter.split_once("==") {
                            Some((k, w)) => (
                                k.trim(),
                                Some(w.trim().trim_matches(['"', '\'']).to_string()),
                            ),
                            None => (filter.trim(), None),
                        };
                        items
                            .into_iter()
                            .filter(|item| {
                                let got = item.get(k);
                                match &want {
                                    Some(w) => got.is_some_and(|g| {
                                        g.as_str()
                                            .map(String::from)
                                            .unwrap_or_else(|| g.to_string())
                                            == *w
                                    }),
                                    None => got.is_some(),
                                }
                            })
                            .collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect();
        } else {
            return Vec::new();
        }
    }
    cur
}

/// kube's `duration.HumanDuration` of the time since an RFC 3339 timestamp.
pub fn age(timestamp: &str) -> String {
    let Ok(t) = timestamp.parse::<jiff::Timestamp>() else {
        return "<invalid>".into();
    };
    let secs = jiff::Timestamp::now().as_second() - t.as_second();
    human_duration(secs)
}

/// Seconds as kubectl prints ages (`5s`, `3m2s`, `4h`, `2d3h`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else {
        format!("{}y", h / 24 / 365)
    }
}

fn cell(type_: &str, values: &[Value]) -> Value {
    let Some(first) = values.first() else {
        return Value::Null;
    };
    match type_ {
        "date" => first
            .as_str()
            .map(age)
            .map(Value::String)
            .unwrap_or(Value::Null),
        "integer" | "number" | "boolean" => first.clone(),
        _ => {
            let parts: Vec<String> = values
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect();
            Value::String(parts.join(","))
        }
    }
}

fn col(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: format.into(),
        description: description.into(),
        priority,
        json_path: String::new(),
    }
}

fn columns(info: &ResourceInfo) -> Vec<PrinterColumn> {
    let name = col(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
        0,
    );
    let age = PrinterColumn {
        json_path: ".metadata.creationTimestamp".into(),
        ..col("Age", "date", "", "CreationTimestamp", 0)
    };
    let path = |mut c: PrinterColumn, p: &str| {
        c.json_path = p.into();
        c
    };
    let mut cols = vec![name];
    match (&info.crd, info.group.as_str(), info.resource.as_str()) {
        (Some(crd), _, _) => {
            if crd.columns.is_empty() {
                cols.push(age);
            } else {
                cols.extend(crd.columns.iter().cloned());
            }
        }
        (None, "", "pods") => {
            cols.push(col(
                "Ready",
                "string",
                "",
                "ready containers / containers",
                0,
            ));
            cols.push(path(
                col("Status", "string", "", "pod phase", 0),
                ".status.phase",
            ));
            cols.push(col("Restarts", "string", "", "container restarts", 0));
            cols.push(age);
            cols.push(path(col("IP", "string", "", "pod IP", 1), ".status.podIP"));
            cols.push(path(
                col("Node", "string", "", "node name", 1),
                ".spec.nodeName",
            ));
        }
        (None, "", "nodes") => {
            cols.push(col("Status", "string", "", "Ready condition", 0));
            cols.push(age);
        }
        (None, "", "namespaces") => {
            cols.push(path(
                col("Status", "string", "", "phase", 0),
                ".status.phase",
            ));
            cols.push(age);
        }
        (None, "", "services") => {
            cols.push(path(
                col("Type", "string", "", "service type", 0),
                ".spec.type",
            ));
            cols.push(path(
                col("Cluster-IP", "string", "", "cluster IP", 0),
                ".spec.clusterIP",
            ));
            cols.push(age);
        }
        (None, "apps", "statefulsets" | "deployments") => {
            cols.push(col("Ready", "string", "", "ready replicas / replicas", 0));
            cols.push(age);
        }
        (None, "apiextensions.k8s.io", _) => {
            cols.push(path(
                col("Created At", "date", "", "creation time", 0),
                ".metadata.creationTimestamp",
            ));
        }
        _ => cols.push(age),
    }
    cols
}

fn computed(info: &ResourceInfo, column: &str, obj: &Value) -> Option<Value> {
    match (info.resource.as_str(), column) {
        ("pods", "Ready") => {
            let total = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = obj["status"]["containerStatuses"]
                .as_array()
                .map_or(0, |s| {
                    s.iter().filter(|c| c["ready"] == json!(true)).count()
                });
            Some(json!(format!("{ready}/{total}")))
        }
        ("pods", "Restarts") => {
            let n: i64 = obj["status"]["containerStatuses"]
                .as_array()
                .map_or(0, |s| {
                    s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
                });
            Some(json!(n.to_string()))
        }
        ("nodes", "Status") => {
            let ready = json_path(obj, r#".status.conditions[?(@.type=="Ready")].status"#);
            Some(json!(if ready.first() == Some(&json!("True")) {
                "Ready"
            } else {
                "NotReady"
            }))
        }
        ("statefulsets" | "deployments", "Ready") => Some(json!(format!(
            "{}/{}",
            obj["status"]["readyReplicas"].as_i64().unwrap_or(0),
            obj["spec"]["replicas"].as_i64().unwrap_or(1)
        ))),
        ("customresourcedefinitions", "Created At") => {
            obj["metadata"]["creationTimestamp"].clone().into()
        }
        _ => None,
    }
}

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// From the `includeObject` query parameter.
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// A `meta.k8s.io/v1` Table of `objects`.
pub fn table<O: std::ops::Deref<Target = Value>>(
    info: &ResourceInfo,
    objects: &[O],
    include: IncludeObject,
    list_meta: Value,
) -> Value {
    let cols = columns(info);
    let definitions: Vec<Value> = cols
        .iter()
        .map(|c| json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority}))
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let obj: &Value = obj;
            let cells: Vec<Value> = cols
                .iter()
                .map(|c| {
                    if c.name == "Name" && c.format == "name" {
                        return obj["metadata"]["name"].clone();
                    }
                    if let Some(v) = computed(info, &c.name, obj) {
                        return if c.type_ == "date" { cell("date", &[v]) } else { v };
                    }
                    cell(&c.type_, &json_path(obj, &c.json_path))
                })
                .collect();
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]});
                }
                IncludeObject::Object => row["object"] = obj.clone(),
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "columnDefinitions": definitions, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset() {
        let obj = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"n": 3}});
        assert_eq!(json_path(&obj, ".spec.n"), vec![json!(3)]);
        assert_eq!(
            json_path(&obj, r#".status.conditions[?(@.type=="Ready")].status"#),
            vec![json!("True")]
        );
        assert_eq!(
            json_path(&obj, ".status.conditions[*].type"),
            vec![json!("A"), json!("Ready")]
        );
        assert_eq!(
            json_path(&obj, "{.status.conditions[0].type}"),
            vec![json!("A")]
        );
        assert!(json_path(&obj, ".spec.missing").is_empty());
    }

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }
}
