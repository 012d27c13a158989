//! The generated CRDs are committed, structural, and accept the examples while rejecting the
//! invalid manifests with messages that name the field and the fix.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kube::core::cel::{Validator, apply_defaults};
use serde_json::{Map, Value, json};
use whaleflux_crds::{GpuPool, LlmDeployment, manifests};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The openAPIV3Schema of a CRD as JSON.
fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("derived CRDs carry a schema");
    serde_json::to_value(schema).expect("schema serializes")
}

/// Like the apiserver's strict field validation: every object schema with `properties` rejects
/// fields it does not list. The root also allows apiVersion, kind and metadata.
fn strict(schema: &Value, root: bool) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "properties" => Value::Object(
                        v.as_object()
                            .map(|props| {
                                props
                                    .iter()
                                    .map(|(pk, pv)| (pk.clone(), strict(pv, false)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    ),
                    "items" | "additionalProperties" => strict(v, false),
                    _ => v.clone(),
                };
                out.insert(k.clone(), v);
            }
            if root {
                let props = out
                    .entry("properties")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("properties is an object");
                props.insert("apiVersion".into(), json!({"type": "string"}));
                props.insert("kind".into(), json!({"type": "string"}));
                props.insert("metadata".into(), json!({"type": "object"}));
            }
            if out.contains_key("properties")
                && !out.contains_key("additionalProperties")
                && !out.contains_key("x-kubernetes-preserve-unknown-fields")
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Validates a manifest the way the apiserver would: defaults, schema (strict), then CEL rules.
/// Returns every error as "field.path: message".
fn validate(object: &Value) -> Vec<String> {
    let crd = match object["kind"].as_str() {
        Some("LlmDeployment") => LlmDeployment::crd(),
        Some("GpuPool") => GpuPool::crd(),
        other => panic!("unexpected kind {other:?}"),
    };
    let schema = schema_of(&crd);
    let defaulted = apply_defaults(&schema, object);
    let checker = jsonschema::validator_for(&strict(&schema, true)).expect("schema compiles");
    let mut errors: Vec<String> = checker
        .iter_errors(&defaulted)
        .map(|e| {
            let path = e
                .instance_path()
                .to_string()
                .trim_start_matches('/')
                .replace('/', ".");
            format!("{path}: {e}")
        })
        .collect();
    if errors.is_empty()
        && let Err(cel) = Validator::new().validate(&schema, &defaulted, None)
    {
        errors.extend(cel.iter().map(|e| e.to_string()));
    }
    errors
}

fn load_yaml(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn committed_crds_match_the_generated_ones() {
    let dir = repo_root().join("crds/manifests");
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    assert!(
        !(update && std::env::var_os("CI").is_some()),
        "UPDATE_CRDS is set while CI is: refusing to rewrite crds/manifests (CI must compare, \
         never overwrite)"
    );
    for m in manifests::crds().expect("CRDs render") {
        let path = dir.join(m.file);
        if update {
            std::fs::write(&path, &m.yaml).expect("writing CRD");
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == m.yaml,
            "{} differs from the CRD the code generates; regenerate it with \
             `UPDATE_CRDS=1 cargo test -p whaleflux-crds --test manifests` and commit the result",
            path.display()
        );
    }
}

#[test]
fn whaleflux_crd_stream_holds_both_crds() {
    let stream = manifests::crds_yaml().expect("CRDs render");
    let names: Vec<String> = stream
        .split("---\n")
        .map(|doc| {
            let v: Value = serde_yaml::from_str(doc).expect("each document parses");
            v["metadata"]["name"].as_str().expect("named").to_string()
        })
        .collect();
    assert_eq!(
        names,
        ["llmdeployments.whaleflux.io", "gpupools.whaleflux.io"]
    );
}

/// Kubernetes rejects non-structural schemas: every node typed, no oneOf/anyOf/allOf/not with
/// types, no `$ref`.
fn assert_structural(schema: &Value, path: &str) {
    let Value::Object(map) = schema else { return };
    for forbidden in ["oneOf", "anyOf", "allOf", "not", "$ref"] {
        assert!(
            !map.contains_key(forbidden),
            "{path} uses {forbidden}, which is not structural"
        );
    }
    let typed = map.contains_key("type")
        || map.contains_key("x-kubernetes-int-or-string")
        || map.contains_key("x-kubernetes-preserve-unknown-fields");
    assert!(typed, "{path} has no type");
    if let Some(Value::Object(props)) = map.get("properties") {
        for (k, v) in props {
            assert_structural(v, &format!("{path}.{k}"));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v @ Value::Object(_)) = map.get(key) {
            assert_structural(v, &format!("{path}[{key}]"));
        }
    }
}

#[test]
fn crd_schemas_are_structural() {
    for crd in [LlmDeployment::crd(), GpuPool::crd()] {
        assert_structural(&schema_of(&crd), &crd.spec.names.kind);
    }
}

#[test]
fn llmdeployment_crd_has_columns_and_subresources() {
    let crd = LlmDeployment::crd();
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["llmd".to_string()]));
    let v = &crd.spec.versions[0];
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Model", "TP", "PP", "Replicas", "Ready", "Phase", "Age"]
    );
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");

    let pool = GpuPool::crd();
    assert_eq!(pool.spec.scope, "Cluster");
    assert_eq!(pool.spec.names.short_names, Some(vec!["gpool".to_string()]));
    let v = &pool.spec.versions[0];
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .expect("columns")
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["GPU", "Nodes", "GPUs", "Healthy", "Age"]);
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
}

