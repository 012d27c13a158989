//! Scale benchmark (a command, not a test): many LlmDeployments over a large GPU pool on the
//! in-memory API server, with the real `whaleflux operator` binary, pods not run. For each
//! scenario it measures the time from the first create until every deployment is `Planned`,
//! the operator's peak RSS, its reconcile duration (p50/p99, from its own histogram) and the
//! API calls it made per deployment (from the server's audit log). Prints one JSON document.
//!
//! `cargo bench -p whaleflux-operator --bench scale` runs the standard scenarios:
//! 100 deployments on 100 nodes, 1,000 on 1,000, 5,000 on 2,000, and 1,000 on 1,000 while the
//! API server closes every watch and expires resourceVersions every few seconds ("chaos").
//! `-- --deployments N --nodes M [--chaos]` runs one scenario instead.
//! Goals: 1,000/1,000 in < 30 s; 5,000/2,000 in < 120 s with peak RSS < 100 MiB; chaos converges.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde_json::{Value, json};
use whaleflux_crds::LlmDeployment;
use whaleflux_e2e::{ApiServer, http_get};

const OPERATOR_USER: &str = "system:serviceaccount:whaleflux-system:whaleflux-operator";
const OPERATOR_TOKEN: &str = "whaleflux-bench-operator";

#[derive(Debug, Clone, Copy)]
struct Scenario {
    deployments: usize,
    nodes: usize,
    chaos: bool,
    goal_seconds: f64,
}

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `q`-quantile of the LlmDeployment reconcile histogram in the operator's text exposition,
/// interpolated within its bucket as PromQL's `histogram_quantile` does; seconds.
fn quantile(metrics: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("whaleflux_reconcile_duration_seconds_bucket")
                && l.contains("controller=\"llmdeployment\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if count > prev.1 {
                (rank - prev.1) / (count - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, count);
    }
    None
}

fn round(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}

