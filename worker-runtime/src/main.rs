//! `whaleflux-worker`: serve a GGUF model over the OpenAI API, or benchmark it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use whaleflux_crds::WorkerConfig;
use whaleflux_worker::engine::sampling::argmax;
use whaleflux_worker::engine::{KvCache, SeqInput};
use whaleflux_worker::health::{MonitorConfig, VISIBLE_DEVICES_ENV, Visible};
use whaleflux_worker::metrics::Metrics;
use whaleflux_worker::server::listen::{self, HttpLimits};
use whaleflux_worker::server::{AppState, router};
use whaleflux_worker::{Runtime, ServeOptions, Worker};

#[derive(Parser)]
#[command(name = "whaleflux-worker", about = "WhaleFlux LLM worker")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// The NVML library to load for GPU health (default: the driver's libnvidia-ml.so.1).
        #[arg(long, value_name = "FILE", env = whaleflux_crds::worker::NVML_LIBRARY_ENV)]
        nvml_library: Option<PathBuf>,
        /// Seconds between two GPU health samples.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        gpu_sample_seconds: u64,
        /// Where a fatal GPU fault is written before the worker exits with status 4 (only when
        /// the file exists: the kubelet creates it in every container).
        #[arg(long, value_name = "FILE", default_value = whaleflux_crds::worker::TERMINATION_LOG)]
        termination_log: PathBuf,
        /// An API key clients must send as `Authorization: Bearer KEY` to use `/v1/*`
        /// (repeatable; the environment variable holds one or more, comma-separated). None: the
        /// API is open. `/healthz`, `/readyz` and `/metrics` never need one.
        #[arg(
            long,
            value_name = "KEY",
            env = "WHALEFLUX_API_KEY",
            value_delimiter = ',',
            hide_env_values = true
        )]
        api_key: Vec<String>,
        /// Seconds a SIGTERM/SIGINT waits for the requests in flight to finish before the
        /// worker exits anyway.
        #[arg(long, default_value_t = 30)]
        drain_seconds: u64,
        /// HTTP connections served at once (more wait in the listen backlog).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// Seconds a client has to send a request's headers.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        header_timeout_seconds: u64,
        /// Seconds a client has to send a request's body.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        body_timeout_seconds: u64,
    },
    /// Measure sharding on this machine (TP=3 threads and TCP, PP=2 under concurrent load,
    /// each against one rank in the same run); prints JSON.
    BenchShard {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// CPU threads in all.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Tokens to decode per measurement (and per request in the throughput runs).
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Concurrent requests in the throughput runs.
        #[arg(long, default_value_t = 8)]
        concurrent: usize,
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
        /// Dequantize the weights to f32 (the reference path: f32 matmuls, f32 activations).
        #[arg(long)]
        f32: bool,
    },
}

/// Read a worker configuration and find this process's stage.
fn read_config(path: &std::path::Path) -> anyhow::Result<(WorkerConfig, usize)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the worker config {}", path.display()))?;
    let cfg: whaleflux_crds::WorkerConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid worker config", path.display()))?;
    let pod = std::env::var(whaleflux_crds::worker::POD_NAME_ENV).ok();
    let stage = cfg
        .resolve_stage(pod.as_deref())
        .with_context(|| format!("worker config {}", path.display()))?;
    tracing::info!(
        deployment = %cfg.deployment,
        group = cfg.group,
        stage,
        tp_rank = ?cfg.tp_rank,
        tp = cfg.plan.tensor_parallel,
        pp = cfg.plan.pipeline_parallel,
        "worker config read"
    );
    Ok((cfg, stage as usize))
}

