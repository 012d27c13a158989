//! The resource builders against golden YAML: the examples with hand-written plans
//! (`tests/fixtures/plan-*.yaml`, not the live planner's output, so a planner change never
//! forces a blind regeneration), built into the objects the operator applies. Regenerate after
//! an intended builder change with `UPDATE_GOLDEN=1 cargo test -p whaleflux-operator --test
//! builders` and review the diff; with `CI` set it refuses to write.

use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use whaleflux_crds::{InterNodeNetwork, LlmDeployment, PvcSource, WorkerConfig};
use whaleflux_operator::plan_cmd::parse_deployment;
use whaleflux_operator::planner::{self, PlanRequest, Pool};
use whaleflux_operator::resources::children::{
    self, BuildError, CONFIG_HASH_ANNOTATION, Children, GROUP_LABEL, POD_INDEX_LABEL,
};
use whaleflux_operator::resources::settings::ClusterSettings;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> LlmDeployment {
    let path = root().join("examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut d = parse_deployment(&text).expect("example parses");
    d.metadata.uid = Some("0f0e0d0c-0000-4000-8000-000000000001".into());
    d
}

/// The hand-written plan of `tests/fixtures/plan-<name>.yaml`.
fn fixed_plan(name: &str) -> whaleflux_crds::Plan {
    let path = root()
        .join("operator/tests/fixtures")
        .join(format!("plan-{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pod template of the first group.
fn pod_spec(c: &Children) -> k8s_openapi::api::core::v1::PodSpec {
    c.groups[0]
        .statefulset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod")
}

fn plan_for(d: &LlmDeployment, gpus: &str) -> whaleflux_crds::Plan {
    let req = PlanRequest::from_spec(&d.spec).expect("request");
    let pool = Pool::from_gpus_spec(gpus, InterNodeNetwork::InfiniBand).expect("pool");
    let now: Timestamp = "2026-06-01T00:00:00Z".parse().expect("time");
    planner::plan(&req, &pool, now).expect("plan")
}

/// Every object as one multi-document YAML stream, in apply order.
fn to_yaml(c: &Children) -> String {
    fn doc<T: Serialize + k8s_openapi::Resource>(out: &mut String, obj: &T) {
        let mut v = serde_json::to_value(obj).expect("object serializes");
        v["apiVersion"] = T::API_VERSION.into();
        v["kind"] = T::KIND.into();
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).expect("yaml"));
    }
    let mut out = String::new();
    doc(&mut out, &c.secret);
    for g in &c.groups {
        doc(&mut out, &g.config_map);
        doc(&mut out, &g.headless);
        doc(&mut out, &g.statefulset);
    }
    doc(&mut out, &c.api_service);
    doc(&mut out, &c.pdb);
    out
}

fn golden(name: &str, actual: &str) {
    let path = root().join("operator/tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_GOLDEN is set while CI is: refusing to rewrite {} (CI must compare, never \
             overwrite)",
            path.display()
        );
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != actual {
        let first = want
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from what the builders produce (first difference at line {}); if the \
             change is intended, regenerate with `UPDATE_GOLDEN=1 cargo test -p \
             whaleflux-operator --test builders` and review the diff",
            path.display(),
            first + 1
        );
    }
}

#[test]
fn smollm2_on_rtx4090_hostpath_matches_golden() {
    let d = example("smollm2-135m.yaml");
    let plan = fixed_plan("smollm2-135m");
    let c = children::build(&d, &plan, "s3cr3t", &ClusterSettings::default()).expect("build");
    golden("smollm2-135m.yaml", &to_yaml(&c));

    assert_eq!(c.groups.len(), 1);
    let sts = &c.groups[0].statefulset;
    let spec = sts.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(plan.pipeline_parallel));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let worker = &pod.containers[0];
    let limits = worker
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert_eq!(
        limits["nvidia.com/gpu"].0,
        plan.tensor_parallel.to_string(),
        "each pod asks for TP GPUs"
    );
    let model = pod
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "model")
        .expect("model volume");
    assert_eq!(
        model.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    // The rendered worker config parses as the worker's type and points at the mounted file.
    let cfg: WorkerConfig =
        serde_json::from_str(&c.groups[0].config_map.data.as_ref().expect("data")["worker.json"])
            .expect("worker config parses");
    assert_eq!(cfg.model.path, "/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(cfg.group, 0);
    assert_eq!(cfg.stage, None, "the pod ordinal picks the stage");
    assert_eq!(
        cfg.resolve_stage(Some("smollm2-g0-0")),
        Ok(0),
        "pod names end in the stage"
    );
    assert_eq!(
        cfg.peers[0].host,
        "smollm2-g0-0.smollm2-g0.default.svc.cluster.local"
    );
}

#[test]
fn llama70b_two_groups_on_pvc_matches_golden() {
    let d = example("llama-3.1-70b.yaml");
    let plan = fixed_plan("llama-3.1-70b");
    let c = children::build(&d, &plan, "s3cr3t", &ClusterSettings::default()).expect("build");
    golden("llama-3.1-70b.yaml", &to_yaml(&c));

    assert_eq!(c.groups.len(), 2, "one StatefulSet per replica group");
    for (i, g) in c.groups.iter().enumerate() {
        let labels = g.statefulset.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[GROUP_LABEL], i.to_string());
        assert_eq!(labels["app.kubernetes.io/managed-by"], "whaleflux-operator");
        let owner = &g
            .statefulset
            .metadata
            .owner_references
            .as_ref()
            .expect("owner")[0];
        assert_eq!(owner.kind, "LlmDeployment");
        assert_eq!(owner.controller, Some(true));
        // Node affinity names the nodes the plan placed this group on.
        let terms = g
            .statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("node affinity");
        let mut planned = plan.groups[i].nodes.clone();
        planned.sort();
        planned.dedup();
        assert_eq!(
            terms.node_selector_terms[0]
                .match_expressions
                .as_ref()
                .expect("expr")[0]
                .values,
            Some(planned)
        );
    }
    // The API Service selects stage 0 of every group, and nothing else.
    let sel = c
        .api_service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .expect("selector");
    assert_eq!(sel[POD_INDEX_LABEL], "0");
    assert!(!sel.contains_key(GROUP_LABEL));

    // A stage of 70B weights may load for minutes: the startup probe allows at least the
    // group's formation deadline, which counts the stage's bytes, and liveness waits for it.
    let worker = &pod_spec(&c).containers[0];
    let startup = worker.startup_probe.as_ref().expect("a startup probe");
    let path = startup.http_get.as_ref().and_then(|h| h.path.as_deref());
    assert_eq!(path, Some("/startupz"));
    let budget_s = i64::from(startup.period_seconds.expect("period"))
        * i64::from(startup.failure_threshold.expect("threshold"));
    let formation_s = whaleflux_crds::worker::formation_timeout_ms(&plan) / 1000;
    assert!(
        budget_s >= formation_s && formation_s > 120 + 300,
        "startup budget {budget_s} s for a formation deadline of {formation_s} s"
    );
}