#[test]
fn examples_deserialize_and_validate() {
    let files = yaml_files(&repo_root().join("examples"));
    assert!(
        files.len() >= 4,
        "expected the example manifests, found {files:?}"
    );
    let mut kinds = Vec::new();
    for path in files {
        let object = load_yaml(&path);
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "LlmDeployment" => {
                serde_json::from_value::<LlmDeployment>(object.clone())
                    .unwrap_or_else(|e| panic!("{} does not deserialize: {e}", path.display()));
            }
            "GpuPool" => {
                serde_json::from_value::<GpuPool>(object.clone())
                    .unwrap_or_else(|e| panic!("{} does not deserialize: {e}", path.display()));
            }
            other => panic!("{}: unexpected kind {other}", path.display()),
        }
        let errors = validate(&object);
        assert!(
            errors.is_empty(),
            "{} is rejected: {errors:#?}",
            path.display()
        );
        kinds.push(kind);
    }
    assert!(kinds.iter().filter(|k| *k == "LlmDeployment").count() >= 2);
    assert!(kinds.iter().filter(|k| *k == "GpuPool").count() >= 2);
}

/// Each file under tests/invalid starts with `# expect: TEXT`; validation must fail with an error
/// containing TEXT.
#[test]
fn invalid_manifests_are_rejected_with_clear_messages() {
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid"));
    assert!(
        files.len() >= 10,
        "expected the invalid manifests, found {}",
        files.len()
    );
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable");
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with `# expect: TEXT`", path.display()))
            .trim()
            .to_string();
        let errors = validate(&load_yaml(&path));
        assert!(
            errors.iter().any(|e| e.contains(&expected)),
            "{}: expected an error containing {expected:?}, got {errors:#?}",
            path.display()
        );
    }
}

#[test]
fn defaults_fill_serving_and_failover() {
    let object = load_yaml(&repo_root().join("examples/gpupool-h100.yaml"));
    assert!(validate(&object).is_empty());
    let minimal = json!({
        "apiVersion": "whaleflux.io/v1alpha1",
        "kind": "LlmDeployment",
        "metadata": {"name": "m"},
        "spec": {"gpuPool": "p", "model": {"preset": "llama-3.1-8b", "weights": {"source": {"path": "/m.gguf"}}}}
    });
    let schema = schema_of(&LlmDeployment::crd());
    let defaulted = apply_defaults(&schema, &minimal);
    assert_eq!(defaulted["spec"]["replicas"], json!(1));
    assert_eq!(
        defaulted["spec"]["serving"]["maxContextLength"],
        json!(4096)
    );
    assert_eq!(
        defaulted["spec"]["model"]["weights"]["dtype"],
        json!("bf16")
    );
    let typed: LlmDeployment = serde_json::from_value(minimal).expect("minimal deserializes");
    assert_eq!(typed.spec.replicas, 1);
    assert_eq!(typed.spec.serving.port, 8000);
}

#[test]
fn a_status_with_a_plan_round_trips_and_validates() {
    use whaleflux_crds::{
        GroupPlacement, LlmDeploymentStatus, MemoryBreakdown, Objective, Phase, Plan, PlanEstimate,
        RejectedOption, StagePlan, WeightDtype,
    };
    let mut object = load_yaml(&repo_root().join("examples/llama-3.1-70b.yaml"));
    let plan = Plan {
        model: "llama-3.1-70b".into(),
        dtype: WeightDtype::Bf16,
        gpu_model: "H100".into(),
        objective: Objective::MinGpus,
        tensor_parallel: 4,
        pipeline_parallel: 1,
        replicas: 2,
        gpus_per_replica: 4,
        crosses_nodes: false,
        stages: vec![StagePlan {
            index: 0,
            layers: [0, 80],
            node: "node-0".into(),
            gpus: 4,
            embedding: true,
            head: true,
        }],
        groups: vec![GroupPlacement {
            index: 0,
            nodes: vec!["node-0".into()],
        }],
        memory_per_gpu_bytes: MemoryBreakdown {
            weights: 35_000_000_000,
            kv_cache: 10_000_000_000,
            activations: 1_000_000_000,
            overhead: 2_000_000_000,
            total: 48_000_000_000,
            usable: 72_000_000_000,
        },
        estimate: PlanEstimate {
            time_per_token_ms: 12.5,
            decode_tokens_per_second: 1280.0,
            decode_tokens_per_second_per_gpu: 160.0,
            concurrency: 16,
        },
        notes: vec!["KV heads split 2 per rank".into()],
        rejected: vec![RejectedOption {
            tensor_parallel: 2,
            pipeline_parallel: 1,
            reason: "needs 81 GB per GPU, 72 GB usable".into(),
        }],
    };
    let status = LlmDeploymentStatus {
        observed_generation: Some(1),
        phase: Phase::Progressing,
        plan: Some(plan.clone()),
        replicas: 2,
        ready_replicas: 0,
        ..Default::default()
    };
    object["status"] = serde_json::to_value(&status).expect("status serializes");
    let errors = validate(&object);
    assert!(
        errors.is_empty(),
        "status with a plan is rejected: {errors:#?}"
    );
    let back: LlmDeployment = serde_json::from_value(object).expect("round trip");
    assert_eq!(back.status.and_then(|s| s.plan), Some(plan));
}
