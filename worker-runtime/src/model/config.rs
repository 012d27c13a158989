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
    /// Whether RoPE rotates the two halves of each head (GPT-NeoX style: Qwen2) rather than
    /// adjacent pairs (Llama: its converter permutes Q and K for that).
    pub rope_neox: bool,
    /// RoPE linear position scale (`rope.scaling.type = linear`: 1 / `rope.scaling.factor`;
    /// otherwise 1). Llama 3.1's llama3 scaling comes as the `rope_freqs` tensor instead.
    pub rope_scale: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Sliding-window attention (`{arch}.attention.sliding_window`, Mistral's 4096): a
    /// position attends to itself and the `w - 1` before it. None: the whole context.
    pub sliding_window: Option<usize>,
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

    /// Read the config of a `general.architecture = llama` or `qwen2` file (the same block:
    /// Qwen2 adds Q/K/V biases, which the loader takes when present, and NeoX-style RoPE).
    pub fn from_gguf(g: &Gguf) -> Result<Self, GgufError> {
        let arch = g.get_str("general.architecture")?;
        let rope_neox = match arch {
            "llama" => false,
            "qwen2" => true,
            _ => {
                return Err(GgufError::Metadata {
                    key: "general.architecture".into(),
                    reason: format!(
                        "architecture {arch:?} is not supported (\"llama\" and \"qwen2\" are)"
                    ),
                });
            }
        };
        let u = |k: &str| -> Result<usize, GgufError> {
            let v = g.get_u64(&format!("{arch}.{k}"))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < (1 << 24))
                .ok_or_else(|| GgufError::Metadata {
                    key: format!("{arch}.{k}"),
                    reason: format!("value {v} out of range"),
                })
        };
        let f = |k: &str, default: f32| -> f32 {
            g.get(&format!("{arch}.{k}"))
                .and_then(|v| v.as_f64())
                .map_or(default, |v| v as f32)
        };
        let rope_scale = match g
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => 1.0,
            Some("linear") => match f("rope.scaling.factor", 1.0) {
                factor if factor > 0.0 => 1.0 / factor,
                factor => {
                    return Err(GgufError::Metadata {
                        key: format!("{arch}.rope.scaling.factor"),
                        reason: format!("linear scaling factor {factor} must be positive"),
                    });
                }
            },
            Some(other) => {
                return Err(GgufError::Metadata {
                    key: format!("{arch}.rope.scaling.type"),
                    reason: format!(
                        "RoPE scaling {other:?} is not supported (none, linear, and llama3's \
                         rope_freqs tensor are)"
                    ),
                });
            }
        };
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = match g.get(&format!("{arch}.attention.head_count_kv")) {
            Some(_) => u("attention.head_count_kv")?,
            None => n_heads,
        };
        let hidden = u("embedding_length")?;
        let vocab = match g.get(&format!("{arch}.vocab_size")) {
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
            rope_neox,
            rope_scale,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            sliding_window: match g.get(&format!("{arch}.attention.sliding_window")) {
                Some(_) => Some(u("attention.sliding_window")?),
                None => None,
            },
        };
        if !hidden.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
            || !cfg.head_dim().is_multiple_of(2)
            || cfg.head_dim() > 256
        {
            return Err(GgufError::Metadata {
                key: format!("{arch}.attention.head_count"),
                reason: format!(
                    "hidden {hidden}, {n_heads} heads and {n_kv_heads} KV heads do not divide evenly (or the head width exceeds 256)"
                ),
            });
        }
        Ok(cfg)
    }
}
