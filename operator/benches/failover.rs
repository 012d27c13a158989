//! How fast failover brings a group back, on the process kubelet with the model cached: the
//! real operator and worker processes, the fault injected the way the failover tests do. Prints
//! JSON: for a SIGKILLed rank of a PP=2 group and for a fake XID 79, the seconds from the fault to
//! the deployment having every group Ready again, and how long a request in flight at the moment
//! of the fault took to fail (or finish). Goals: Ready again < 10 s, the request ends < 2 s.
//!
//! `WHALEFLUX_TEST_MODEL=$(scripts/fetch-model.sh) cargo bench -p whaleflux-operator --bench
//! failover` (needs kubectl, a C compiler and `cargo build -p whaleflux-worker`).

#[path = "../tests/cluster/mod.rs"]
mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cluster::{Cluster, nvml_state, rtx_nodes, with_fake_nvml};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde_json::json;
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::fake_nvml::FakeNode;

fn manifest(c: &Cluster, tp: i32, pp: i32) -> String {
    c.smollm2_manifest().replace(
        "  replicas: 1\n",
        &format!("  replicas: 1\n  parallelism:\n    tensorParallel: {tp}\n    pipelineParallel: {pp}\n  failover:\n    restartBudget: 10\n"),
    )
}

async fn ready(client: &Client) -> bool {
    Api::<LlmDeployment>::namespaced(client.clone(), "default")
        .get("smollm2")
        .await
        .ok()
        .and_then(|d| d.status)
        .is_some_and(|s| s.ready_replicas == 1)
}

async fn restarts(client: &Client) -> usize {
    Api::<LlmDeployment>::namespaced(client.clone(), "default")
        .get("smollm2")
        .await
        .ok()
        .and_then(|d| d.status)
        .map_or(0, |s| s.restarts.len())
}

async fn wait(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn stage0(client: &Client) -> SocketAddr {
    let ip = Api::<Pod>::namespaced(client.clone(), "default")
        .get("smollm2-g0-0")
        .await
        .expect("pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    format!("{ip}:8000").parse().expect("address")
}

/// Starts a long streamed completion; returns a thread that reports how long after `fault`
/// (set by the caller) the stream ended.
fn in_flight(addr: SocketAddr) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        let body =
            json!({"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 2000,
            "temperature": 0, "stream": true})
            .to_string();
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = write!(
                s,
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
        Instant::now()
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let tmp = std::env::temp_dir().join(format!("wf-failover-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let nodes = with_fake_nvml(&tmp, rtx_nodes(2, 4));
    let state = |n: &str| nvml_state(&tmp, n);
    let mut results = Vec::new();
    for (fault, tp, pp) in [("killed_rank", 1, 2), ("xid_79", 1, 1)] {
        let c = Cluster::start(nodes.clone(), true).await;
        let op = c.operator(&format!("op-bench-{fault}"), 6);
        c.install_crds_and_pool();
        let client = c.client().await;
        c.kubectl_ok(&["apply", "-f", "-"], Some(&manifest(&c, tp, pp)));
        wait("the group ready", async || ready(&client).await).await;
        let before = restarts(&client).await;
        let request = in_flight(stage0(&client).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kubelet = c.kubelet.as_ref().expect("kubelet");
        let node = Api::<Pod>::namespaced(client.clone(), "default")
            .get("smollm2-g0-0")
            .await
            .ok()
            .and_then(|p| p.spec)
            .and_then(|s| s.node_name)
            .expect("node");
        let at = Instant::now();
        if fault == "killed_rank" {
            kubelet.kill("default", "smollm2-g0-1");
        } else {
            let mut f = FakeNode::h100s(1);
            f.xids.push((0, 79));
            f.write(&state(&node)).expect("XID");
        }
        wait("the restart", async || restarts(&client).await > before).await;
        wait("ready again", async || ready(&client).await).await;
        let back = at.elapsed().as_secs_f64();
        let ended = request.join().expect("request thread");
        let failed_after = ended.saturating_duration_since(at).as_secs_f64();
        results.push(
            json!({"fault": fault, "split": format!("TP {tp} x PP {pp}"),
            "ready_again_s": (back * 100.0).round() / 100.0,
            "in_flight_request_ended_s": (failed_after * 100.0).round() / 100.0}),
        );
        drop(op);
        drop(c);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"bench": "failover", "results": results}))
            .unwrap_or_default()
    );
}
