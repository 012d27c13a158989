//! WhaleFlux worker engine: reads a GGUF model, runs the llama forward pass on CPU, and serves the
//! OpenAI-compatible API. The library is shared by the binary, the tests and the sharded workers.

pub mod backend;
pub mod comm;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod model;
pub mod server;
pub mod shard;

use std::path::Path;
use std::sync::Arc;

use backend::Backend;
use backend::cpu::CpuBackend;
use engine::{LlamaModel, SchedulerConfig};
use model::chat::ChatTemplate;
use model::gguf::Gguf;
use model::tokenizer::ModelTokenizer;
use shard::ShardSpec;

/// Errors bringing a worker up.
#[derive(Debug, thiserror::Error)]
pub enum GroupStartError {
    /// The model or plan is unusable, or a peer failed while the group formed.
    #[error(transparent)]
    Group(#[from] engine::group::GroupError),
    /// The model or tokenizer is unusable.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A peer failed.
    #[error(transparent)]
    Comm(#[from] comm::CommError),
}

/// Errors bringing a worker up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model file is unusable.
    #[error(transparent)]
    Gguf(#[from] model::gguf::GgufError),
    /// The weights do not match the config.
    #[error(transparent)]
    Load(#[from] engine::LoadError),
    /// The tokenizer metadata is unusable.
    #[error(transparent)]
    Tokenizer(#[from] model::tokenizer::TokenizerError),
    /// The chat template does not compile.
    #[error(transparent)]
    Chat(#[from] model::chat::ChatError),
    /// Threads could not be started.
    #[error(transparent)]
    Cpu(#[from] backend::cpu::CpuError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Serving limits of one worker.
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

/// The model, tokenizer and backend of a single-rank worker.
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
        let cfg = model::config::LlamaConfig::from_gguf(&g)?;
        let model = LlamaModel::load_with(&g, ShardSpec::whole(cfg.n_layers), opts)?;
        let tokenizer = ModelTokenizer::from_gguf(&g)?;
        let name = |id: Option<u32>| {
            id.and_then(|i| tokenizer.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let chat = match ChatTemplate::from_gguf(&g, name(tokenizer.bos), name(tokenizer.eos)) {
            Ok(c) => Some(c),
            Err(model::chat::ChatError::NoTemplate) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            backend: Arc::new(CpuBackend::new(threads)?),
            chat,
        })
    }

    /// Start the engine thread and return what the server needs.
    pub fn start(
        self,
        opts: &ServeOptions,
        metrics: Arc<metrics::Metrics>,
    ) -> Result<server::Loaded, StartError> {
        let trained = self.model.config.context;
        let context = if opts.context == 0 {
            trained
        } else {
            opts.context.min(trained)
        };
        let engine = engine::scheduler::spawn(
            Box::new(engine::Leader::single(self.model, self.backend)),
            self.tokenizer.clone(),
            SchedulerConfig {
                max_batch: opts.max_batch.max(1),
                max_queue: opts.max_queue,
                context,
                prefill_chunk: 512,
            },
            metrics,
            None,
        )?;
        Ok(server::Loaded {
            engine,
            tokenizer: self.tokenizer,
            chat: self.chat,
            context,
        })
    }
}

/// What a worker process of a sharded group runs, from its [`whaleflux_crds::WorkerConfig`].
pub struct GroupProcess {
    /// The configuration.
    pub cfg: whaleflux_crds::WorkerConfig,
    /// Pipeline stage of this process.
    pub stage: usize,
    /// Listener for peer connections, opened before loading (absent when the whole group is
    /// this one process).
    pub listener: Option<std::net::TcpListener>,
    /// Transport settings (secret, timeout, failure hook).
    pub tcp: Option<comm::tcp::TcpOptions>,
}

impl GroupProcess {
    /// Check the configuration and open the peer port on `bind_host` (the address the API
    /// listens on, so pods sharing a network do not collide). A group of more than one process
    /// needs the group secret in the environment.
    pub fn new(
        cfg: whaleflux_crds::WorkerConfig,
        stage: usize,
        bind_host: &str,
        on_fail: Option<comm::tcp::FailHook>,
    ) -> Result<Self, comm::CommError> {
        let multi = cfg.plan.stages.len() > 1 || cfg.tp_rank.is_some();
        let timeout = std::time::Duration::from_millis(cfg.peer_timeout_ms.max(1) as u64);
        let (listener, tcp) = if multi {
            let mut opts = comm::tcp::TcpOptions::from_env(cfg.group, timeout)?;
            opts.on_fail = on_fail;
            // The group forms within its deadline from this process's start, however long
            // each rank takes to load.
            opts.connect_by = Some(
                std::time::Instant::now()
                    + std::time::Duration::from_millis(cfg.formation_timeout_ms.max(0) as u64),
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
    fn endpoints(&self, me: comm::RankId) -> Vec<comm::tcp::PeerEndpoint> {
        let pp = self.cfg.plan.stages.len().max(1);
        let mut want: Vec<comm::RankId> = Vec::new();
        if self.cfg.tp_rank.is_some() {
            let tp = usize::try_from(self.cfg.plan.tensor_parallel).unwrap_or(1);
            want.extend((0..tp).filter(|&r| r != me.tp_rank).map(|r| comm::RankId {
                stage: me.stage,
                tp_rank: r,
            }));
        }
        if me.tp_rank == 0 && pp > 1 {
            for s in [(me.stage + 1) % pp, (me.stage + pp - 1) % pp] {
                let id = comm::RankId {
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
    /// waits until the whole group is ready and returns what the server needs; the others
    /// return `None` once their ranks run (on threads). `on_fatal` is called when the group
    /// fails later.
    pub fn start(
        mut self,
        metrics: Arc<metrics::Metrics>,
        on_fatal: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<Option<server::Loaded>, GroupStartError> {
        use comm::{Link, RankId};
        let cfg = &self.cfg;
        let g = Gguf::open(Path::new(&cfg.model.path)).map_err(StartError::from)?;
        let tp = usize::try_from(cfg.plan.tensor_parallel)
            .unwrap_or(1)
            .max(1);
        let pp = cfg.plan.stages.len().max(1);
        let threads = match usize::try_from(cfg.threads).unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let timeout = std::time::Duration::from_millis(cfg.peer_timeout_ms.max(1) as u64);
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
                let be: Arc<dyn Backend> =
                    Arc::new(CpuBackend::new(threads).map_err(StartError::from)?);
                vec![engine::Rank::new(me, Arc::new(model), be)]
            }
        };
        tracing::info!(rank = %me, layers = ?ranks[0].model.spec.layers, weight_bytes = ranks.iter().map(|r| r.model.weight_bytes()).sum::<usize>(), "shard loaded");
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
        let mut rest = ranks.into_iter();
        let Some(r0) = rest.next() else {
            unreachable!("a stage has at least one rank")
        };
        let follower = |rank: engine::Rank| -> Result<(), std::io::Error> {
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
                .map(|_| ())
        };
        for r in rest {
            follower(r).map_err(StartError::from)?;
        }
        if !self.serves_api() {
            follower(r0).map_err(StartError::from)?;
            return Ok(None);
        }
        let leader = engine::Leader::new(r0, pp);
        leader.await_ready()?;
        let tokenizer = Arc::new(ModelTokenizer::from_gguf(&g).map_err(StartError::from)?);
        let name = |id: Option<u32>| {
            id.and_then(|i| tokenizer.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let chat = match ChatTemplate::from_gguf(&g, name(tokenizer.bos), name(tokenizer.eos)) {
            Ok(c) => Some(c),
            Err(model::chat::ChatError::NoTemplate) => None,
            Err(e) => return Err(StartError::from(e).into()),
        };
        let trained = leader_context(&g)?;
        let want = usize::try_from(cfg.serving.max_context_length).unwrap_or(0);
        let context = if want == 0 {
            trained
        } else {
            want.min(trained)
        };
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
                prefill_chunk: 512,
            },
            metrics,
            Some(Box::new(move |e| fatal(e))),
        )
        .map_err(StartError::from)?;
        Ok(Some(server::Loaded {
            engine,
            tokenizer,
            chat,
            context,
        }))
    }
}

fn leader_context(g: &Gguf) -> Result<usize, StartError> {
    Ok(model::config::LlamaConfig::from_gguf(g)?.context)
}
