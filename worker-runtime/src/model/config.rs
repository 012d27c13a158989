//! Llama-family hyper-parameters read from GGUF metadata.

use super::gguf::{Gguf, GgufError};

/// Shape of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Trained context length.
    pub context: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RoPE linear position scale (`rope.scaling.type = linear`: 1 / `rope.scaling.factor`;
    /// otherwise 1). Llama 3.1's llama3 scaling comes as the `rope_freqs` tensor instead.
    pub rope_scale: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl LlamaConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.n_heads
    }

    /// The parts of the shape the split rules read ([`whaleflux_crds::split`]).
    pub fn split_shape(&self) -> whaleflux_crds::split::Shape {
        whaleflux_crds::split::Shape {
            layers: self.n_layers as u32,
            heads: self.n_heads as u32,
            kv_heads: self.n_kv_heads as u32,
            head_dim: self.head_dim() as u64,
            ffn: self.ffn as u64,
        }
    }

    /// Read the config; only `general.architecture = llama` is supported.
    pub fn from_gguf(g: &Gguf) -> Result<Self, GgufError> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::Metadata {
                key: "general.architecture".into(),
                reason: format!("architecture {arch:?} is not supported (only \"llama\")"),
            });
        }
        let u = |k: &str| -> Result<usize, GgufError> {
            let v = g.get_u64(&format!("llama.{k}"))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < (1 << 24))
                .ok_or_else(|| GgufError::Metadata {
                    key: format!("llama.{k}"),
                    reason: format!("value {v} out of range"),
                })
        };
        let f = |k: &str, default: f32| -> f32 {
            g.get(&format!("llama.{k}"))
                .and_then(|v| v.as_f64())
                .map_or(default, |v| v as f32)
        };
        let rope_scale = match g.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => match f("rope.scaling.factor", 1.0) {
                factor if factor > 0.0 => 1.0 / factor,
                factor => {
                    return Err(GgufError::Metadata {
                        key: "llama.rope.scaling.factor".into(),
                        reason: format!("linear scaling factor {factor} must be positive"),
                    });
                }
            },
            Some(other) => {
                return Err(GgufError::Metadata {
                    key: "llama.rope.scaling.type".into(),
                    reason: format!(
                        "RoPE scaling {other:?} is not supported (none, linear, and llama3's \
                         rope_freqs tensor are)"
                    ),
                });
            }
        };
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = match g.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => n_heads,
        };
        let hidden = u("embedding_length")?;
        let vocab = match g.get("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| GgufError::Metadata {
                    key: "tokenizer.ggml.tokens".into(),
                    reason: "missing (needed for the vocabulary size)".into(),
                })?,
        };
        let cfg = Self {
            n_layers: u("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            ffn: u("feed_forward_length")?,
            vocab,
            context: u("context_length")?,
            rope_base: f("rope.freq_base", 10_000.0),
            rope_scale,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
        };
        if !hidden.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
            || !cfg.head_dim().is_multiple_of(2)
            || cfg.head_dim() > 256
        {
            return Err(GgufError::Metadata {
                key: "llama.attention.head_count".into(),
                reason: format!(
                    "hidden {hidden}, {n_heads} heads and {n_kv_heads} KV heads do not divide evenly (or the head width exceeds 256)"
                ),
            });
        }
        Ok(cfg)
    }
}