#[test]
fn config_changes_change_the_pod_template_hash() {
    let d = example("smollm2-135m.yaml");
    let plan = plan_for(&d, "1x4xRTX4090");
    let a = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let mut d2 = d.clone();
    d2.spec.serving.max_concurrent_sequences += 1;
    let b = children::build(&d2, &plan, "x", &ClusterSettings::default()).expect("build");
    let hash = |c: &Children| {
        c.groups[0]
            .statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .map(|a| a[CONFIG_HASH_ANNOTATION].clone())
            .expect("hash annotation")
    };
    assert_ne!(hash(&a), hash(&b), "a serving change must roll the pods");
    assert_eq!(hash(&a), a.groups[0].config_hash);
}

#[test]
fn url_weights_download_into_an_empty_dir() {
    let mut d = example("smollm2-135m.yaml");
    d.spec.model.weights.source.path = None;
    d.spec.model.weights.source.url = Some("https://example.com/m/smol.gguf?download=1".into());
    let plan = plan_for(&d, "1x4xRTX4090");
    let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let pod = pod_spec(&c);
    let init = &pod.init_containers.as_ref().expect("init container")[0];
    assert_eq!(
        serde_json::to_value(init).expect("json"),
        serde_json::json!({
            "name": "download-weights",
            "image": children::DOWNLOAD_IMAGE,
            "args": ["--fail", "--location", "--retry", "5", "--output", "/models/smol.gguf",
                     "https://example.com/m/smol.gguf?download=1"],
            "volumeMounts": [{"name": "model", "mountPath": "/models"}],
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": true, "runAsGroup": 65532, "runAsNonRoot": true,
                "runAsUser": 65532},
        })
    );
    let model = pod
        .volumes
        .as_ref()
        .and_then(|v| v.iter().find(|v| v.name == "model"))
        .expect("model volume");
    assert!(model.empty_dir.is_some());

    d.spec.model.weights.source.url = None;
    d.spec.model.weights.source.pvc = Some(PvcSource {
        claim_name: "weights".into(),
        path: "smol/model.gguf".into(),
    });
    let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let cfg: WorkerConfig =
        serde_json::from_str(&c.groups[0].config_map.data.as_ref().expect("data")["worker.json"])
            .expect("config");
    assert_eq!(cfg.model.path, "/models/smol/model.gguf");
}

