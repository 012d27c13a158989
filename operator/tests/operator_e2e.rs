//! The operator end to end, as a user drives it: the real `whaleflux operator` binary against the
//! in-memory API server, real `kubectl`, and real `whaleflux-worker` processes (run by the process
//! kubelet) loading SmolLM2 from `$WHALEFLUX_TEST_MODEL` through a hostPath volume. Creation to
//! Ready, scale to 2 and back, a spec change rolled one group at a time, deletion removing
//! everything; and the operator's calls against the chart's RBAC rules (its ClusterRole and its
//! leader-election Role).
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `kubectl`, and the worker binary (`cargo build -p
//! whaleflux-worker`).

mod cluster;
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use cluster::{Cluster, OPERATOR_USER, bounded, eventually, root, rtx_nodes, smollm2_children};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{EvictParams, ListParams};
use kube::{Api, ResourceExt};
use whaleflux_crds::{GpuPool, LlmDeployment, Phase};

const WAIT: Duration = Duration::from_secs(90);

async fn llmd(api: &Api<LlmDeployment>) -> LlmDeployment {
    api.get("smollm2").await.expect("llmd readable")
}

fn condition(d: &LlmDeployment, t: &str) -> Option<(String, String)> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn pods(api: &Api<Pod>) -> Vec<Pod> {
    api.list(&ListParams::default().labels("app.kubernetes.io/instance=smollm2"))
        .await
        .expect("pods")
        .items
}

/// (group, stage) → uid of the running pods.
async fn pod_uids(api: &Api<Pod>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pods(api)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    v.sort();
    v
}

