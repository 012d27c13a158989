//! The one rule book for legal splits of a transformer: which tensor-parallel sizes the worker
//! can load, how KV heads are shared, and how layers go to pipeline stages. The planner calls
//! these to decide what it may plan and the worker calls the same functions when it loads a
//! shard, so a plan the planner calls legal is a plan the worker runs.

/// Width of the blocks the worker's quantized kernels take (Q4_0, Q4_1, Q8_0 weights, and the
/// 8-bit activations they multiply): a row-parallel weight's columns must split into whole
/// blocks on every rank.
pub const BLOCK: u64 = 32;

/// The parts of a model's shape a split depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Transformer layers.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u64,
    /// Feed-forward width.
    pub ffn: u64,
}

/// Why a tensor- or pipeline-parallel size does not fit a model.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SplitError {
    /// TP must be at least 1.
    #[error("tensor parallel must be at least 1")]
    ZeroTensorParallel,
    /// Each rank attends with whole query heads.
    #[error("tensor parallel {tp} does not divide the {heads} attention heads")]
    Heads {
        /// Requested TP.
        tp: u32,
        /// Query heads.
        heads: u32,
    },
    /// KV heads are split evenly, or each is replicated on an equal number of ranks.
    #[error("tensor parallel {tp} and the {kv_heads} KV heads do not divide one another")]
    KvHeads {
        /// Requested TP.
        tp: u32,
        /// KV heads.
        kv_heads: u32,
    },
    /// The attention output projection is split by columns into whole quantization blocks.
    #[error(
        "tensor parallel {tp} leaves {per_rank} attention columns per rank ({heads} heads x {head_dim} / {tp}), not a multiple of the {BLOCK}-wide quantization blocks"
    )]
    AttentionBlocks {
        /// Requested TP.
        tp: u32,
        /// Query heads.
        heads: u32,
        /// Width of one head.
        head_dim: u64,
        /// Columns each rank would hold.
        per_rank: u64,
    },
    /// The FFN down projection is split by columns into whole quantization blocks.
    #[error(
        "tensor parallel {tp} leaves {per_rank} FFN columns per rank ({ffn} / {tp}), not a multiple of the {BLOCK}-wide quantization blocks"
    )]
    FfnBlocks {
        /// Requested TP.
        tp: u32,
        /// FFN width.
        ffn: u64,
        /// Columns each rank would hold (rounded down).
        per_rank: u64,
    },
    /// Every stage runs at least one layer.
    #[error("pipeline parallel {pp} is not between 1 and the {layers} layers")]
    Pipeline {
        /// Requested PP.
        pp: u32,
        /// Layers of the model.
        layers: u32,
    },
}

/// Checks that the worker can load every rank of tensor parallelism `tp`.
pub fn check_tp(shape: &Shape, tp: u32) -> Result<(), SplitError> {
    if tp == 0 {
        return Err(SplitError::ZeroTensorParallel);
    }
    let heads = shape.heads;
    if !heads.is_multiple_of(tp) {
        return Err(SplitError::Heads { tp, heads });
    }
    let kv_heads = shape.kv_heads;
    if kv_heads == 0 || !(kv_heads.is_multiple_of(tp) || tp.is_multiple_of(kv_heads)) {
        return Err(SplitError::KvHeads { tp, kv_heads });
    }
    let per_rank = u64::from(heads / tp) * shape.head_dim;
    if !per_rank.is_multiple_of(BLOCK) {
        return Err(SplitError::AttentionBlocks {
            tp,
            heads,
            head_dim: shape.head_dim,
            per_rank,
        });
    }
    let ffn = shape.ffn;
    if !ffn.is_multiple_of(u64::from(tp) * BLOCK) {
        return Err(SplitError::FfnBlocks {
            tp,
            ffn,
            per_rank: ffn / u64::from(tp),
        });
    }
    Ok(())
}

/// Every legal tensor parallelism, ascending.
pub fn legal_tps(shape: &Shape) -> Vec<u32> {
    (1..=shape.heads)
        .filter(|&tp| check_tp(shape, tp).is_ok())
        .collect()
}

/// Checks a pipeline parallelism: 1 ≤ PP ≤ layers.
pub fn check_pp(shape: &Shape, pp: u32) -> Result<(), SplitError> {
    if pp == 0 || pp > shape.layers {
        return Err(SplitError::Pipeline {
            pp,
            layers: shape.layers,
        });
    }
    Ok(())
}