#[test]
fn a_plan_without_nodes_pins_no_pod() {
    // Plans made for `whaleflux run` or before placement name no node: no affinity, rather
    // than a hostname rule with an empty value.
    let d = example("smollm2-135m.yaml");
    let mut plan = fixed_plan("smollm2-135m");
    plan.groups.clear();
    for s in &mut plan.stages {
        s.node.clear();
    }
    let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let pod = pod_spec(&c);
    assert_eq!(pod.affinity, None);
    // With a node, the pod is pinned to it.
    let c = children::build(
        &d,
        &fixed_plan("smollm2-135m"),
        "x",
        &ClusterSettings::default(),
    )
    .expect("build");
    let pod = pod_spec(&c);
    assert!(pod.affinity.is_some());
}

#[test]
fn zero_replicas_build_no_groups_and_missing_uid_is_an_error() {
    let mut d = example("smollm2-135m.yaml");
    let plan = plan_for(&d, "1x4xRTX4090");
    d.spec.replicas = 0;
    assert!(
        children::build(&d, &plan, "x", &ClusterSettings::default())
            .expect("build")
            .groups
            .is_empty()
    );
    d.metadata.uid = None;
    assert_eq!(
        children::build(&d, &plan, "x", &ClusterSettings::default()).unwrap_err(),
        BuildError::MissingMetadata("uid")
    );
}

#[test]
fn scaling_up_keeps_the_running_groups_hash() {
    let mut d = example("smollm2-135m.yaml");
    let one = children::build(
        &d,
        &plan_for(&d, "2x4xRTX4090"),
        "x",
        &ClusterSettings::default(),
    )
    .expect("build");
    d.spec.replicas = 2;
    let two = children::build(
        &d,
        &plan_for(&d, "2x4xRTX4090"),
        "x",
        &ClusterSettings::default(),
    )
    .expect("build");
    assert_eq!(two.groups.len(), 2);
    assert_eq!(
        one.groups[0].config_hash, two.groups[0].config_hash,
        "adding a group must not restart group 0"
    );
}

#[test]
fn cluster_settings_reach_every_worker_pod_and_the_spec_still_wins() {
    let mut d = example("smollm2-135m.yaml");
    let plan = fixed_plan("smollm2-135m");
    let settings = ClusterSettings::from_yaml(
        "workerImage: registry.example/wf/worker@sha256:00ff\n\
         imagePullSecrets: [regcred]\n\
         gpuTolerations:\n  - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}\n",
    )
    .expect("settings");
    let c = children::build(&d, &plan, "x", &settings).expect("build");
    let pod = pod_spec(&c);
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/wf/worker@sha256:00ff")
    );
    let pulls: Vec<&str> = pod
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(pulls, ["regcred"]);
    let keys = |p: &k8s_openapi::api::core::v1::PodSpec| -> Vec<String> {
        p.tolerations
            .iter()
            .flatten()
            .map(|t| t.key.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(keys(&pod), ["nvidia.com/gpu"]);

    // The deployment's own image and tolerations: the image replaces the default, the
    // tolerations come after the cluster's.
    d.spec.image = Some("team/worker:dev".into());
    d.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
        key: Some("team".into()),
        operator: Some("Exists".into()),
        ..Default::default()
    }];
    let pod = pod_spec(&children::build(&d, &plan, "x", &settings).expect("build"));
    assert_eq!(pod.containers[0].image.as_deref(), Some("team/worker:dev"));
    assert_eq!(keys(&pod), ["nvidia.com/gpu", "team"]);

    // No settings: the built-in image, no pull secrets, only the spec's tolerations.
    let pod =
        pod_spec(&children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build"));
    assert!(pod.image_pull_secrets.is_none());
    assert_eq!(keys(&pod), ["team"]);
}

#[test]
fn the_download_init_container_takes_the_cluster_settings_image() {
    let mut d = example("smollm2-135m.yaml");
    d.spec.model.weights.source.path = None;
    d.spec.model.weights.source.url = Some("https://example.com/m/smol.gguf".into());
    let plan = plan_for(&d, "1x4xRTX4090");
    let settings =
        ClusterSettings::from_yaml("downloadImage: mirror.example/curl@sha256:0a1b\n").unwrap();
    let c = children::build(&d, &plan, "x", &settings).expect("build");
    let init = &pod_spec(&c).init_containers.expect("init container")[0];
    assert_eq!(init.name, "download-weights");
    assert_eq!(
        init.image.as_deref(),
        Some("mirror.example/curl@sha256:0a1b")
    );
}

