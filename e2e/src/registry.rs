//! The kinds the server serves: built-ins the operator touches plus every established CRD.
//! Discovery, OpenAPI and routing all read this one table.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};

/// Where a kind's `/scale` subresource reads and writes replicas.
#[derive(Debug, Clone)]
pub struct ScalePaths {
    /// e.g. `.spec.replicas`
    pub spec_replicas: String,
    /// e.g. `.status.replicas`
    pub status_replicas: String,
    /// e.g. `.status.selector`; `None` when the kind has none.
    pub label_selector: Option<String>,
}

/// A printer column of a CRD (`additionalPrinterColumns`).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean`, `date`.
    pub type_: String,
    /// Optional format.
    pub format: String,
    /// Column description.
    pub description: String,
    /// 0 = shown by default; >0 only with `-o wide`.
    pub priority: i64,
    /// Simple JSONPath into the object.
    pub json_path: String,
}

/// The CRD version's schema and columns, for validation, OpenAPI and tables.
#[derive(Debug, Clone)]
pub struct CrdVersion {
    /// `openAPIV3Schema` as JSON.
    pub schema: Value,
    /// The schema compiled for admission, on first use (a CRD is re-registered on every
    /// write to it; compiling only when an object is admitted keeps that cheap).
    pub compiled: std::sync::OnceLock<Result<Arc<crate::schema::Compiled>, String>>,
    /// `additionalPrinterColumns`.
    pub columns: Vec<PrinterColumn>,
}

/// One served resource (group/version/resource) and how it behaves.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    /// API group, `""` for core.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Plural resource name.
    pub resource: String,
    /// Kind.
    pub kind: String,
    /// Singular name.
    pub singular: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// `kubectl` short names.
    pub short_names: Vec<String>,
    /// Categories such as `all`.
    pub categories: Vec<String>,
    /// Whether the `status` subresource is enabled (status ignored on the main resource).
    pub status: bool,
    /// The `scale` subresource, when enabled.
    pub scale: Option<ScalePaths>,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
    /// Schema and columns when this is a custom resource.
    pub crd: Option<Arc<CrdVersion>>,
}

