//! Scale benchmark (a command, not a test): 1,000 LlmDeployments over a 1,000-node GPU pool on the
//! in-memory API server, pods not run as processes. Measures the time from the first create until
//! every deployment is `Planned`, and the operator process's peak RSS. Prints JSON.
//!
//! `cargo bench -p whaleflux-operator --bench scale` (`-- --deployments N --nodes N` to vary).
//! Goal: under 60 s and under 100 MiB.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::ApiServer;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of `pid` in KiB (VmHWM), if readable.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn planned(d: &LlmDeployment) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Planned" && c.status == "True")
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let deployments = arg("--deployments", 1000);
    let nodes = arg("--nodes", 1000);
    let server = ApiServer::builder().history(20_000).start().await?;
    let kc = Kubeconfig::read_from(server.kubeconfig())?;
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?,
    )?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("kubectl")
        .env("KUBECONFIG", server.kubeconfig())
        .args(["apply", "-f"])
        .arg(root.join("crds/manifests"))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "kubectl apply of the CRDs failed");

    // Nodes: 8 x H100 each, Ready, as GPU feature discovery labels them.
    let node_api: Api<Node> = Api::all(client.clone());
    stream::iter(0..nodes)
        .map(|i| {
            let node_api = node_api.clone();
            async move {
                let name = format!("gpu-{i:04}");
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {
                        "whaleflux.io/pool": "h100", "kubernetes.io/hostname": name,
                        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}},
                    "status": {"allocatable": {"nvidia.com/gpu": "8"}, "capacity": {"nvidia.com/gpu": "8"},
                        "conditions": [{"type": "Ready", "status": "True"}]}
                }))?;
                let mut created = node_api.create(&PostParams::default(), &node).await?;
                created.status = node.status.clone();
                node_api
                    .replace_status(&name, &PostParams::default(), &created)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let pools: Api<whaleflux_crds::GpuPool> = Api::all(client.clone());
    let pool: whaleflux_crds::GpuPool = serde_json::from_value(json!({
        "apiVersion": "whaleflux.io/v1alpha1", "kind": "GpuPool",
        "metadata": {"name": "h100"},
        "spec": {"nodeSelector": {"whaleflux.io/pool": "h100"},
                 "interconnect": {"intraNode": "NVLink", "interNode": "InfiniBand"}}
    }))?;
    pools.create(&PostParams::default(), &pool).await?;

    let op_log = std::env::temp_dir().join(format!(
        "whaleflux-scale-operator-{}.log",
        std::process::id()
    ));
    let mut op = Command::new(env!("CARGO_BIN_EXE_whaleflux"))
        .args([
            "operator",
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-namespace",
            "default",
        ])
        .env("KUBECONFIG", server.kubeconfig())
        .env(
            "RUST_LOG",
            std::env::var("WHALEFLUX_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&op_log)?)
        .spawn()?;
    let pid = op.id();

    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    stream::iter(0..deployments)
        .map(|i| {
            let api = api.clone();
            async move {
                let d: LlmDeployment = serde_json::from_value(json!({
                    "apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
                    "metadata": {"name": format!("llm-{i:04}"), "namespace": "default"},
                    "spec": {"model": {"preset": "smollm2-135m", "weights": {"dtype": "q4_1",
                              "source": {"path": "/models/smollm2.gguf"}}},
                             "gpuPool": "h100", "replicas": 1,
                             "serving": {"maxContextLength": 2048, "maxConcurrentSequences": 8}}
                }))?;
                api.create(&PostParams::default(), &d).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let created_s = started.elapsed().as_secs_f64();

    let limit = Duration::from_secs(300);
    let mut done = 0;
    while started.elapsed() < limit {
        let list = api.list(&ListParams::default()).await?;
        done = list.items.iter().filter(|d| planned(d)).count();
        eprintln!(
            "{:>6.1}s planned {done}/{deployments}",
            started.elapsed().as_secs_f64()
        );
        if done == deployments {
            break;
        }
        if op.try_wait()?.is_some() {
            anyhow::bail!(
                "the operator exited; log: {}",
                std::fs::read_to_string(&op_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let all_planned_s = started.elapsed().as_secs_f64();
    // Let it settle a little (status writes, requeues) before reading the peak.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let _ = op.kill();
    let _ = op.wait();
    let gpus_planned: i64 = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|d| d.status.as_ref()?.plan.as_ref())
        .map(|p| i64::from(p.gpus_per_replica * p.replicas))
        .sum();
    let mut out = BTreeMap::new();
    out.insert("deployments", json!(deployments));
    out.insert("nodes", json!(nodes));
    out.insert("gpus_in_pool", json!(nodes * 8));
    out.insert("gpus_planned", json!(gpus_planned));
    out.insert("planned", json!(done));
    out.insert("create_seconds", json!((created_s * 100.0).round() / 100.0));
    out.insert(
        "seconds_until_all_planned",
        json!((all_planned_s * 100.0).round() / 100.0),
    );
    out.insert(
        "operator_peak_rss_mib",
        json!(((rss_kib as f64) / 1024.0 * 10.0).round() / 10.0),
    );
    out.insert("goal_seconds", json!(60));
    out.insert("goal_rss_mib", json!(100));
    out.insert(
        "all_planned_within_goal",
        json!(done == deployments && all_planned_s < 60.0),
    );
    println!("{}", serde_json::to_string_pretty(&out)?);
    anyhow::ensure!(
        done == deployments,
        "only {done} of {deployments} deployments were planned within {limit:?}"
    );
    Ok(())
}