/// KV heads each tensor-parallel rank holds: KV/TP, or 1 when TP exceeds the KV heads (each KV
/// head is then replicated on TP/KV ranks).
pub fn kv_heads_per_rank(kv_heads: u32, tp: u32) -> u32 {
    (kv_heads / tp.max(1)).max(1)
}

/// Splits `layers` over `pp` stages as evenly as possible, as half-open `[start, end)` ranges.
/// The `layers % pp` extra layers go to stages 1, 2, ... — not stage 0, which also holds the
/// embedding.
pub fn split_layers(layers: u32, pp: u32) -> Vec<[u32; 2]> {
    let pp = pp.max(1);
    let base = layers / pp;
    let extra = layers % pp;
    let mut start = 0;
    (0..pp)
        .map(|s| {
            let n = base + u32::from(s >= 1 && s <= extra);
            let range = [start, start + n];
            start += n;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M: 30 layers, 9 heads of 64, 3 KV heads, FFN 1536.
    const SMOLLM2: Shape = Shape {
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
    };

    #[test]
    fn each_rule_rejects_with_its_reason() {
        assert_eq!(legal_tps(&SMOLLM2), [1, 3]);
        assert_eq!(check_tp(&SMOLLM2, 0), Err(SplitError::ZeroTensorParallel));
        assert_eq!(
            check_tp(&SMOLLM2, 2).unwrap_err().to_string(),
            "tensor parallel 2 does not divide the 9 attention heads"
        );
        // 9 divides the heads and is a multiple of the KV heads, but 1536 / 9 is not whole
        // 32-wide blocks: the rule that made TP 9 plan and then fail to load.
        assert_eq!(
            check_tp(&SMOLLM2, 9).unwrap_err().to_string(),
            "tensor parallel 9 leaves 170 FFN columns per rank (1536 / 9), not a multiple of the 32-wide quantization blocks"
        );
        let gqa = Shape {
            heads: 24,
            kv_heads: 8,
            ..SMOLLM2
        };
        assert_eq!(
            check_tp(&gqa, 12),
            Err(SplitError::KvHeads {
                tp: 12,
                kv_heads: 8
            })
        );
        assert_eq!(
            check_tp(&gqa, 3),
            Err(SplitError::KvHeads { tp: 3, kv_heads: 8 })
        );
        assert_eq!(check_tp(&gqa, 24), Ok(()));
        assert_eq!(
            check_tp(&Shape { ffn: 1000, ..gqa }, 4),
            Err(SplitError::FfnBlocks {
                tp: 4,
                ffn: 1000,
                per_rank: 250
            })
        );
    }

    #[test]
    fn attention_columns_split_into_whole_blocks() {
        // 4 heads of 48: TP 2 leaves 96 columns (3 blocks), TP 4 leaves 48 (not whole).
        let odd = Shape {
            layers: 2,
            heads: 4,
            kv_heads: 4,
            head_dim: 48,
            ffn: 256,
        };
        assert_eq!(check_tp(&odd, 2), Ok(()));
        assert_eq!(
            check_tp(&odd, 4).unwrap_err().to_string(),
            "tensor parallel 4 leaves 48 attention columns per rank (4 heads x 48 / 4), not a multiple of the 32-wide quantization blocks"
        );
        assert_eq!(
            check_tp(&Shape { kv_heads: 0, ..odd }, 1),
            Err(SplitError::KvHeads { tp: 1, kv_heads: 0 })
        );
    }

    #[test]
    fn layers_split_evenly_with_extras_after_stage_0() {
        assert_eq!(split_layers(30, 1), vec![[0, 30]]);
        assert_eq!(split_layers(80, 3), vec![[0, 26], [26, 53], [53, 80]]);
        assert_eq!(split_layers(10, 4), vec![[0, 2], [2, 5], [5, 8], [8, 10]]);
        assert_eq!(check_pp(&SMOLLM2, 30), Ok(()));
        assert_eq!(
            check_pp(&SMOLLM2, 31).unwrap_err().to_string(),
            "pipeline parallel 31 is not between 1 and the 30 layers"
        );
        assert!(check_pp(&SMOLLM2, 0).is_err());
        assert_eq!(kv_heads_per_rank(8, 16), 1);
        assert_eq!(kv_heads_per_rank(8, 4), 2);
        assert_eq!(kv_heads_per_rank(3, 3), 1);
    }
}