/// The (group, resource, verb) triples the chart grants: its ClusterRole's rules and its
/// leader-election Role's (plain YAML lists the chart's templates include verbatim).
fn cluster_role_grants() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for file in ["clusterrole-rules.yaml", "lease-role-rules.yaml"] {
        let path = root().join("charts/whaleflux/files").join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rules: serde_json::Value =
            serde_yaml::from_str(&text).expect("rules are a plain YAML list");
        for rule in rules.as_array().expect("a list of rules") {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        assert!(g != "*" && r != "*" && v != "*", "no wildcards in the role");
                        out.insert((g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smollm2_lifecycle_through_kubectl() {
    let model = common::model();
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    let mut op = c.operator("op-main", 6);
    let body = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        let pools: Api<GpuPool> = Api::all(client.clone());
        eventually("the pool to list its two nodes", WAIT, || async {
            pools
                .get("rtx4090-pcie")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.total_nodes == 2 && s.total_gpus == 8 && s.healthy_gpus == 8)
        })
        .await;
        let table = c.kubectl_ok(&["get", "gpool"], None);
        assert!(table.contains("RTX4090"), "{table}");

        // Weights from a node directory the admin did not allow: refused with a condition and
        // an event naming the fix, and nothing is created.
        let forbidden = c
            .smollm2_manifest()
            .replace("name: smollm2", "name: smollm2-hostpath")
            .replace(&model.display().to_string(), "/etc/passwd");
        c.kubectl_ok(&["apply", "-f", "-"], Some(&forbidden));
        let lapi: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
        eventually("the hostPath refused", WAIT, || async {
            lapi.get("smollm2-hostpath").await.ok().is_some_and(|d| {
                condition(&d, "Planned") == Some(("False".into(), "NotAllowed".into()))
            })
        })
        .await;
        let d = lapi.get("smollm2-hostpath").await.expect("llmd");
        let msg = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Planned"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(
            msg.contains("/etc/passwd") && msg.contains("allowedHostPaths"),
            "{msg}"
        );
        let notes = || {
            c.kubectl_ok(
                &[
                    "get",
                    "events.events.k8s.io",
                    "--field-selector",
                    "regarding.name=smollm2-hostpath,reason=NotAllowed",
                    "-o",
                    "jsonpath={range .items[*]}{.type} {.note}{\"\\n\"}{end}",
                ],
                None,
            )
        };
        eventually("a NotAllowed event", WAIT, || async {
            let events = notes();
            events.starts_with("Warning ") && events.contains("/etc/passwd")
        })
        .await;
        let sts = c.kubectl_ok(
            &[
                "get",
                "statefulsets",
                "-l",
                "app.kubernetes.io/instance=smollm2-hostpath",
                "-o",
                "name",
            ],
            None,
        );
        assert!(sts.trim().is_empty(), "nothing created: {sts}");
        c.kubectl_ok(&["delete", "llmd", "smollm2-hostpath", "--wait=true"], None);

        // Another team's pod bound to ws-a takes 3 of its GPUs (its image has no program here,
        // so it stays Pending on the node, as a pod pulling its image would): the pool says so.
        let other = r#"{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "other-team-train", "namespace": "default"},
            "spec": {"nodeName": "ws-a", "containers": [{"name": "train",
                "image": "registry.example/trainer:1",
                "resources": {"limits": {"nvidia.com/gpu": "3"}}}]}}"#;
        c.kubectl_ok(&["apply", "-f", "-"], Some(other));
        let allocatable = |node: &'static str| {
            let pools = pools.clone();
            async move {
                pools
                    .get("rtx4090-pcie")
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .and_then(|s| {
                        s.nodes
                            .iter()
                            .find(|n| n.name == node)
                            .map(|n| n.allocatable)
                    })
            }
        };
        eventually("ws-a to show 1 allocatable GPU", WAIT, || async {
            allocatable("ws-a").await == Some(1)
        })
        .await;
        assert_eq!(allocatable("ws-b").await, Some(4));
        c.kubectl_ok(
            &["delete", "pod", "other-team-train", "--timeout=30s"],
            None,
        );
        eventually("ws-a's GPUs to be free again", WAIT, || async {
            allocatable("ws-a").await == Some(4)
        })
        .await;

        // Create, wait for Ready like a user would.
        c.kubectl_ok(&["apply", "-f", "-"], Some(&c.smollm2_manifest()));
        let row = c.wait_smollm2_ready("90s", &op);
        assert_eq!(
            &row[1..7],
            &["smollm2-135m", "1", "1", "1", "1", "Ready"],
            "{row:?}"
        );

        let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
        let d = llmd(&api).await;
        let status = d.status.clone().expect("status");
        assert_eq!(status.observed_generation, d.metadata.generation);
        assert_eq!(
            status.endpoint.as_deref(),
            Some("http://smollm2.default.svc.cluster.local:8000/v1")
        );
        assert_eq!(
            condition(&d, "Planned"),
            Some(("True".into(), "PlanChosen".into()))
        );
        assert!(d.finalizers().iter().any(|f| f == "whaleflux.io/cleanup"));

        // The real worker serves the model on its pod IP.
        let pod_api: Api<Pod> = Api::namespaced(client.clone(), "default");
        let pod = pod_api.get("smollm2-g0-0").await.expect("stage-0 pod");
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod IP");
        let (code, body) = cluster::http_get(&format!("{ip}:8000"), "/v1/models")
            .expect("the worker answers on its pod IP");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("smollm2-135m"), "{body}");
        let cfg_path = model.display().to_string();
        let cm = Api::<ConfigMap>::namespaced(client.clone(), "default")
            .get("smollm2-g0-config")
            .await
            .expect("config map");
        assert!(
            cm.data.as_ref().expect("data")["worker.json"].contains(&cfg_path),
            "the worker reads the hostPath file"
        );

        // Scale to 2 through the scale subresource: group 0 keeps running.
        let before = pod_uids(&pod_api).await;
        c.kubectl_ok(&["scale", "llmd/smollm2", "--replicas=2"], None);
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &op);
        let after = pod_uids(&pod_api).await;
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(
            after.contains(&before[0]),
            "scaling up must not restart group 0: {before:?} → {after:?}"
        );
        let d = llmd(&api).await;
        assert_eq!(d.status.as_ref().map(|s| s.replicas), Some(2));
        let svc = Api::<Service>::namespaced(client.clone(), "default")
            .get("smollm2")
            .await
            .expect("API service");
        let sel = svc.spec.and_then(|s| s.selector).expect("selector");
        assert_eq!(sel["apps.kubernetes.io/pod-index"], "0");

        // The scale subresource carries the selector an HPA reads, and it selects exactly the
        // worker pods.
        let raw = c.kubectl_ok(
            &[
                "get",
                "--raw",
                "/apis/whaleflux.io/v1alpha1/namespaces/default/llmdeployments/smollm2/scale",
            ],
            None,
        );
        let scale: serde_json::Value = serde_json::from_str(&raw).expect("Scale JSON");
        assert_eq!(scale["spec"]["replicas"], 2, "{raw}");
        let selector = scale["status"]["selector"]
            .as_str()
            .expect("status.selector");
        assert_eq!(
            selector,
            "app.kubernetes.io/component=worker,app.kubernetes.io/instance=smollm2,app.kubernetes.io/name=whaleflux"
        );
        let mut selected: Vec<String> = pod_api
            .list(&ListParams::default().labels(selector))
            .await
            .expect("pods")
            .items
            .iter()
            .map(|p| p.name_any())
            .collect();
        selected.sort();
        assert_eq!(selected, ["smollm2-g0-0", "smollm2-g1-0"]);

        // The PodDisruptionBudget lets one group's pod go at a time: while group 0's pod is
        // replaced, group 1's may not be evicted; once group 0 serves again, it may.
        let evictions: Api<Pod> = Api::namespaced(c.client_without_retries().await, "default");
        evictions
            .evict("smollm2-g0-0", &EvictParams::default())
            .await
            .expect("the first eviction is allowed");
        match evictions
            .evict("smollm2-g1-0", &EvictParams::default())
            .await
        {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 429, "{e:?}");
                assert!(e.message.contains("disruption budget"), "{e:?}");
            }
            other => panic!("a second eviction must be refused by the PDB: {other:?}"),
        }
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &op);
        eventually("group 0's new pod to be Ready", WAIT, || async {
            pod_api.get("smollm2-g0-0").await.ok().is_some_and(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.and_then(|s| s.conditions).is_some_and(|cs| {
                        cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    })
            })
        })
        .await;
        evictions
            .evict("smollm2-g1-0", &EvictParams::default())
            .await
            .expect("with group 0 back, group 1's pod may go");
        c.wait_smollm2("jsonpath={.status.readyReplicas}=2", "90s", &op);
        eventually("both groups' pods to be Ready again", WAIT, || async {
            pods(&pod_api)
                .await
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| {
                                cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                })
                .count()
                == 2
        })
        .await;
        let after = pod_uids(&pod_api).await;

        // A spec change re-plans and replaces the groups one at a time: some group stays
        // ready throughout, which traffic through the API Service shows. Completions at
        // temperature 0 are idempotent, so an attempt goes to the next address the Service's DNS
        // name resolves to when one fails (as a load balancer retries); a request fails only when
        // no address answers.
        let traffic = Traffic::start(
            c.kubelet.as_ref().expect("kubelet").dns_addr(),
            "smollm2.default.svc.cluster.local",
        );
        eventually("a first completion through the Service", WAIT, || async {
            traffic.served() > 0
        })
        .await;
        c.kubectl_ok(
            &[
                "patch",
                "llmd/smollm2",
                "--type=merge",
                "-p",
                r#"{"spec":{"serving":{"maxConcurrentSequences":4}}}"#,
            ],
            None,
        );
        let mut min_ready = i32::MAX;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let d = llmd(&api).await;
            let s = d.status.clone().unwrap_or_default();
            let uids = pod_uids(&pod_api).await;
            let replaced = uids.iter().filter(|u| !after.contains(u)).count();
            if s.observed_generation == d.metadata.generation {
                min_ready = min_ready.min(s.ready_replicas);
            }
            if replaced == 2
                && s.ready_replicas == 2
                && s.observed_generation == d.metadata.generation
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rolling update did not finish: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            min_ready >= 1,
            "a group must stay ready while the other is replaced (saw {min_ready})"
        );
        let (served, failed) = traffic.stop();
        assert!(
            failed.is_empty(),
            "completions failed during the rollout ({served} served):\n{}",
            failed.join("\n")
        );
        assert!(
            served >= 5,
            "only {served} completions went through the rollout"
        );
        let events = c.kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "--field-selector",
                "regarding.name=smollm2",
                "-o",
                "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
            ],
            None,
        );
        for reason in ["PlanChosen", "GroupCreated", "GroupReplaced"] {
            assert!(events.contains(reason), "no {reason} event in:\n{events}");
        }
        // One GroupReplaced per group, in group order, each a Normal event naming its group.
        let replaced = c.kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "--field-selector",
                "regarding.name=smollm2,reason=GroupReplaced",
                "--sort-by=.eventTime",
                "-o",
                "jsonpath={range .items[*]}{.type} {.note}{\"\\n\"}{end}",
            ],
            None,
        );
        let lines: Vec<&str> = replaced.lines().collect();
        assert_eq!(lines.len(), 2, "{replaced}");
        assert!(
            lines[0].starts_with("Normal replica group 0 replaced"),
            "{replaced}"
        );
        assert!(
            lines[1].starts_with("Normal replica group 1 replaced"),
            "{replaced}"
        );

        // A deployment that cannot fit is refused with one PlanImpossible warning, and the
        // running one is untouched.
        let too_big = c
            .smollm2_manifest()
            .replace("name: smollm2\n", "name: too-big\n")
            .replace("  replicas: 1\n", "  replicas: 20\n");
        assert!(too_big.contains("too-big") && too_big.contains("replicas: 20"));
        c.kubectl_ok(&["apply", "-f", "-"], Some(&too_big));
        c.kubectl_ok(
            &[
                "wait",
                "--for=condition=Planned=False",
                "llmd/too-big",
                "--timeout=60s",
            ],
            None,
        );
        let big = api.get("too-big").await.expect("too-big");
        assert_eq!(
            condition(&big, "Planned").map(|c| c.1),
            Some("NoPlanFits".to_string())
        );
        assert_eq!(big.status.as_ref().map(|s| s.phase), Some(Phase::Failed));
        let warnings = c.kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "--field-selector",
                "regarding.name=too-big,reason=PlanImpossible",
                "-o",
                "jsonpath={range .items[*]}{.type}{\"\\n\"}{end}",
            ],
            None,
        );
        assert_eq!(
            warnings.lines().collect::<Vec<_>>(),
            ["Warning"],
            "{warnings}"
        );
        c.kubectl_ok(&["delete", "llmd", "too-big", "--timeout=60s"], None);
        let cm = Api::<ConfigMap>::namespaced(client.clone(), "default")
            .get("smollm2-g1-config")
            .await
            .expect("config map");
        assert!(
            cm.data.as_ref().expect("data")["worker.json"]
                .contains("\"maxConcurrentSequences\": 4")
        );

        // Back to 1: group 1 and its objects go.
        c.kubectl_ok(&["scale", "llmd/smollm2", "--replicas=1"], None);
        let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        eventually("group 1 to be removed", WAIT, || async {
            sts_api.get_opt("smollm2-g1").await.ok().flatten().is_none()
                && pod_api
                    .get_opt("smollm2-g1-0")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
        })
        .await;
        c.wait_smollm2("jsonpath={.status.readyReplicas}=1", "60s", &op);
        let row = c.wait_smollm2_ready("60s", &op);
        assert_eq!(
            &row[1..7],
            &["smollm2-135m", "1", "1", "1", "1", "Ready"],
            "MODEL TP PP REPLICAS READY PHASE: {row:?}"
        );
        let s = llmd(&api).await.status.expect("status");
        assert_eq!((s.replicas, s.ready_replicas), (1, 1));

        // Metrics and health.
        let (code, metrics) = op.get("/metrics").expect("metrics answer");
        assert_eq!(code, 200);
        for m in [
            "whaleflux_reconciles_total",
            "whaleflux_reconcile_duration_seconds",
            "whaleflux_plans_total",
            "whaleflux_groups_ready{",
            "whaleflux_leader 1",
        ] {
            assert!(metrics.contains(m), "no {m} in\n{metrics}");
        }
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("whaleflux_groups_ready{")
                    && l.contains("deployment=\"smollm2\"")
                    && l.ends_with(" 1")),
            "groups_ready of smollm2 is 1 after scaling back:\n{metrics}"
        );
        assert_eq!(op.get("/readyz").map(|r| r.0), Some(200));
        assert_eq!(op.get("/healthz").map(|r| r.0), Some(200));

        // Delete: the finalizer holds the LlmDeployment while a worker pod lingers (here held
        // by a finalizer of the test's), and lets it go once the pod is gone; nothing is left.
        c.kubectl_ok(
            &[
                "patch",
                "pod",
                "smollm2-g0-0",
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":["test.whaleflux.io/hold"]}}"#,
            ],
            None,
        );
        c.kubectl_ok(&["delete", "llmd", "smollm2", "--wait=false"], None);
        let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        eventually("the cleanup to wait on the lingering pod", WAIT, || async {
            let held = api
                .get_opt("smollm2")
                .await
                .ok()
                .flatten()
                .is_some_and(|d| {
                    d.metadata.deletion_timestamp.is_some()
                        && d.finalizers().iter().any(|f| f == "whaleflux.io/cleanup")
                });
            let waiting = op.get("/metrics").is_some_and(|(_, m)| {
                m.lines().any(|l| {
                    l.starts_with("whaleflux_reconcile_errors_total{")
                        && l.contains("reason=\"children_remain\"")
                })
            });
            held && waiting && sts_api.get_opt("smollm2-g0").await.ok().flatten().is_none()
        })
        .await;
        c.kubectl_ok(
            &[
                "patch",
                "pod",
                "smollm2-g0-0",
                "--type=json",
                "-p",
                r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
            ],
            None,
        );
        c.kubectl_ok(
            &["wait", "--for=delete", "llmd/smollm2", "--timeout=90s"],
            None,
        );
        assert!(api.get_opt("smollm2").await.expect("get").is_none());
        let left = smollm2_children(&client, true).await;
        assert!(left.is_empty(), "left behind: {left:?}");
        // The pool's GPUs are free again.
        eventually("the allocation to be released", WAIT, || async {
            pools
                .get("rtx4090-pcie")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.nodes.iter().all(|n| n.allocatable == n.gpu_count))
        })
        .await;

        // RBAC: every call the operator made is granted, and every grant was used.
        let used = c.server.audit().permissions_used(OPERATOR_USER);
        let granted = cluster_role_grants();
        let missing: Vec<_> = used.difference(&granted).collect();
        // Quarantining a node needs a GPU fault; operator/tests/failover.rs asserts it used it.
        let unused: Vec<_> = granted
            .difference(&used)
            .filter(|(g, r, v)| (g.as_str(), r.as_str(), v.as_str()) != ("", "nodes", "patch"))
            .collect();
        assert!(
            missing.is_empty(),
            "the operator made calls the ClusterRole does not allow: {missing:?}"
        );
        assert!(
            unused.is_empty(),
            "the ClusterRole grants permissions the operator never used: {unused:?}"
        );
    };
    let guard = async {
        body.await;
    };
    bounded(Duration::from_secs(420), guard).await;
    // Graceful shutdown on SIGTERM: exit 0 and the Lease released (no holder, so a standby
    // takes it at once instead of waiting out its duration).
    let status = op.terminate();
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}\n{}",
        op.log_text()
    );
    let leases: Api<Lease> = Api::namespaced(c.client().await, "default");
    let lease = leases.get("whaleflux-operator").await.expect("the Lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(
        (spec.holder_identity, spec.lease_duration_seconds),
        (None, Some(1)),
        "SIGTERM must release the Lease\n{}",
        op.log_text()
    );
}