/// Set once a drain has finished and the process is stopping on purpose: a peer connection that
/// closes now is the group shutting down, not a failure.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Log why the group failed and exit non-zero, so the supervisor (kubelet or `whaleflux run`)
/// restarts the group.
fn die(reason: &str) -> ! {
    if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::info!(reason, "a peer went away while the group shut down");
        std::process::exit(0);
    }
    tracing::error!(reason, "the replica group failed; exiting");
    whaleflux_worker::comm::tcp::abort_all(reason);
    eprintln!("whaleflux-worker: the replica group failed: {reason}");
    // Requests open on this rank end with the reason, not a cut connection.
    whaleflux_worker::server::fail_in_flight(reason);
    std::thread::sleep(whaleflux_worker::server::FAIL_FLUSH);
    std::process::exit(whaleflux_crds::worker::EXIT_GROUP_FAILED)
}

/// How the HTTP side of a worker runs, from its flags.
struct HttpOptions {
    host: String,
    max_body: usize,
    api_keys: Vec<String>,
    drain: Duration,
    limits: HttpLimits,
    body_timeout: Duration,
}

/// SIGTERM and SIGINT, watched from the process's start: as a container's PID 1 the worker has
/// no default action for them, and one that arrives while the model loads must not be lost.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM; the worker stops only when killed"))
            .ok();
        Self { term }
    }

    /// Resolves with the signal's name.
    async fn recv(&mut self) -> &'static str {
        let term = async {
            match self.term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = term => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
}