/// Worker pods meet the restricted Pod Security Standard, as the chart tests' checker
/// (`charts/tests/kube_checks.py`) reads it, for weights from a PVC and from a URL (with its
/// download init container). HostPath weights are the one exception the standard names: a
/// namespace that allows them needs the `privileged` level, which is why an admin must list
/// their directories (`allowedHostPaths`).
#[test]
fn worker_pods_meet_the_restricted_pod_security_standard() {
    let python = std::env::var("WHALEFLUX_PYTHON")
        .expect("WHALEFLUX_PYTHON: a Python with kubernetes-validate (scripts/test.sh makes one)");
    let mut templates = Vec::new();
    for source in ["pvc", "url", "path"] {
        let mut d = example("smollm2-135m.yaml");
        let w = &mut d.spec.model.weights.source;
        match source {
            "pvc" => {
                w.path = None;
                w.pvc = Some(PvcSource {
                    claim_name: "weights".into(),
                    path: "smol/model.gguf".into(),
                });
            }
            "url" => {
                w.path = None;
                w.url = Some("https://example.com/m/smol.gguf".into());
            }
            _ => {}
        }
        let plan = plan_for(&d, "1x4xRTX4090");
        let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
        let sts = &c.groups[0].statefulset;
        let t = sts
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .expect("template");
        templates.push(serde_json::json!({"source": source, "template": t}));
    }
    let script = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
from kube_checks import pss_restricted
for t in json.load(sys.stdin):
    print(t["source"], json.dumps(pss_restricted(t["template"])))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .arg(root().join("charts/tests"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&templates).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: std::collections::BTreeMap<&str, Vec<String>> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, serde_json::from_str(v).expect("violations")))
        .collect();
    assert_eq!(found["pvc"], Vec::<String>::new(), "PVC weights");
    assert_eq!(found["url"], Vec::<String>::new(), "URL weights");
    assert!(
        !found["path"].is_empty() && found["path"].iter().all(|v| v.contains("hostPath")),
        "hostPath weights break only the volume rules: {:?}",
        found["path"]
    );
}

/// The serving spec reaches the pods: the API keys from the named Secret, the drain the grace
/// period is sized from, the pause before it; and a group's pods change only all together.
#[test]
fn api_keys_drain_and_whole_group_updates_reach_the_statefulset() {
    let mut d = example("smollm2-135m.yaml");
    d.spec.serving.api_key_secret = Some(whaleflux_crds::SecretKeyRef {
        name: "smollm2-keys".into(),
        key: "keys".into(),
    });
    d.spec.serving.drain_seconds = 120;
    let plan = plan_for(&d, "1x4xRTX4090");
    let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let sts = serde_json::to_value(&c.groups[0].statefulset).expect("json");
    let pod = &sts["spec"]["template"]["spec"];
    let worker = &pod["containers"][0];
    let key_env = worker["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "WHALEFLUX_API_KEY"))
        .expect("WHALEFLUX_API_KEY");
    assert_eq!(
        key_env["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "smollm2-keys", "key": "keys", "optional": false})
    );
    let args: Vec<&str> = worker["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--drain-seconds", "120"]),
        "{args:?}"
    );
    assert_eq!(worker["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    // The pause, the drain, and time to exit.
    assert_eq!(pod["terminationGracePeriodSeconds"], 5 + 120 + 5);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
}

/// Each group's NetworkPolicy: the peer port only from the group's own pods, the API port from
/// the clients the deployment names (this namespace when it names none) and the admin's
/// metrics scrapers.
#[test]
fn a_network_policy_fences_each_group() {
    let mut d = example("smollm2-135m.yaml");
    let plan = plan_for(&d, "1x4xRTX4090");
    let c = children::build(&d, &plan, "x", &ClusterSettings::default()).expect("build");
    let np = serde_json::to_value(&c.groups[0].network_policy).expect("json");
    let group = serde_json::json!({"matchLabels": {
        "app.kubernetes.io/component": "worker", "app.kubernetes.io/instance": "smollm2",
        "app.kubernetes.io/name": "whaleflux", "whaleflux.io/group": "0"}});
    assert_eq!(np["spec"]["podSelector"], group, "{np}");
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(
        np["spec"]["ingress"],
        serde_json::json!([
            {"ports": [{"port": "peer", "protocol": "TCP"}], "from": [{"podSelector": group}]},
            {"ports": [{"port": "http", "protocol": "TCP"}], "from": [{"podSelector": {}}]},
        ])
    );
    d.spec.serving.allowed_clients = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("app".to_string(), "chat-ui".to_string())].into()),
            match_expressions: None,
        },
    );
    let settings = ClusterSettings::from_yaml(
        "workerMetricsFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]\n",
    )
    .expect("settings");
    let c = children::build(&d, &plan, "x", &settings).expect("build");
    let np = serde_json::to_value(&c.groups[0].network_policy).expect("json");
    assert_eq!(
        np["spec"]["ingress"][1]["from"],
        serde_json::json!([{"podSelector": {"matchLabels": {"app": "chat-ui"}}}])
    );
    assert_eq!(
        np["spec"]["ingress"][2]["from"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
}