async fn run(s: Scenario, root: &std::path::Path) -> anyhow::Result<Value> {
    let server = ApiServer::builder()
        .history(20_000)
        .token(OPERATOR_TOKEN, OPERATOR_USER)
        .start()
        .await?;
    let kc = Kubeconfig::read_from(server.kubeconfig())?;
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?,
    )?;
    let status = Command::new("kubectl")
        .env("KUBECONFIG", server.kubeconfig())
        .args(["apply", "-f"])
        .arg(root.join("crds/manifests"))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "kubectl apply of the CRDs failed");

    // Nodes: 8 x H100 each, Ready, as GPU feature discovery labels them.
    let node_api: Api<Node> = Api::all(client.clone());
    stream::iter(0..s.nodes)
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

    let op_kubeconfig = server.write_kubeconfig(OPERATOR_TOKEN, "operator-kubeconfig")?;
    let op_log = std::env::temp_dir().join(format!(
        "whaleflux-scale-operator-{}-{}.log",
        std::process::id(),
        s.deployments
    ));
    let port = free_port()?;
    let mut op = Command::new(env!("CARGO_BIN_EXE_whaleflux"))
        .args(["operator", "--metrics-addr"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--lease-namespace", "default"])
        .env("KUBECONFIG", &op_kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("WHALEFLUX_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&op_log)?)
        .spawn()?;
    let pid = op.id();

    // The bench follows the deployments with a watch (a list per second of thousands of
    // objects would load the server more than the operator does).
    let api: Api<LlmDeployment> = Api::namespaced(client.clone(), "default");
    let (reader, writer) = reflector::store::<LlmDeployment>();
    let follow = tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|_| std::future::ready(())),
    );
    let started = Instant::now();
    let chaos = s.chaos.then(|| {
        let faults = server.faults_handle();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                n += 1;
                if n.is_multiple_of(2) {
                    faults.expire_resource_versions();
                } else {
                    faults.close_watches();
                }
            }
        })
    });
    stream::iter(0..s.deployments)
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

    let limit = Duration::from_secs_f64(s.goal_seconds * 3.0);
    let mut done = 0;
    let mut last_report = Instant::now();
    while started.elapsed() < limit {
        done = reader.state().iter().filter(|d| planned(d)).count();
        if last_report.elapsed() >= Duration::from_secs(5) || done == s.deployments {
            eprintln!(
                "{:>6.1}s planned {done}/{}",
                started.elapsed().as_secs_f64(),
                s.deployments
            );
            last_report = Instant::now();
        }
        if done == s.deployments {
            break;
        }
        if op.try_wait()?.is_some() {
            anyhow::bail!(
                "the operator exited; log: {}",
                std::fs::read_to_string(&op_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_planned_s = started.elapsed().as_secs_f64();
    if let Some(c) = chaos {
        c.abort();
    }
    // Let it settle (status writes, pool coalescing) before reading the peak and the counts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let _ = op.kill();
    let _ = op.wait();
    follow.abort();
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    let mut total_calls = 0u64;
    for e in server
        .audit()
        .resource_events()
        .iter()
        .filter(|e| e.user == OPERATOR_USER)
    {
        let resource = if e.subresource.is_empty() {
            e.resource.clone()
        } else {
            format!("{}/{}", e.resource, e.subresource)
        };
        *calls.entry(format!("{} {resource}", e.verb)).or_default() += 1;
        total_calls += 1;
    }
    let per_deployment = |n: u64| round(n as f64 / s.deployments.max(1) as f64, 2);
    let gpus_planned: i64 = reader
        .state()
        .iter()
        .filter_map(|d| d.status.as_ref()?.plan.as_ref())
        .map(|p| i64::from(p.gpus_per_replica * p.replicas))
        .sum();
    let rss_mib = round(rss_kib as f64 / 1024.0, 1);
    Ok(json!({
        "deployments": s.deployments,
        "nodes": s.nodes,
        "chaos": s.chaos,
        "gpus_in_pool": s.nodes * 8,
        "gpus_planned": gpus_planned,
        "planned": done,
        "create_seconds": round(created_s, 2),
        "seconds_until_all_planned": round(all_planned_s, 2),
        "goal_seconds": s.goal_seconds,
        "within_goal": done == s.deployments && all_planned_s < s.goal_seconds,
        "operator_peak_rss_mib": rss_mib,
        "goal_rss_mib": 100,
        "reconcile_p50_seconds": quantile(&metrics, 0.5).map(|x| round(x, 4)),
        "reconcile_p99_seconds": quantile(&metrics, 0.99).map(|x| round(x, 4)),
        "api_calls_per_deployment": per_deployment(total_calls),
        "api_calls_per_deployment_by_verb": calls
            .iter()
            .filter(|(_, n)| **n as f64 >= s.deployments as f64 * 0.05)
            .map(|(k, n)| (k.clone(), json!(per_deployment(*n))))
            .collect::<serde_json::Map<_, _>>(),
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scenarios = match (arg("--deployments"), arg("--nodes")) {
        (Some(d), n) => vec![Scenario {
            deployments: d,
            nodes: n.unwrap_or(d),
            chaos: std::env::args().any(|a| a == "--chaos"),
            goal_seconds: 30.0 * (d as f64 / 1000.0).max(1.0),
        }],
        _ => vec![
            Scenario {
                deployments: 100,
                nodes: 100,
                chaos: false,
                goal_seconds: 30.0,
            },
            Scenario {
                deployments: 1000,
                nodes: 1000,
                chaos: false,
                goal_seconds: 30.0,
            },
            Scenario {
                deployments: 5000,
                nodes: 2000,
                chaos: false,
                goal_seconds: 120.0,
            },
            Scenario {
                deployments: 1000,
                nodes: 1000,
                chaos: true,
                goal_seconds: 30.0,
            },
        ],
    };
    let mut results = Vec::new();
    for s in scenarios {
        eprintln!("scenario: {s:?}");
        results.push(run(s, &root).await?);
    }
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "{}",
        serde_json::to_string_pretty(
            &json!({"machine": machine, "cores": cores, "scenarios": results})
        )?
    );
    let failed: Vec<&Value> = results
        .iter()
        .filter(|r| r["planned"] != r["deployments"])
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "some deployments were never planned: {failed:?}"
    );
    Ok(())
}
