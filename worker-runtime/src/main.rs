//! `whaleflux-worker`: serve a GGUF model over the OpenAI API, or benchmark it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whaleflux_worker::engine::sampling::argmax;
use whaleflux_worker::engine::{KvCache, SeqInput};
use whaleflux_worker::metrics::Metrics;
use whaleflux_worker::server::{AppState, router};
use whaleflux_worker::{Runtime, ServeOptions};

#[derive(Parser)]
#[command(name = "whaleflux-worker", about = "WhaleFlux LLM worker")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API for one GGUF model.
    Serve {
        /// GGUF model file (or give `--config`).
        #[arg(long, required_unless_present = "config")]
        model: Option<PathBuf>,
        /// Worker configuration rendered by the operator or `whaleflux run` (JSON); it sets the
        /// model, ports, serving limits and this process's place in its group, and overrides
        /// the flags that say the same.
        #[arg(long, conflicts_with = "model")]
        config: Option<PathBuf>,
        /// CPU threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Listen port.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// Model name clients send (default: the file stem).
        #[arg(long)]
        model_name: Option<String>,
        /// Context per sequence in tokens (0 = the model's trained context).
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Requests allowed to wait for a slot before 429.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_body: usize,
    },
    /// Measure decode and prefill speed; prints JSON.
    Bench {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Prompt tokens to prefill.
        #[arg(long, default_value_t = 500)]
        prefill_tokens: usize,
    },
}

/// Read a worker configuration and check this process can run its part of the plan.
fn read_config(path: &std::path::Path) -> anyhow::Result<whaleflux_crds::WorkerConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the worker config {}", path.display()))?;
    let cfg: whaleflux_crds::WorkerConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid worker config", path.display()))?;
    let pod = std::env::var(whaleflux_crds::worker::POD_NAME_ENV).ok();
    let stage = cfg
        .resolve_stage(pod.as_deref())
        .with_context(|| format!("worker config {}", path.display()))?;
    if cfg.plan.tensor_parallel != 1 || cfg.plan.pipeline_parallel != 1 {
        anyhow::bail!(
            "{}: this worker runs single-rank plans only (tensorParallel 1, pipelineParallel 1); the plan has {}x{}",
            path.display(),
            cfg.plan.tensor_parallel,
            cfg.plan.pipeline_parallel
        );
    }
    tracing::info!(deployment = %cfg.deployment, group = cfg.group, stage, "worker config read");
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve {
            model,
            config,
            mut threads,
            mut port,
            host,
            mut model_name,
            mut ctx,
            mut max_batch,
            mut max_queue,
            max_body,
        } => {
            let model = match (model, config) {
                (_, Some(path)) => {
                    let cfg = read_config(&path)?;
                    threads = usize::try_from(cfg.threads).unwrap_or(0);
                    port = u16::try_from(cfg.ports.http).with_context(|| {
                        format!(
                            "{}: ports.http {} is not a port",
                            path.display(),
                            cfg.ports.http
                        )
                    })?;
                    model_name = Some(cfg.model.served_name.clone());
                    ctx = usize::try_from(cfg.serving.max_context_length).unwrap_or(0);
                    max_batch = usize::try_from(cfg.serving.max_concurrent_sequences).unwrap_or(1);
                    max_queue = usize::try_from(cfg.serving.max_queue).unwrap_or(0);
                    PathBuf::from(&cfg.model.path)
                }
                (Some(m), None) => m,
                (None, None) => anyhow::bail!("give --model FILE or --config FILE"),
            };
            let name = model_name.unwrap_or_else(|| {
                model
                    .file_stem()
                    .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
            });
            let metrics = Arc::new(Metrics::new());
            let state = AppState::new(name.clone(), metrics.clone());
            let listener = tokio::net::TcpListener::bind((host.as_str(), port))
                .await
                .with_context(|| format!("cannot listen on {host}:{port}"))?;
            tracing::info!(addr = %listener.local_addr()?, model = %name, "listening");
            let app = router(state.clone(), max_body);
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            let opts = ServeOptions {
                threads,
                context: ctx,
                max_batch,
                max_queue,
            };
            let loaded = tokio::task::spawn_blocking(move || {
                Runtime::load(&model, threads).and_then(|rt| rt.start(&opts, metrics))
            })
            .await?
            .context("cannot load the model")?;
            let _ = state.loaded.set(loaded);
            tracing::info!("model loaded, ready");
            server.await??;
        }
        Cmd::Bench {
            model,
            threads,
            decode_tokens,
            prefill_tokens,
        } => {
            let rt = Runtime::load(&model, threads).context("cannot load the model")?;
            let be = rt.backend.as_ref();
            let prompt = rt.tokenizer.encode("The capital of France is")?;
            // Warm-up.
            let mut cache = KvCache::default();
            rt.model.forward(
                be,
                &mut [SeqInput {
                    tokens: &prompt,
                    cache: &mut cache,
                }],
            );
            let mut cache = KvCache::default();
            let lg = rt.model.forward(
                be,
                &mut [SeqInput {
                    tokens: &prompt,
                    cache: &mut cache,
                }],
            );
            let mut tok = lg.first().map_or(0, |l| argmax(l));
            let t0 = Instant::now();
            for _ in 0..decode_tokens {
                let lg = rt.model.forward(
                    be,
                    &mut [SeqInput {
                        tokens: &[tok],
                        cache: &mut cache,
                    }],
                );
                tok = lg.first().map_or(0, |l| argmax(l));
            }
            let decode_s = t0.elapsed().as_secs_f64();
            let vocab = rt.model.config.vocab as u32;
            let long: Vec<u32> = (0..prefill_tokens as u32)
                .map(|i| (i * 7919 + 17) % vocab)
                .collect();
            let mut cache = KvCache::default();
            let t1 = Instant::now();
            rt.model.forward(
                be,
                &mut [SeqInput {
                    tokens: &long,
                    cache: &mut cache,
                }],
            );
            let prefill_s = t1.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "engine": "whaleflux",
                    "backend": be.name(),
                    "threads": threads,
                    "decode_tokens": decode_tokens,
                    "decode_tok_s": decode_tokens as f64 / decode_s,
                    "prefill_tokens": prefill_tokens,
                    "prefill_tok_s": prefill_tokens as f64 / prefill_s,
                })
            );
        }
    }
    Ok(())
}