/// Serve one worker process: listen at once (`/healthz` answers while the model loads), bring
/// the worker up, serve, and on SIGTERM/SIGINT drain: `/readyz` 503 and new generations 503
/// at once, the ones in flight finished (streams included) within `drain`, then the group shut
/// down cleanly and exit 0. Every worker, whole-model or one rank of a group, runs this.
async fn serve(
    cfg: WorkerConfig,
    stage: usize,
    http: HttpOptions,
    health: MonitorConfig,
    mut signals: StopSignals,
) -> anyhow::Result<()> {
    let port = u16::try_from(cfg.ports.http)
        .with_context(|| format!("ports.http {} is not a port", cfg.ports.http))?;
    let host = http.host.as_str();
    let name = cfg.model.served_name.clone();
    let hook: whaleflux_worker::comm::tcp::FailHook = Arc::new(|e| die(&e.to_string()));
    let worker =
        Worker::new(cfg, stage, host, Some(hook)).context("cannot join the replica group")?;
    let metrics = Arc::new(Metrics::new());
    whaleflux_worker::health::spawn(health, metrics.clone())?;
    let state = AppState::new(name.clone(), metrics.clone(), &http.api_keys);
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    tracing::info!(addr = %listener.local_addr()?, model = %name, stage, api = worker.serves_api(), keys = http.api_keys.len(), "listening");
    let app = router(state.clone(), http.max_body).layer(
        tower_http::timeout::RequestBodyTimeoutLayer::new(http.body_timeout),
    );
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = http.limits;
    let mut server = tokio::spawn(async move {
        listen::serve(listener, app, limits, async move {
            let _ = http_stopped.await;
        })
        .await;
    });
    let mut start =
        tokio::task::spawn_blocking(move || worker.start(metrics, Arc::new(|e: String| die(&e))));
    let started = tokio::select! {
        s = &mut start => s?,
        which = signals.recv() => {
            // Nothing is in flight while the model loads.
            tracing::info!(signal = which, "stopping while loading");
            std::process::exit(0);
        }
        r = &mut server => {
            r?;
            anyhow::bail!("the HTTP server stopped");
        }
    };
    let mut started = started.unwrap_or_else(|e| die(&e.to_string()));
    let engine = started.api.as_ref().map(|l| l.engine.clone());
    match started.api.take() {
        Some(loaded) => {
            let _ = state.loaded.set(loaded);
            tracing::info!("group connected and loaded, serving the API");
        }
        None => {
            let _ = state.group_formed.set(started.formed.clone());
            tracing::info!("rank connected and loaded; Ready once the whole group has formed");
        }
    }
    // Serve until a stop signal, or until the group shuts down under a rank that serves no API
    // (its API rank drained and stopped).
    let which = loop {
        tokio::select! {
            which = signals.recv() => break which,
            r = &mut server => {
                r?;
                anyhow::bail!("the HTTP server stopped");
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if engine.is_none() && started.ranks_done() {
                    break "the group's shutdown";
                }
            }
        }
    };
    let t0 = Instant::now();
    state.gate.start_draining();
    tracing::info!(
        cause = which,
        in_flight = state.gate.in_flight(),
        drain_seconds = http.drain.as_secs_f64(),
        "draining"
    );
    let drained = match &engine {
        Some(_) => tokio::time::timeout(http.drain, state.gate.idle())
            .await
            .is_ok(),
        // A rank without the API keeps computing for its group until the API rank, draining
        // too, shuts the group down.
        None => {
            let wait = async {
                while !started.ranks_done() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::time::timeout(http.drain, wait).await.is_ok()
        }
    };
    if drained {
        tracing::info!(seconds = t0.elapsed().as_secs_f64(), "drained");
    } else {
        tracing::warn!(
            in_flight = state.gate.in_flight(),
            "the drain timed out; stopping with work in flight"
        );
    }
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(e) = &engine {
        // Tells the group's other ranks to shut down, so they exit 0 too.
        e.stop();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(e.stopped() && started.ranks_done()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the last answers' bytes leave before the process ends.
    let _ = stop_http.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("stopped");
    std::process::exit(0)
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
    whaleflux_worker::bringup::exit_on_panic();
    match Cli::parse().cmd {
        Cmd::Serve {
            model,
            config,
            threads,
            port,
            host,
            model_name,
            ctx,
            max_batch,
            max_queue,
            max_body,
            nvml_library,
            gpu_sample_seconds,
            termination_log,
            api_key,
            drain_seconds,
            max_connections,
            header_timeout_seconds,
            body_timeout_seconds,
        } => {
            let health = MonitorConfig {
                library: nvml_library,
                // NVML shows every GPU of the machine; the process uses (and watches) the ones
                // CUDA is told to show it.
                visible: Visible::parse(std::env::var(VISIBLE_DEVICES_ENV).ok().as_deref()),
                every: std::time::Duration::from_secs(gpu_sample_seconds),
                termination_log,
            };
            // Installed before the model loads: a SIGTERM that arrives earlier would be lost,
            // and as a container's PID 1 the worker has no default action for it.
            let signals = StopSignals::install();
            let http = HttpOptions {
                host,
                max_body,
                api_keys: api_key,
                drain: Duration::from_secs(drain_seconds),
                limits: HttpLimits {
                    max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                    header_timeout: Duration::from_secs(header_timeout_seconds),
                },
                body_timeout: Duration::from_secs(body_timeout_seconds),
            };
            let (cfg, stage) = match (model, config) {
                (_, Some(path)) => read_config(&path)?,
                (Some(model), None) => {
                    let name = model_name.unwrap_or_else(|| {
                        model
                            .file_stem()
                            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
                    });
                    let opts = ServeOptions {
                        threads,
                        context: ctx,
                        max_batch,
                        max_queue,
                    };
                    let cfg = Worker::single_config(&model, &name, port, &opts)
                        .context("cannot load the model")?;
                    (cfg, 0)
                }
                (None, None) => anyhow::bail!("give --model FILE or --config FILE"),
            };
            serve(cfg, stage, http, health, signals).await?;
        }
        Cmd::BenchShard {
            model,
            threads,
            tokens,
            concurrent,
        } => {
            let g = whaleflux_worker::model::gguf::Gguf::open(&model)
                .context("cannot open the model")?;
            let out = tokio::task::spawn_blocking(move || {
                whaleflux_worker::engine::bench::run(&g, threads, tokens, concurrent)
            })
            .await?
            .context("benchmark failed")?;
            println!("{out}");
        }
        Cmd::Bench {
            model,
            threads,
            decode_tokens,
            prefill_tokens,
            f32,
        } => {
            let opts = if f32 {
                whaleflux_worker::shard::LoadOptions::f32()
            } else {
                whaleflux_worker::shard::LoadOptions::default()
            };
            let rt = Runtime::load_with(&model, threads, opts).context("cannot load the model")?;
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
                    "weights": if f32 { "f32" } else { "as-stored" },
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
