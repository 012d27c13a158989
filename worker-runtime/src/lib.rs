//! WhaleFlux worker engine: reads a GGUF model, runs the llama forward pass on CPU, and serves the
//! OpenAI-compatible API. The library is shared by the binary, the tests and the sharded workers.

pub mod backend;
pub mod engine;
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
        let g = Gguf::open(path)?;
        let cfg = model::config::LlamaConfig::from_gguf(&g)?;
        let model = LlamaModel::load(&g, ShardSpec::whole(cfg.n_layers))?;
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
            self.model,
            self.backend,
            self.tokenizer.clone(),
            SchedulerConfig {
                max_batch: opts.max_batch.max(1),
                max_queue: opts.max_queue,
                context,
                prefill_chunk: 512,
            },
            metrics,
        )?;
        Ok(server::Loaded {
            engine,
            tokenizer: self.tokenizer,
            chat: self.chat,
            context,
        })
    }
}
