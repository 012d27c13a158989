//! Bringing a worker up: one path for every worker process, whether it serves one whole model
//! (`serve --model`) or one place in a sharded replica group (`serve --config`). Both become a
//! [`whaleflux_crds::WorkerConfig`] and go through [`Worker::start`], so start-up errors, the
//! chat template, the context clamp and everything the drain relies on behave the same.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use whaleflux_crds::WorkerConfig;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::comm::{self, Link, RankId};
use crate::engine::{self, LlamaModel, SchedulerConfig};
use crate::metrics::Metrics;
use crate::model::chat::{ChatError, ChatTemplate};
use crate::model::config::LlamaConfig;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::ModelTokenizer;
use crate::server::Loaded;
use crate::shard::{self, ShardSpec};

/// Why a worker (or a group built in one process) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model file is unusable.
    #[error(transparent)]
    Gguf(#[from] crate::model::gguf::GgufError),
    /// The plan does not fit the model.
    #[error(transparent)]
    Shard(#[from] shard::ShardError),
    /// A weight does not match the model's shape.
    #[error(transparent)]
    Load(#[from] engine::LoadError),
    /// The tokenizer metadata is unusable.
    #[error(transparent)]
    Tokenizer(#[from] crate::model::tokenizer::TokenizerError),
    /// The chat template does not compile.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// CPU threads could not be started.
    #[error(transparent)]
    Cpu(#[from] crate::backend::cpu::CpuError),
    /// A rank or engine thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A peer failed, or refused this one, while the group formed.
    #[error(transparent)]
    Comm(#[from] comm::CommError),
    /// The weight file is not the one the deployment names by digest.
    #[error(
        "{path} has SHA-256 {actual}, but the deployment asks for {expected} (spec.model.weights.source.sha256): the file is corrupt, truncated or another one; replace it or fix the digest"
    )]
    Checksum {
        /// The file.
        path: String,
        /// The digest asked for.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The weight file could not be read to check its digest.
    #[error("cannot read {path} to check its SHA-256: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Check `path` against the hex SHA-256 `expected` (any case).
pub fn check_sha256(path: &Path, expected: &str) -> Result<(), StartError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let shown = path.display().to_string();
    let read_err = |source| StartError::Read {
        path: shown.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let actual: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        Err(StartError::Checksum {
            path: shown,
            expected: expected.trim().to_ascii_lowercase(),
            actual,
        })
    }
}

/// Prompt tokens fed per engine step across the batch (chunked prefill).
pub const PREFILL_CHUNK: usize = 512;

/// Serving limits of a worker started from flags (`serve --model`).
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Context per sequence (0 = the model's trained context).
    pub context: usize,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests allowed to wait.
    pub max_queue: usize,
}

/// Make a panic on any thread end the process with [`whaleflux_crds::worker::EXIT_PANIC`]
/// after the default report: a rank, engine or server thread that dies leaves a group that
/// cannot answer, and only a restart of the group brings it back.
pub fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(%info, "a worker thread panicked; exiting");
        std::process::exit(whaleflux_crds::worker::EXIT_PANIC);
    }));
}

/// The context a worker serves: what was asked for, at most what the model was trained on
/// (0 asks for the trained context).
pub fn clamp_context(asked: usize, trained: usize) -> usize {
    if asked == 0 {
        trained
    } else {
        asked.min(trained)
    }
}

