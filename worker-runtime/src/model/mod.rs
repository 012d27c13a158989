//! Model files: the GGUF container, the llama configuration, the tokenizer and chat template.

pub mod chat;
pub mod config;
pub mod gguf;
pub mod spm;
pub mod tokenizer;
