//! WhaleFlux worker engine: reads a GGUF model, runs the llama forward pass on CPU, and serves the
//! OpenAI-compatible API. The library is shared by the binary, the tests and the sharded workers.

pub mod backend;
pub mod bringup;
pub mod comm;
pub mod engine;
pub mod health;
pub mod metrics;
pub mod model;
pub mod server;
pub mod shard;

pub use bringup::{Runtime, ServeOptions, StartError, Worker};
