//! A sharded plan end to end: the real `whaleflux operator` turns an LlmDeployment with a fixed
//! tensor parallel 3 × pipeline parallel 2 split of SmolLM2 into one StatefulSet of two pods (one
//! per pipeline stage, three TP ranks as threads each), the process kubelet runs them as real
//! `whaleflux-worker` processes that find each other through the cluster DNS and the group
//! secret, and a greedy completion sent to the endpoint in the deployment's status (resolved
//! through the cluster DNS, as a client in the cluster would) returns the same text as
//! `whaleflux run` serving the same split of the same file as local processes.
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `kubectl`, and the worker binary (`cargo build -p
//! whaleflux-worker`).

mod cluster;
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use cluster::{Cluster, bounded, eventually, rtx_nodes};
use common::{Run, complete, free_port};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use serde_json::Value;
use whaleflux_crds::{GpuPool, LlmDeployment};

const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: u32 = 12;

/// The smollm2 example with the example's sharded split fixed in its spec.
fn sharded_manifest(c: &Cluster) -> String {
    let text = c.smollm2_manifest();
    let fixed = text.replace(
        "  replicas: 1\n",
        "  replicas: 1\n  parallelism:\n    tensorParallel: 3\n    pipelineParallel: 2\n",
    );
    assert_ne!(fixed, text, "the example's `replicas: 1` line moved");
    fixed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tp3_pp2_statefulset_answers_like_whaleflux_run() {
    let model = common::model();
    let model_arg = model.to_str().expect("UTF-8 model path").to_string();
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    let op = c.operator("op-sharded", 6);
    let body = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        let pools: Api<GpuPool> = Api::all(client.clone());
        eventually(
            "the pool to list its two nodes",
            Duration::from_secs(60),
            || async {
                pools
                    .get("rtx4090-pcie")
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .is_some_and(|s| s.total_nodes == 2 && s.total_gpus == 8)
            },
        )
        .await;

        c.kubectl_ok(&["apply", "-f", "-"], Some(&sharded_manifest(&c)));
        let row = c.wait_smollm2_ready("240s", &op);
        assert_eq!(
            &row[1..7],
            &["smollm2-135m", "3", "2", "1", "1", "Ready"],
            "{row:?}"
        );

        // One StatefulSet, one pod per stage, each asking for its stage's three GPUs, on
        // different nodes (four GPUs each: two stages of three cannot share one).
        let sts = Api::<StatefulSet>::namespaced(client.clone(), "default")
            .get("smollm2-g0")
            .await
            .expect("the group's StatefulSet");
        assert_eq!(sts.spec.as_ref().and_then(|s| s.replicas), Some(2));
        let pod_api: Api<Pod> = Api::namespaced(client.clone(), "default");
        let mut nodes = Vec::new();
        for stage in 0..2 {
            let name = format!("smollm2-g0-{stage}");
            let pod = pod_api.get(&name).await.expect("stage pod");
            let spec = pod.spec.expect("pod spec");
            let gpus = spec.containers[0]
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("nvidia.com/gpu"))
                .map(|q| q.0.clone());
            assert_eq!(gpus.as_deref(), Some("3"), "{name}");
            nodes.push(spec.node_name.expect("scheduled"));
        }
        assert_ne!(nodes[0], nodes[1], "the two stages share a node: {nodes:?}");
        let cm = Api::<ConfigMap>::namespaced(client.clone(), "default")
            .get("smollm2-g0-config")
            .await
            .expect("config map");
        let cfg: Value =
            serde_json::from_str(&cm.data.expect("data")["worker.json"]).expect("worker.json");
        assert_eq!(cfg["plan"]["tensorParallel"], 3, "{cfg}");
        assert_eq!(cfg["plan"]["pipelineParallel"], 2, "{cfg}");
        let peers: Vec<&str> = cfg["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["host"].as_str())
            .collect();
        assert_eq!(
            peers,
            [
                "smollm2-g0-0.smollm2-g0.default.svc.cluster.local",
                "smollm2-g0-1.smollm2-g0.default.svc.cluster.local",
            ],
            "{cfg}"
        );

        // Each stage loaded only its half of the layers and joined the other over TCP.
        let kubelet = c.kubelet.as_ref().expect("kubelet");
        let log0 = kubelet.logs("default", "smollm2-g0-0", "worker");
        let log1 = kubelet.logs("default", "smollm2-g0-1", "worker");
        assert!(log0.contains("layers=0..15"), "stage 0 log:\n{log0}");
        assert!(log1.contains("layers=15..30"), "stage 1 log:\n{log1}");
        assert!(
            log0.contains("group connected and loaded, serving the API"),
            "stage 0 log:\n{log0}"
        );
        assert!(
            log1.contains("rank connected and loaded"),
            "stage 1 log:\n{log1}"
        );

        // The endpoint in the status, resolved by the cluster DNS to the group's stage-0 pod.
        let d = Api::<LlmDeployment>::namespaced(client.clone(), "default")
            .get("smollm2")
            .await
            .expect("llmd");
        let endpoint = d.status.and_then(|s| s.endpoint).expect("status.endpoint");
        let rest = endpoint
            .strip_prefix("http://")
            .and_then(|r| r.strip_suffix("/v1"))
            .unwrap_or_else(|| panic!("endpoint {endpoint} is not http://HOST:PORT/v1"));
        let (host, port) = rest.rsplit_once(':').expect("HOST:PORT");
        let port: u16 = port.parse().expect("port");
        let ips = cluster::dns_a(kubelet.dns_addr(), host);
        let stage0_ip = pod_api
            .get("smollm2-g0-0")
            .await
            .expect("stage 0")
            .status
            .and_then(|s| s.pod_ip)
            .expect("pod IP");
        assert_eq!(
            ips.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>(),
            [stage0_ip],
            "{host} must resolve to the stage-0 pod only"
        );
        let addr = SocketAddr::from((ips[0], port));
        let cluster_text = tokio::task::spawn_blocking(move || complete(addr, PROMPT, MAX_TOKENS))
            .await
            .expect("request thread");
        assert!(!cluster_text.trim().is_empty(), "{cluster_text:?}");

        // The same split of the same file as local processes.
        let local_port = free_port();
        let example = cluster::root().join("examples/smollm2-local.yaml");
        let local_text = tokio::task::spawn_blocking(move || {
            let port_s = local_port.to_string();
            let mut run = Run::start(&[
                "-f",
                example.to_str().expect("UTF-8 path"),
                "--devices",
                "cpu",
                "--tensor-parallel",
                "3",
                "--pipeline-parallel",
                "2",
                "--port",
                &port_s,
                "--model",
                &model_arg,
            ]);
            run.wait_for(&["Serving smollm2-135m at"], Duration::from_secs(300));
            complete(
                SocketAddr::from((Ipv4Addr::LOCALHOST, local_port)),
                PROMPT,
                MAX_TOKENS,
            )
        })
        .await
        .expect("whaleflux run thread");
        assert_eq!(
            cluster_text, local_text,
            "the cluster's TP=3×PP=2 group and `whaleflux run` disagree"
        );
        eprintln!("both answered {PROMPT:?} → {cluster_text:?}");
    };
    bounded(Duration::from_secs(540), body).await;
}