/// The model's chat template, with its BOS and EOS token texts; `None` when the file has none.
pub fn chat_template(g: &Gguf, tk: &ModelTokenizer) -> Result<Option<ChatTemplate>, StartError> {
    let name = |id: Option<u32>| {
        id.and_then(|i| tk.tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    match ChatTemplate::from_gguf(g, name(tk.bos), name(tk.eos)) {
        Ok(c) => Ok(Some(c)),
        Err(ChatError::NoTemplate) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The digest of what every rank of a group must agree on: the model file, the plan, the
/// group and its peers, the serving limits and the peer timeout. What differs between the
/// ranks of one group (stage, TP rank, ports, threads) is left out.
pub fn group_digest(cfg: &WorkerConfig) -> [u8; comm::handshake::DIGEST] {
    use sha2::{Digest, Sha256};
    let shared = serde_json::json!({
        "model": cfg.model,
        "plan": cfg.plan,
        "group": cfg.group,
        "peers": cfg.peers,
        "serving": cfg.serving,
        "peerTimeoutMs": cfg.peer_timeout_ms,
    });
    let d = Sha256::digest(shared.to_string().as_bytes());
    let mut out = [0u8; comm::handshake::DIGEST];
    out.copy_from_slice(&d[..comm::handshake::DIGEST]);
    out
}

/// The model, tokenizer and backend of one rank that owns the whole model, for in-process use
/// (benchmarks, tests); serving goes through [`Worker`].
pub struct Runtime {
    /// Model weights.
    pub model: Arc<LlamaModel>,
    /// Tokenizer.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Compute backend.
    pub backend: Arc<dyn Backend>,
    /// Chat template, if any.
    pub chat: Option<ChatTemplate>,
}

impl Runtime {
    /// Load a GGUF file for one rank that owns the whole model.
    pub fn load(path: &Path, threads: usize) -> Result<Self, StartError> {
        Self::load_with(path, threads, shard::LoadOptions::default())
    }

    /// [`Runtime::load`] with the weights in the format `opts` asks for (f32 for the
    /// reference path).
    pub fn load_with(
        path: &Path,
        threads: usize,
        opts: shard::LoadOptions,
    ) -> Result<Self, StartError> {
        let g = Gguf::open(path)?;
        let cfg = LlamaConfig::from_gguf(&g)?;
        let model = LlamaModel::load_with(&g, ShardSpec::whole(cfg.n_layers), opts)?;
        let tokenizer = ModelTokenizer::from_gguf(&g)?;
        let chat = chat_template(&g, &tokenizer)?;
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            backend: Arc::new(CpuBackend::new(threads)?),
            chat,
        })
    }
}

/// What a started worker process runs.
pub struct Started {
    /// What the HTTP server needs; present on the process that serves the API.
    pub api: Option<Loaded>,
    /// This process's rank threads other than the API rank's engine: they end when the group
    /// shuts down cleanly (the API rank stopped after a drain).
    ranks: Vec<JoinHandle<()>>,
    /// Raised once the whole group has formed (every rank loaded and connected).
    pub formed: Arc<std::sync::atomic::AtomicBool>,
}

impl Started {
    /// Whether every rank thread of this process has ended (the group shut down). A process
    /// that serves the API ends with its engine instead; for it this is true once its other
    /// ranks (TP threads) have ended.
    pub fn ranks_done(&self) -> bool {
        self.ranks.iter().all(JoinHandle::is_finished)
    }
}

/// One worker process of a replica group (a group of one for `serve --model`).
pub struct Worker {
    /// The configuration.
    pub cfg: WorkerConfig,
    /// Pipeline stage of this process.
    pub stage: usize,
    /// Listener for peer connections, opened before loading (absent when the whole group is
    /// this one process).
    listener: Option<std::net::TcpListener>,
    /// Transport settings (secret, timeout, failure hook).
    tcp: Option<comm::tcp::TcpOptions>,
}

impl Worker {
    /// The configuration of a worker that serves the whole model in `path` by itself, on `port`.
    pub fn single_config(
        path: &Path,
        served_name: &str,
        port: u16,
        opts: &ServeOptions,
    ) -> Result<WorkerConfig, StartError> {
        let g = Gguf::open(path)?;
        let layers = LlamaConfig::from_gguf(&g)?.n_layers;
        let as_i32 = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        Ok(WorkerConfig {
            deployment: served_name.to_string(),
            model: whaleflux_crds::WorkerModel {
                path: path.to_string_lossy().into_owned(),
                served_name: served_name.to_string(),
                sha256: None,
            },
            plan: shard::fixed_plan(served_name, layers, 1, 1),
            group: 0,
            stage: Some(0),
            tp_rank: None,
            peers: Vec::new(),
            ports: whaleflux_crds::WorkerPorts {
                http: i32::from(port),
                peer: 0,
            },
            serving: whaleflux_crds::WorkerServing {
                max_context_length: as_i32(opts.context),
                max_concurrent_sequences: as_i32(opts.max_batch.max(1)),
                max_queue: as_i32(opts.max_queue),
            },
            threads: as_i32(opts.threads),
            peer_timeout_ms: 30_000,
            formation_timeout_ms: 600_000,
        })
    }

    /// Check the configuration and open the peer port on `bind_host` (the address the API
    /// listens on, so pods sharing a network do not collide). A group of more than one process
    /// needs the group secret in the environment.
    pub fn new(
        cfg: WorkerConfig,
        stage: usize,
        bind_host: &str,
        on_fail: Option<comm::tcp::FailHook>,
    ) -> Result<Self, StartError> {
        let multi = cfg.plan.stages.len() > 1 || cfg.tp_rank.is_some();
        let timeout = Duration::from_millis(cfg.peer_timeout_ms.max(1) as u64);
        let (listener, tcp) = if multi {
            let mut opts = comm::tcp::TcpOptions::from_env(cfg.group, timeout)?;
            opts.on_fail = on_fail;
            opts.config_digest = group_digest(&cfg);
            // The group forms within its deadline from this process's start, however long
            // each rank takes to load.
            opts.connect_by = Some(
                Instant::now() + Duration::from_millis(cfg.formation_timeout_ms.max(0) as u64),
            );
            let port = u16::try_from(cfg.ports.peer).unwrap_or(0);
            (Some(comm::tcp::listen_on(bind_host, port)?), Some(opts))
        } else {
            (None, None)
        };
        Ok(Self {
            cfg,
            stage,
            listener,
            tcp,
        })
    }

    /// Whether this process serves the OpenAI API (stage 0, TP rank 0).
    pub fn serves_api(&self) -> bool {
        self.stage == 0 && self.cfg.tp_rank.unwrap_or(0) == 0
    }

    /// The peers this process talks to: its TP peers (one process per TP rank) and, on TP
    /// rank 0, the neighbouring stages' rank 0.
    fn endpoints(&self, me: RankId) -> Vec<comm::tcp::PeerEndpoint> {
        let pp = self.cfg.plan.stages.len().max(1);
        let mut want: Vec<RankId> = Vec::new();
        if self.cfg.tp_rank.is_some() {
            let tp = usize::try_from(self.cfg.plan.tensor_parallel).unwrap_or(1);
            want.extend((0..tp).filter(|&r| r != me.tp_rank).map(|r| RankId {
                stage: me.stage,
                tp_rank: r,
            }));
        }
        if me.tp_rank == 0 && pp > 1 {
            for s in [(me.stage + 1) % pp, (me.stage + pp - 1) % pp] {
                let id = RankId {
                    stage: s,
                    tp_rank: 0,
                };
                if !want.contains(&id) {
                    want.push(id);
                }
            }
        }
        want.into_iter()
            .filter_map(|id| {
                self.cfg
                    .peers
                    .iter()
                    .find(|p| {
                        p.stage as usize == id.stage
                            && p.tp_rank.unwrap_or(0) as usize == id.tp_rank
                    })
                    .map(|p| comm::tcp::PeerEndpoint {
                        id,
                        host: p.host.clone(),
                        port: u16::try_from(p.port).unwrap_or(0),
                    })
            })
            .collect()
    }

    /// Load this process's ranks, connect them to the group and start them. The API process
    /// waits until the whole group is ready and gets what the server needs; the others get
    /// their rank threads. `on_fatal` is called when the group fails later.
    pub fn start(
        mut self,
        metrics: Arc<Metrics>,
        on_fatal: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<Started, StartError> {
        let cfg = &self.cfg;
        let loading = Instant::now();
        if let Some(want) = &cfg.model.sha256 {
            let t0 = Instant::now();
            check_sha256(Path::new(&cfg.model.path), want)?;
            tracing::info!(
                seconds = t0.elapsed().as_secs_f64(),
                "the weight file's SHA-256 matches"
            );
        }
        let g = Gguf::open(Path::new(&cfg.model.path))?;
        let tp = usize::try_from(cfg.plan.tensor_parallel)
            .unwrap_or(1)
            .max(1);
        let pp = cfg.plan.stages.len().max(1);
        let threads = match usize::try_from(cfg.threads).unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let timeout = Duration::from_millis(cfg.peer_timeout_ms.max(1) as u64);
        let me = RankId {
            stage: self.stage,
            tp_rank: usize::try_from(cfg.tp_rank.unwrap_or(0)).unwrap_or(0),
        };
        let mut ranks = match cfg.tp_rank {
            None => engine::group::stage_threads(
                &g,
                &cfg.plan,
                self.stage,
                (threads / tp).max(1),
                timeout,
                None,
            )?,
            Some(_) => {
                let model = engine::group::load_rank(&g, &cfg.plan, self.stage, me.tp_rank)?;
                let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads)?);
                vec![engine::Rank::new(me, Arc::new(model), be)]
            }
        };
        let weight_bytes: usize = ranks.iter().map(|r| r.model.weight_bytes()).sum();
        tracing::info!(rank = %me, layers = ?ranks[0].model.spec.layers, weight_bytes, "shard loaded");
        metrics.load_seconds.set(loading.elapsed().as_secs_f64());
        metrics
            .weight_bytes
            .set(i64::try_from(weight_bytes).unwrap_or(i64::MAX).max(1));
        if let (Some(listener), Some(opts)) = (self.listener.take(), self.tcp.as_ref()) {
            let eps = self.endpoints(me);
            let conns = comm::tcp::connect(me, listener, &eps, opts)?;
            let link = |id: RankId| -> Result<Arc<dyn Link>, comm::CommError> {
                conns.get(&id).map(|c| c.clone() as Arc<dyn Link>).ok_or(
                    comm::CommError::Protocol {
                        peer: id,
                        detail: "no peer address for this rank in the worker config".into(),
                    },
                )
            };
            let r0 = &mut ranks[0];
            if cfg.tp_rank.is_some() && tp > 1 {
                r0.tp = Some(Box::new(comm::tcp::TcpGroup::new(me, tp, &conns)));
                r0.tp_links = if me.tp_rank == 0 {
                    (1..tp)
                        .map(|r| {
                            link(RankId {
                                stage: me.stage,
                                tp_rank: r,
                            })
                        })
                        .collect::<Result<_, _>>()?
                } else {
                    vec![link(RankId {
                        stage: me.stage,
                        tp_rank: 0,
                    })?]
                };
            }
            if me.tp_rank == 0 && pp > 1 {
                r0.next = Some(link(RankId {
                    stage: (me.stage + 1) % pp,
                    tp_rank: 0,
                })?);
                r0.prev = Some(link(RankId {
                    stage: (me.stage + pp - 1) % pp,
                    tp_rank: 0,
                })?);
            }
        }
        let formed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for r in &mut ranks {
            r.formed = formed.clone();
        }
        let mut rest = ranks.into_iter();
        let Some(r0) = rest.next() else {
            unreachable!("a stage has at least one rank")
        };
        let follower = |rank: engine::Rank| -> std::io::Result<JoinHandle<()>> {
            let fatal = on_fatal.clone();
            std::thread::Builder::new()
                .name(format!("wf-rank-{}-{}", rank.id.stage, rank.id.tp_rank))
                .spawn(move || {
                    let id = rank.id;
                    match rank.follow() {
                        Ok(()) => tracing::info!(rank = %id, "rank shut down"),
                        Err(e) => fatal(format!("rank {id}: {e}")),
                    }
                })
        };
        let mut threads = rest.map(follower).collect::<Result<Vec<_>, _>>()?;
        if !self.serves_api() {
            threads.push(follower(r0)?);
            return Ok(Started {
                api: None,
                ranks: threads,
                formed,
            });
        }
        let leader = engine::Leader::new(r0, pp);
        leader.await_ready()?;
        let tokenizer = Arc::new(ModelTokenizer::from_gguf(&g)?);
        let chat = chat_template(&g, &tokenizer)?;
        let context = clamp_context(
            usize::try_from(cfg.serving.max_context_length).unwrap_or(0),
            LlamaConfig::from_gguf(&g)?.context,
        );
        let fatal = on_fatal.clone();
        let engine = engine::scheduler::spawn(
            Box::new(leader),
            tokenizer.clone(),
            SchedulerConfig {
                max_batch: usize::try_from(cfg.serving.max_concurrent_sequences)
                    .unwrap_or(1)
                    .max(1),
                max_queue: usize::try_from(cfg.serving.max_queue).unwrap_or(0),
                context,
                prefill_chunk: PREFILL_CHUNK,
            },
            metrics,
            Some(Box::new(move |e| fatal(e))),
        )?;
        Ok(Started {
            api: Some(Loaded {
                engine,
                tokenizer,
                chat,
                context,
            }),
            ranks: threads,
            formed,
        })
    }
}
