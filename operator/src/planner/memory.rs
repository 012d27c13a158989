//! Memory per GPU of one pipeline stage: its share of the weights, the KV cache the serving
//! limits need, activations of one forward step, and a fixed runtime overhead.

use whaleflux_crds::{MemoryBreakdown, WeightDtype};

use super::Model;
use super::legality::kv_heads_per_rank;

/// Where a stage sits in the pipeline and how wide its tensor-parallel group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageShape {
    /// Tensor-parallel ranks of the stage.
    pub tp: u32,
    /// Pipeline stages in total.
    pub pp: u32,
    /// Transformer layers on this stage.
    pub layers: u32,
    /// Stage 0: holds the token embedding.
    pub first: bool,
    /// Last stage: holds the final norm and output head.
    pub last: bool,
}

/// Tokens one forward step processes at most: chunked prefill of up to this many tokens.
pub const PREFILL_CHUNK_TOKENS: u64 = 2048;
/// Bytes per activation element (bf16 compute).
const ACTIVATION_BYTES: u64 = 2;
/// CUDA context, cuBLAS workspace and allocator slack of every worker.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 1 << 30;
/// NCCL buffers of a worker that talks to peers (TP or PP > 1).
pub const COMM_OVERHEAD_BYTES: u64 = 512 << 20;

/// Weight bytes one rank of a stage holds, split into the transformer layers and the
/// embedding/head part (which decode reads differently).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageWeights {
    /// Bytes of this rank's slice of the stage's layers.
    pub layers: f64,
    /// Bytes of this rank's slice of the token embedding (first stage).
    pub embedding: f64,
    /// Bytes of this rank's slice of the output head and final norm (last stage).
    pub head: f64,
}

impl StageWeights {
    /// All weight bytes of the rank.
    pub fn total(&self) -> f64 {
        self.layers + self.embedding + self.head
    }
}

/// Parameters of one layer held by one rank: 1/TP of Q, O and the MLP, this rank's KV heads
/// (replicated when TP exceeds them), and the norms in full.
pub fn layer_params_per_rank(model: &Model, tp: u32) -> u64 {
    let hd = model.head_dim();
    let q_heads = u64::from(model.heads / tp);
    let kv = u64::from(kv_heads_per_rank(model, tp));
    let ffn = model.ffn.div_ceil(u64::from(tp));
    2 * model.hidden * q_heads * hd
        + 2 * model.hidden * kv * hd
        + 3 * model.hidden * ffn
        + 2 * model.hidden
}

/// Weight bytes of one rank of a stage. The embedding and head are split over the TP ranks
/// (vocabulary-parallel); a tied head costs nothing extra when PP = 1 and is a second copy on
/// the last stage otherwise.
pub fn stage_weights(model: &Model, dtype: WeightDtype, s: StageShape) -> StageWeights {
    let bpp = dtype.bytes_per_param();
    let tp = u64::from(s.tp);
    let emb = model.embedding_params().div_ceil(tp) as f64 * bpp;
    let layers = (u64::from(s.layers) * layer_params_per_rank(model, s.tp)) as f64 * bpp;
    let embedding = if s.first { emb } else { 0.0 };
    let head = if s.last {
        let norm = model.hidden as f64 * bpp;
        if model.tied && s.pp == 1 {
            norm
        } else {
            emb + norm
        }
    } else {
        0.0
    };
    StageWeights {
        layers,
        embedding,
        head,
    }
}

/// KV-cache bytes one rank reserves: 2 (K and V) · layers · KV heads on the rank · head_dim ·
/// bytes per element · max context · max sequences. Saturates at [`MAX_PART_BYTES`] so absurd
/// serving limits are rejected as not fitting rather than overflowing.
pub fn kv_cache_bytes(
    model: &Model,
    s: StageShape,
    kv_bytes: u64,
    max_context: u64,
    max_sequences: u64,
) -> u64 {
    let bytes = 2u128
        * u128::from(s.layers)
        * u128::from(kv_heads_per_rank(model, s.tp))
        * u128::from(model.head_dim())
        * u128::from(kv_bytes)
        * u128::from(max_context)
        * u128::from(max_sequences);
    bytes.min(u128::from(MAX_PART_BYTES)) as u64
}

/// Upper bound of one memory part, so the sum of the parts never overflows an i64.
pub const MAX_PART_BYTES: u64 = (i64::MAX / 8) as u64;