impl ResourceInfo {
    /// `pods` or `llmdeployments.whaleflux.io`, as in apiserver messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// `v1` or `whaleflux.io/v1alpha1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The discovery entry (`APIResource`) plus its subresources.
    pub fn discovery_entries(&self) -> Vec<Value> {
        let verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        let mut main = json!({
            "name": self.resource,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.resource),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.group.is_empty() && self.resource == "pods" {
            out.push(json!({
                "name": "pods/log",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get"],
            }));
            out.push(json!({
                "name": "pods/eviction",
                "singularName": "",
                "namespaced": true,
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "verbs": ["create"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.resource),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

impl ResourceInfo {
    /// The aggregated discovery entry (`apidiscovery.k8s.io/v2` `APIResourceDiscovery`).
    pub fn aggregated_entry(&self) -> Value {
        let kind = |g: &str, v: &str, k: &str| json!({"group": g, "version": v, "kind": k});
        let mut subresources = Vec::new();
        if self.status {
            subresources.push(json!({"subresource": "status", "responseKind": kind(&self.group, &self.version, &self.kind),
                "verbs": ["get", "patch", "update"]}));
        }
        if self.scale.is_some() {
            subresources.push(
                json!({"subresource": "scale", "responseKind": kind("autoscaling", "v1", "Scale"),
                "verbs": ["get", "patch", "update"]}),
            );
        }
        if self.group.is_empty() && self.resource == "pods" {
            subresources.push(json!({"subresource": "log", "responseKind": kind("", "", "Pod"), "verbs": ["get"]}));
            subresources.push(json!({"subresource": "eviction", "responseKind": kind("policy", "v1", "Eviction"), "verbs": ["create"]}));
        }
        let mut entry = json!({
            "resource": self.resource,
            "responseKind": kind(&self.group, &self.version, &self.kind),
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            entry["categories"] = json!(self.categories);
        }
        if !subresources.is_empty() {
            entry["subresources"] = Value::Array(subresources);
        }
        entry
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    resource: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    generation: bool,
) -> ResourceInfo {
    ResourceInfo {
        group: group.into(),
        version: version.into(),
        resource: resource.into(),
        kind: kind.into(),
        singular: kind.to_ascii_lowercase(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        status,
        scale: None,
        generation,
        crd: None,
    }
}

/// The built-in kinds this server serves.
pub fn builtins() -> Vec<ResourceInfo> {
    let mut sts = builtin(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
        true,
        true,
    );
    sts.scale = Some(ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: ".status.replicas".into(),
        label_selector: None,
    });
    sts.categories = vec!["all".into()];
    let mut deploy = builtin(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
        true,
    );
    deploy.scale = sts.scale.clone();
    deploy.categories = vec!["all".into()];
    let rbac = |resource: &str, kind: &str, namespaced: bool| {
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            resource,
            kind,
            namespaced,
            &[],
            false,
            false,
        )
    };
    let mut pods = builtin("", "v1", "pods", "Pod", true, &["po"], true, true);
    pods.categories = vec!["all".into()];
    let mut svc = builtin("", "v1", "services", "Service", true, &["svc"], true, false);
    svc.categories = vec!["all".into()];
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin("", "v1", "nodes", "Node", false, &["no"], true, false),
        pods,
        svc,
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin("", "v1", "secrets", "Secret", true, &[], false, false),
        builtin("", "v1", "events", "Event", true, &["ev"], false, false),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
        ),
        sts,
        deploy,
        rbac("clusterroles", "ClusterRole", false),
        rbac("clusterrolebindings", "ClusterRoleBinding", false),
        rbac("roles", "Role", true),
        rbac("rolebindings", "RoleBinding", true),
        builtin(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
            false,
            true,
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            true,
            true,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            true,
        ),
    ]
}

/// What a CRD object fails to describe, as a message for an `Invalid` status.
pub fn infos_from_crd(crd: &Value) -> Result<Vec<ResourceInfo>, String> {
    let spec = &crd["spec"];
    let group = spec["group"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("spec.group: Required value")?;
    let names = &spec["names"];
    let plural = names["plural"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("spec.names.plural: Required value")?;
    let kind = names["kind"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("spec.names.kind: Required value")?;
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        return Err(format!(
            "metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})"
        ));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
    };
    let versions = spec["versions"]
        .as_array()
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions: Required value")?;
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for v in versions {
        if v["served"].as_bool() == Some(false) {
            continue;
        }
        let version = v["name"]
            .as_str()
            .ok_or("spec.versions[].name: Required value")?;
        let schema = v["schema"]["openAPIV3Schema"].clone();
        if !schema.is_object() {
            return Err(format!(
                "spec.versions[{version}].schema.openAPIV3Schema: Required value"
            ));
        }
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c["name"].as_str().unwrap_or_default().to_string(),
                        type_: c["type"].as_str().unwrap_or("string").to_string(),
                        format: c["format"].as_str().unwrap_or_default().to_string(),
                        description: c["description"].as_str().unwrap_or_default().to_string(),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sub = &v["subresources"];
        let scale = sub
            .get("scale")
            .filter(|s| s.is_object())
            .map(|s| ScalePaths {
                spec_replicas: s["specReplicasPath"]
                    .as_str()
                    .unwrap_or(".spec.replicas")
                    .to_string(),
                status_replicas: s["statusReplicasPath"]
                    .as_str()
                    .unwrap_or(".status.replicas")
                    .to_string(),
                label_selector: s["labelSelectorPath"].as_str().map(String::from),
            });
        out.push(ResourceInfo {
            group: group.to_string(),
            version: version.to_string(),
            resource: plural.to_string(),
            kind: kind.to_string(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_ascii_lowercase()),
            namespaced,
            short_names: strs(&names["shortNames"]),
            categories: strs(&names["categories"]),
            status: sub.get("status").is_some_and(|s| s.is_object()),
            scale,
            generation: true,
            crd: Some(Arc::new(CrdVersion {
                schema,
                columns,
                compiled: std::sync::OnceLock::new(),
            })),
        });
    }
    Ok(out)
}

/// The live table of served resources, keyed by (group, version, plural).
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<BTreeMap<(String, String, String), Arc<ResourceInfo>>>,
}

impl Registry {
    /// A registry holding the built-ins.
    pub fn with_builtins() -> Self {
        let r = Self::default();
        for info in builtins() {
            r.insert(info);
        }
        r
    }

    fn insert(&self, info: ResourceInfo) {
        let key = (
            info.group.clone(),
            info.version.clone(),
            info.resource.clone(),
        );
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::new(info));
    }

    /// Serve (or re-serve) a CRD's versions.
    pub fn register_crd(&self, infos: Vec<ResourceInfo>) {
        // A version whose schema did not change keeps its compiled schema.
        let infos: Vec<ResourceInfo> = infos
            .into_iter()
            .map(|mut i| {
                if let (Some(old), Some(new)) = (
                    self.get(&i.group, &i.version, &i.resource)
                        .and_then(|o| o.crd.clone()),
                    i.crd.as_ref(),
                ) && old.schema == new.schema
                    && old.columns.len() == new.columns.len()
                {
                    let columns = new.columns.clone();
                    i.crd = Some(Arc::new(CrdVersion {
                        schema: old.schema.clone(),
                        columns,
                        compiled: old.compiled.clone(),
                    }));
                }
                i
            })
            .collect();
        if let Some(first) = infos.first() {
            self.unregister(&first.group, &first.resource);
        }
        for i in infos {
            self.insert(i);
        }
    }

    /// Stop serving every version of group/resource.
    pub fn unregister(&self, group: &str, resource: &str) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(g, _, r), _| !(g == group && r == resource));
    }

    /// Look up a served resource.
    pub fn get(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceInfo>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(group.to_string(), version.to_string(), resource.to_string()))
            .cloned()
    }

    /// All served resources, sorted by group, version, resource.
    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether `version` of `group` is served.
    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.all()
            .iter()
            .any(|i| i.group == group && i.version == version)
    }
}
