//! The engine: the llama forward pass for one pipeline stage, the KV cache, sampling and the
//! continuous-batching scheduler.

pub mod forward;
pub mod sampling;
pub mod scheduler;

pub use forward::{KvCache, LlamaModel, LoadError, SeqInput};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{EngineHandle, Event, FinishReason, GenRequest, SchedulerConfig};