/// Activation bytes of one forward step on one rank: per token the residual and normed input,
/// this rank's Q/K/V and attention output, its gate and up projections; plus f32 logits for
/// the last token of every sequence on the last stage. Attention scores are not materialised
/// (flash attention). Assumes chunked prefill of up to [`PREFILL_CHUNK_TOKENS`].
pub fn activation_bytes(model: &Model, s: StageShape, max_context: u64, max_sequences: u64) -> u64 {
    if s.layers == 0 && !s.last {
        return 0;
    }
    let tp = u64::from(s.tp);
    let hd = model.head_dim();
    let tokens = max_context.min(PREFILL_CHUNK_TOKENS).max(max_sequences);
    let q = u64::from(model.heads) / tp * hd;
    let kv = u64::from(kv_heads_per_rank(model, s.tp)) * hd;
    let per_token = 2 * model.hidden + 2 * q + 2 * kv + 2 * model.ffn.div_ceil(tp);
    let logits = if s.last {
        u128::from(max_sequences) * u128::from(model.vocab.div_ceil(tp)) * 4
    } else {
        0
    };
    let bytes = u128::from(tokens) * u128::from(per_token) * u128::from(ACTIVATION_BYTES) + logits;
    bytes.min(u128::from(MAX_PART_BYTES)) as u64
}

/// Runtime overhead of one worker: the CUDA context and allocator slack, plus communication
/// buffers when it has peers.
pub fn overhead_bytes(tp: u32, pp: u32) -> u64 {
    if tp * pp > 1 {
        RUNTIME_OVERHEAD_BYTES + COMM_OVERHEAD_BYTES
    } else {
        RUNTIME_OVERHEAD_BYTES
    }
}

