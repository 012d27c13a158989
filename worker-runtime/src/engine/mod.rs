//! The engine: the llama forward pass for one pipeline stage, the KV cache, sampling and the
//! continuous-batching scheduler.

pub mod bench;
pub mod forward;
pub mod group;
pub mod kv_cache;
pub mod pipeline;
pub mod sampling;
pub mod scheduler;

pub use forward::{KvCache, LlamaModel, LoadError, SeqInput, StageSeq};
pub use pipeline::{Executor, Leader, Rank};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{EngineHandle, Event, FinishReason, GenRequest, SchedulerConfig};