/// Completions sent through a Service's DNS name in a loop, from a thread, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU32>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(dns: std::net::SocketAddr, name: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let thread = {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let body =
                    r#"{"model":"smollm2-135m","prompt":"Hello","max_tokens":2,"temperature":0}"#;
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let ips = cluster::dns_a(dns, name);
                    let mut why = Vec::new();
                    let answered = ips.iter().any(|ip| {
                        match whaleflux_operator::local::http::request(
                            std::net::SocketAddr::from((*ip, 8000)),
                            "POST",
                            "/v1/completions",
                            Some(body),
                            Duration::from_secs(60),
                        ) {
                            Ok(r) if r.status == 200 => true,
                            Ok(r) => {
                                why.push(format!("{ip}: {} {}", r.status, r.body));
                                false
                            }
                            Err(e) => {
                                why.push(format!("{ip}: {e}"));
                                false
                            }
                        }
                    });
                    if answered {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else if served.load(Ordering::Relaxed) > 0 {
                        failed.push(format!("no address of {ips:?} answered: {why:?}"));
                    }
                }
                failed
            })
        };
        Self {
            stop,
            served,
            thread,
        }
    }

    fn served(&self) -> u32 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the loop; (completions served, requests no address answered).
    fn stop(self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failed = self.thread.join().expect("traffic thread");
        (self.served.load(Ordering::Relaxed), failed)
    }
}