/// The full breakdown of one stage's GPU, with `usable` the memory a plan may use.
#[allow(clippy::too_many_arguments)]
pub fn stage_memory(
    model: &Model,
    dtype: WeightDtype,
    s: StageShape,
    kv_bytes: u64,
    max_context: u64,
    max_sequences: u64,
    usable: u64,
) -> MemoryBreakdown {
    let weights = stage_weights(model, dtype, s)
        .total()
        .ceil()
        .min(MAX_PART_BYTES as f64) as i64;
    let kv_cache = kv_cache_bytes(model, s, kv_bytes, max_context, max_sequences) as i64;
    let activations = activation_bytes(model, s, max_context, max_sequences) as i64;
    let overhead = overhead_bytes(s.tp, s.pp) as i64;
    MemoryBreakdown {
        weights,
        kv_cache,
        activations,
        overhead,
        total: weights + kv_cache + activations + overhead,
        usable: usable as i64,
    }
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::models::{preset, tiny};

    fn whole(tp: u32, pp: u32, layers: u32) -> StageShape {
        StageShape {
            tp,
            pp,
            layers,
            first: true,
            last: true,
        }
    }

    #[test]
    fn llama_70b_weights_are_about_141_gb_in_bf16() {
        let m = preset("llama-3.1-70b").expect("preset");
        let w = stage_weights(&m, WeightDtype::Bf16, whole(1, 1, 80)).total();
        assert!((w / 1e9 - 141.1).abs() < 1.0, "{}", w / 1e9);
        // TP 8 holds an eighth of every matrix.
        let w8 = stage_weights(&m, WeightDtype::Bf16, whole(8, 1, 80)).total();
        assert!((w / w8 - 8.0).abs() < 0.05, "{}", w / w8);
    }

    #[test]
    fn tied_head_is_a_second_copy_only_when_pipelined() {
        let m = preset("smollm2-135m").expect("preset");
        let one = stage_weights(&m, WeightDtype::Bf16, whole(1, 1, 30));
        let last = stage_weights(
            &m,
            WeightDtype::Bf16,
            StageShape {
                tp: 1,
                pp: 2,
                layers: 15,
                first: false,
                last: true,
            },
        );
        let emb = (m.embedding_params() * 2) as f64;
        assert_eq!(one.embedding, emb);
        assert!(one.head < 10_000.0);
        assert!(last.head > emb);
        assert_eq!(last.embedding, 0.0);
    }

    fn stage(tp: u32, pp: u32, first: bool, last: bool) -> StageShape {
        StageShape {
            tp,
            pp,
            layers: 2,
            first,
            last,
        }
    }

    #[test]
    fn weights_per_rank_by_hand() {
        let m = tiny(false);
        // Q and O 2·64·(4/TP)·16, K and V 2·64·max(2/TP, 1)·16, MLP 3·64·96/TP, norms 2·64.
        assert_eq!(layer_params_per_rank(&m, 1), 8192 + 4096 + 18432 + 128);
        assert_eq!(layer_params_per_rank(&m, 2), 4096 + 2048 + 9216 + 128);
        assert_eq!(layer_params_per_rank(&m, 4), 2048 + 2048 + 4608 + 128);
        // bf16, TP 2: layers 2·15,488·2 bytes; embedding 100·64/2·2; head the same plus the norm.
        let w = stage_weights(&m, WeightDtype::Bf16, stage(2, 1, true, true));
        assert_eq!(
            w,
            StageWeights {
                layers: 61_952.0,
                embedding: 6_400.0,
                head: 6_528.0
            }
        );
        assert_eq!(w.total(), 74_880.0);
        let q = stage_weights(&m, WeightDtype::Q4_1, stage(2, 1, true, true));
        assert_eq!(q.layers, 61_952.0 / 2.0 * 0.625);
        // Middle stages hold neither end; the first no head, the last no embedding.
        let mid = stage_weights(&m, WeightDtype::Bf16, stage(2, 3, false, false));
        assert_eq!((mid.embedding, mid.head), (0.0, 0.0));
        let first = stage_weights(&m, WeightDtype::Bf16, stage(2, 2, true, false));
        assert_eq!((first.embedding, first.head), (6_400.0, 0.0));
        // Tied: the head is the embedding (only the norm is extra) unless another stage holds it.
        let t = tiny(true);
        assert_eq!(
            stage_weights(&t, WeightDtype::Bf16, stage(2, 1, true, true)).head,
            128.0
        );
        let last = stage_weights(&t, WeightDtype::Bf16, stage(2, 2, false, true));
        assert_eq!((last.embedding, last.head), (0.0, 6_528.0));
    }

    #[test]
    fn kv_cache_and_activations_by_hand() {
        let m = tiny(false);
        // 2 · 2 layers · 1 KV head · 16 · 2 bytes · 1000 · 3.
        assert_eq!(
            kv_cache_bytes(&m, stage(2, 1, true, true), 2, 1000, 3),
            384_000
        );
        assert_eq!(
            kv_cache_bytes(&m, stage(2, 1, true, true), 2, 1 << 31, 1 << 31),
            MAX_PART_BYTES
        );
        // Per token at TP 2: residual and normed input 2·64, Q and attention output 2·32, K and
        // V 2·16, gate and up 2·48 = 320 elements of 2 bytes; tokens = min(context, 2048) or
        // the sequences if more; logits 3 sequences · 50 · 4 bytes on the last stage.
        let act = |s, ctx, seqs| activation_bytes(&m, s, ctx, seqs);
        assert_eq!(act(stage(2, 1, true, true), 1000, 3), 640_000 + 600);
        assert_eq!(act(stage(2, 2, true, false), 1000, 3), 640_000);
        assert_eq!(act(stage(2, 1, true, true), 5000, 3), 2048 * 640 + 600);
        assert_eq!(
            act(stage(2, 1, true, true), 1000, 3000),
            3000 * 640 + 600_000
        );
        let empty = StageShape {
            layers: 0,
            ..stage(2, 2, false, false)
        };
        assert_eq!(act(empty, 1000, 3), 0);
        let head_only = StageShape {
            layers: 0,
            ..stage(2, 2, false, true)
        };
        assert_eq!(act(head_only, 1000, 3), 640_600);
        assert_eq!(overhead_bytes(1, 1), RUNTIME_OVERHEAD_BYTES);
        assert_eq!(
            overhead_bytes(2, 1),
            RUNTIME_OVERHEAD_BYTES + COMM_OVERHEAD_BYTES
        );
        assert_eq!(
            overhead_bytes(1, 2),
            RUNTIME_OVERHEAD_BYTES + COMM_OVERHEAD_BYTES
        );
        let b = stage_memory(
            &m,
            WeightDtype::Bf16,
            stage(2, 1, true, true),
            2,
            1000,
            3,
            1 << 32,
        );
        assert_eq!(
            (b.weights, b.kv_cache, b.activations, b.usable),
            (74_880, 384_000, 640_600, 1 << 32)
        );
        assert_eq!(
            b.total,
            74_880 + 384_000 + 640_600 + (RUNTIME_OVERHEAD_BYTES + COMM_OVERHEAD_BYTES) as i64
        );
        assert_eq!(gib((3u64 << 30) as f64), 3.0);
    }

    #[test]
    fn kv_cache_follows_the_formula() {
        let m = preset("llama-3.1-8b").expect("preset");
        // 2 · 32 layers · 8 KV heads · 128 · 2 bytes · 8192 · 16 = 17,179,869,184
        assert_eq!(
            kv_cache_bytes(&m, whole(1, 1, 32), 2, 8192, 16),
            17_179_869_184
        );
        // TP 16 > 8 KV heads: one (replicated) head per rank.
        assert_eq!(
            kv_cache_bytes(&m, whole(16, 1, 32), 2, 8192, 16),
            17_179_869_184 / 8
        );
    }
}
