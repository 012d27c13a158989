//! `whaleflux-e2e apiserver --port N --kubeconfig OUT`: serve the in-memory API server until
//! interrupted, for poking at it with kubectl or running the operator against it by hand.
//! With `--gpu-node`, a process kubelet runs pods on those fake nodes too.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use whaleflux_e2e::{KubeletConfig, NodeSpec};

#[derive(Parser)]
#[command(about = "WhaleFlux end-to-end test equipment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the in-memory Kubernetes API server on 127.0.0.1 (plain HTTP).
    Apiserver {
        /// Port to listen on (0 = any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Where to write a kubeconfig for it.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// Register a fake node and run a process kubelet:
        /// `NAME:GPU_PRODUCT:GPU_COUNT[:key=value,...]` (repeatable).
        #[arg(long = "gpu-node")]
        gpu_nodes: Vec<String>,
        /// Program to run for containers of an image without a command: `IMAGE=PATH`.
        #[arg(long = "image")]
        images: Vec<String>,
    },
}

fn parse_node(s: &str) -> anyhow::Result<NodeSpec> {
    let parts: Vec<&str> = s.splitn(4, ':').collect();
    let [name, product, count, rest @ ..] = parts.as_slice() else {
        bail!("--gpu-node {s:?}: expected NAME:GPU_PRODUCT:GPU_COUNT[:key=value,...]");
    };
    let gpus: u32 = count
        .parse()
        .with_context(|| format!("--gpu-node {s:?}: GPU count"))?;
    let mut labels = BTreeMap::new();
    for kv in rest
        .iter()
        .flat_map(|r| r.split(','))
        .filter(|kv| !kv.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--gpu-node {s:?}: label {kv:?} is not key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let mut node = NodeSpec::gpu(name, product, gpus);
    node.labels = labels;
    Ok(node)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Apiserver {
            port,
            kubeconfig,
            gpu_nodes,
            images,
        } => {
            let server = whaleflux_e2e::ApiServer::builder()
                .port(port)
                .kubeconfig(&kubeconfig)
                .start()
                .await
                .context("starting the API server")?;
            println!(
                "serving {} (kubeconfig: {})",
                server.url(),
                kubeconfig.display()
            );
            let _kubelet = if gpu_nodes.is_empty() {
                None
            } else {
                let nodes = gpu_nodes
                    .iter()
                    .map(|n| parse_node(n))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut map = HashMap::new();
                for i in &images {
                    let (image, path) = i
                        .split_once('=')
                        .with_context(|| format!("--image {i:?}: expected IMAGE=PATH"))?;
                    map.insert(image.to_string(), PathBuf::from(path));
                }
                let k = server
                    .kubelet(KubeletConfig {
                        nodes,
                        images: map,
                        ..KubeletConfig::default()
                    })
                    .await
                    .context("starting the process kubelet")?;
                println!("process kubelet running; cluster DNS at {}", k.dns_addr());
                Some(k)
            };
            // Return (dropping the kubelet, which kills its processes) on Ctrl-C or SIGTERM.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
                _ = term.recv() => {}
            }
        }
    }
    Ok(())
}
