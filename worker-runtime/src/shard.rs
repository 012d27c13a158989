//! Which part of the model this rank owns, derived from the [`Plan`]: a pipeline stage runs a
//! layer range, a tensor-parallel rank holds a row slice (column-parallel Q/K/V, gate, up) or a
//! column slice (row-parallel attention output, down) of each weight. The loader copies only
//! those bytes out of the memory-mapped file, so a rank never holds another rank's weights.

use std::ops::Range;

use whaleflux_crds::Plan;
use whaleflux_crds::split;

use crate::backend::Weight;
use crate::model::config::LlamaConfig;
use crate::model::gguf::{GgmlType, Gguf, GgufError};

/// The slice of the model one rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// Transformer blocks this pipeline stage runs.
    pub layers: Range<usize>,
    /// Tensor-parallel rank.
    pub tp_rank: usize,
    /// Tensor-parallel world size.
    pub tp_size: usize,
    /// This rank embeds the tokens (TP rank 0 of the first stage; it hands the embedded rows to
    /// its tensor-parallel peers).
    pub embedding: bool,
    /// This rank computes the final norm and the output head (TP rank 0 of the last stage).
    pub head: bool,
}

/// Why a plan cannot be turned into a shard of this model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// The plan's stage does not exist.
    #[error("stage {stage} is not in the plan ({stages} stages)")]
    NoStage {
        /// Stage asked for.
        stage: usize,
        /// Stages in the plan.
        stages: usize,
    },
    /// The stage's layer range does not fit the model.
    #[error("stage {stage} runs layers {start}..{end}, but the model has {layers}")]
    Layers {
        /// Stage.
        stage: usize,
        /// First layer.
        start: i32,
        /// End of the range.
        end: i32,
        /// Layers in the model.
        layers: usize,
    },
    /// The plan's tensor- or pipeline-parallel size breaks a rule of [`whaleflux_crds::split`].
    #[error("the plan does not fit the model: {0}")]
    Split(#[from] whaleflux_crds::split::SplitError),
    /// The stage's layers are not the rule book's split ([`split::split_layers`]).
    #[error(
        "stage {stage} runs layers {got:?}, where the split of {layers} layers over {stages} stages gives {want:?}"
    )]
    StageLayers {
        /// Stage.
        stage: usize,
        /// Layers in the plan.
        got: [i32; 2],
        /// Layers the rule book gives.
        want: [u32; 2],
        /// Layers in the model.
        layers: usize,
        /// Stages in the plan.
        stages: usize,
    },
    /// A block weight cannot be sliced for this rank.
    #[error("{tensor}: {reason}")]
    Slice {
        /// Weight name inside the block.
        tensor: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The TP rank is outside the group.
    #[error("tensor-parallel rank {rank} is outside tensorParallel {tp}")]
    Rank {
        /// Rank.
        rank: usize,
        /// TP size.
        tp: usize,
    },
}

impl ShardSpec {
    /// One rank running all `n_layers` blocks.
    pub fn whole(n_layers: usize) -> Self {
        Self {
            layers: 0..n_layers,
            tp_rank: 0,
            tp_size: 1,
            embedding: true,
            head: true,
        }
    }

    /// The shard of (`stage`, `tp_rank`) in `plan` for a model of shape `cfg`; checks the split
    /// by the rule book the planner uses ([`split::check_tp`]).
    pub fn from_plan(
        plan: &Plan,
        stage: usize,
        tp_rank: usize,
        cfg: &LlamaConfig,
    ) -> Result<Self, ShardError> {
        let st = plan.stages.get(stage).ok_or(ShardError::NoStage {
            stage,
            stages: plan.stages.len(),
        })?;
        let [start, end] = st.layers;
        if start < 0 || end < start || end as usize > cfg.n_layers {
            return Err(ShardError::Layers {
                stage,
                start,
                end,
                layers: cfg.n_layers,
            });
        }
        let shape = cfg.split_shape();
        let tp = u32::try_from(plan.tensor_parallel).unwrap_or(0);
        split::check_tp(&shape, tp)?;
        let stages = plan.stages.len();
        split::check_pp(&shape, stages as u32)?;
        let want = split::split_layers(shape.layers, stages as u32)[stage];
        if [start as u32, end as u32] != want {
            return Err(ShardError::StageLayers {
                stage,
                got: st.layers,
                want,
                layers: cfg.n_layers,
                stages,
            });
        }
        let tp = tp as usize;
        if tp_rank >= tp {
            return Err(ShardError::Rank { rank: tp_rank, tp });
        }
        Ok(Self {
            layers: start as usize..end as usize,
            tp_rank,
            tp_size: tp,
            embedding: stage == 0 && tp_rank == 0,
            head: stage + 1 == plan.stages.len() && tp_rank == 0,
        })
    }

    /// Whether this stage embeds the tokens.
    pub fn has_embedding(&self) -> bool {
        self.embedding
    }

    /// Query heads this rank attends with.
    pub fn local_heads(&self, n_heads: usize) -> usize {
        n_heads / self.tp_size.max(1)
    }

    /// KV heads this rank holds: its share when they split evenly, else one replicated head.
    pub fn local_kv_heads(&self, n_kv_heads: usize) -> usize {
        (n_kv_heads / self.tp_size.max(1)).max(1)
    }

    /// How this rank takes the K and V projections: split by rows like Q, or (more ranks than
    /// KV heads) the one KV head its query heads use, replicated over `tp / kv_heads` ranks.
    pub fn kv_split(&self, n_kv_heads: usize) -> Split {
        let tp = self.tp_size.max(1);
        if n_kv_heads.is_multiple_of(tp) {
            Split::Rows
        } else {
            Split::RowBlock {
                index: self.tp_rank / (tp / n_kv_heads),
                count: n_kv_heads,
            }
        }
    }
}

/// How a weight is divided between tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole tensor (norms, embeddings).
    Replicated,
    /// Output features are divided (Q/K/V, gate, up).
    Rows,
    /// Input features are divided (attention output, down).
    Cols,
    /// Block `index` of `count` equal row blocks (a replicated KV head).
    RowBlock {
        /// Block taken.
        index: usize,
        /// Blocks the rows divide into.
        count: usize,
    },
}

/// How a rank keeps the weights it loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As encoded in the file: quantized matmuls against activations rounded to 8 bits per
    /// 32-wide block. The serving path.
    #[default]
    AsStored,
    /// Each rank dequantizes its own slice to f32 after sharding, so every matmul runs in f32
    /// with f32 activations. A reference path for checking that a sharded group computes what
    /// one rank computes (tight tolerances); it holds 4 bytes per weight and runs slower.
    F32,
}

/// Options for loading a rank's weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep the file's encoding or dequantize to f32.
    pub weights: WeightFormat,
}

impl LoadOptions {
    /// The f32 reference path ([`WeightFormat::F32`]).
    pub fn f32() -> Self {
        Self {
            weights: WeightFormat::F32,
        }
    }
}

/// `w` decoded to f32 (row by row, so only this rank's slice is ever expanded).
pub fn dequantize_weight(w: &Weight) -> Weight {
    if w.ty == GgmlType::F32 {
        return w.clone();
    }
    let mut row = vec![0f32; w.cols];
    let mut data = Vec::with_capacity(w.rows * w.cols * 4);
    for r in 0..w.rows {
        w.dequantize_row(r, &mut row);
        data.extend(row.iter().flat_map(|v| v.to_le_bytes()));
    }
    Weight {
        ty: GgmlType::F32,
        rows: w.rows,
        cols: w.cols,
        data,
    }
}

/// [`load_weight`], then converted to `format`.
pub fn load_weight_as(
    g: &Gguf,
    name: &str,
    spec: &ShardSpec,
    split: Split,
    format: WeightFormat,
) -> Result<Weight, GgufError> {
    let w = load_weight(g, name, spec, split)?;
    Ok(match format {
        WeightFormat::AsStored => w,
        WeightFormat::F32 => dequantize_weight(&w),
    })
}

/// Copy this rank's part of tensor `name` out of the file. Only the bytes of the slice are
/// read from the mapping; the rest of the tensor is never touched.
pub fn load_weight(
    g: &Gguf,
    name: &str,
    spec: &ShardSpec,
    split: Split,
) -> Result<Weight, GgufError> {
    let t = g.tensor(name).ok_or_else(|| GgufError::BadTensor {
        tensor: name.into(),
        offset: 0,
        reason: "missing from the file".into(),
    })?;
    if t.dims.len() > 2 {
        return Err(GgufError::BadTensor {
            tensor: name.into(),
            offset: t.offset,
            reason: format!("expected a matrix or vector, found dims {:?}", t.dims),
        });
    }
    let (rows, cols) = (t.rows() as usize, t.cols() as usize);
    let data = g.tensor_data(t);
    let w = Weight {
        ty: t.ty,
        rows,
        cols,
        data: Vec::new(),
    };
    let rb = w.row_bytes();
    let (local_rows, local_cols) = slice_dims(rows, cols, t.ty.block_elems() as usize, spec, split)
        .map_err(|reason| GgufError::BadTensor {
            tensor: name.into(),
            offset: t.offset,
            reason,
        })?;
    let n = spec.tp_size.max(1);
    let k = spec.tp_rank;
    let row_block = |index: usize| Weight {
        ty: t.ty,
        rows: local_rows,
        cols,
        data: data[index * local_rows * rb..(index + 1) * local_rows * rb].to_vec(),
    };
    Ok(match split {
        Split::Replicated => Weight {
            data: data.to_vec(),
            ..w
        },
        _ if n == 1 => Weight {
            data: data.to_vec(),
            ..w
        },
        Split::Rows => row_block(k),
        Split::RowBlock { index, .. } => row_block(index),
        Split::Cols => {
            let per_b = rb / n;
            let mut out = Vec::with_capacity(rows * per_b);
            for r in 0..rows {
                out.extend_from_slice(&data[r * rb + k * per_b..r * rb + (k + 1) * per_b]);
            }
            Weight {
                cols: local_cols,
                data: out,
                ..w
            }
        }
    })
}

/// The rows of a `rows`-row tensor split by `split` that this rank takes (all of them for
/// `Replicated` and `Cols`): also how a bias follows its weight's rows.
pub fn local_rows(rows: usize, spec: &ShardSpec, split: Split) -> std::ops::Range<usize> {
    let n = spec.tp_size.max(1);
    match split {
        Split::Rows if n > 1 => {
            let l = rows / n;
            spec.tp_rank * l..(spec.tp_rank + 1) * l
        }
        Split::RowBlock { index, count } if n > 1 => {
            let l = rows / count;
            index * l..(index + 1) * l
        }
        _ => 0..rows,
    }
}

/// The `(rows, cols)` this rank takes of a `rows x cols` tensor stored in blocks of
/// `block_elems` along a row, split by `split`; or why it cannot be split. The loader and the
/// shape check ([`check_shapes`]) both use it.
pub fn slice_dims(
    rows: usize,
    cols: usize,
    block_elems: usize,
    spec: &ShardSpec,
    split: Split,
) -> Result<(usize, usize), String> {
    let n = spec.tp_size.max(1);
    let uneven = |what: &str, len: usize, parts: usize| {
        format!("{what} {len} cannot be split evenly into {parts} tensor-parallel parts")
    };
    match split {
        Split::Replicated => Ok((rows, cols)),
        _ if n == 1 => Ok((rows, cols)),
        Split::Rows if rows.is_multiple_of(n) => Ok((rows / n, cols)),
        Split::Rows => Err(uneven("rows", rows, n)),
        Split::RowBlock { index, count } => {
            if count == 0 || !rows.is_multiple_of(count) || index >= count {
                Err(uneven("rows", rows, count))
            } else {
                Ok((rows / count, cols))
            }
        }
        Split::Cols if cols.is_multiple_of(n * block_elems.max(1)) => Ok((rows, cols / n)),
        Split::Cols => Err(uneven("columns", cols, n)),
    }
}

/// One weight matrix of a transformer block: its GGUF name suffix, how tensor-parallel ranks
/// divide it, its full `(rows, cols)` and the `(rows, cols)` this rank must end up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockWeight {
    /// Name inside `blk.N.` (without `.weight`).
    pub name: &'static str,
    /// How ranks divide it.
    pub split: Split,
    /// Shape in the file.
    pub full: (usize, usize),
    /// Shape this rank holds.
    pub local: (usize, usize),
}

/// The weight matrices of every block as rank `spec` loads them (the loader's one table).
pub fn block_weights(c: &LlamaConfig, spec: &ShardSpec) -> [BlockWeight; 7] {
    let hd = c.head_dim();
    let tp = spec.tp_size.max(1);
    let kv_split = spec.kv_split(c.n_kv_heads);
    let kv_rows = spec.local_kv_heads(c.n_kv_heads) * hd;
    let q = c.n_heads * hd;
    let w = |name, split, full, local| BlockWeight {
        name,
        split,
        full,
        local,
    };
    [
        w("attn_q", Split::Rows, (q, c.hidden), (q / tp, c.hidden)),
        w(
            "attn_k",
            kv_split,
            (c.n_kv_heads * hd, c.hidden),
            (kv_rows, c.hidden),
        ),
        w(
            "attn_v",
            kv_split,
            (c.n_kv_heads * hd, c.hidden),
            (kv_rows, c.hidden),
        ),
        w(
            "attn_output",
            Split::Cols,
            (c.hidden, q),
            (c.hidden, q / tp),
        ),
        w(
            "ffn_gate",
            Split::Rows,
            (c.ffn, c.hidden),
            (c.ffn / tp, c.hidden),
        ),
        w(
            "ffn_up",
            Split::Rows,
            (c.ffn, c.hidden),
            (c.ffn / tp, c.hidden),
        ),
        w(
            "ffn_down",
            Split::Cols,
            (c.hidden, c.ffn),
            (c.hidden, c.ffn / tp),
        ),
    ]
}

/// Checks, without reading any weight, that rank (`stage`, `tp_rank`) of `plan` loads from a
/// model of shape `cfg` stored as `ty`: the split rules, then every block weight's slice.
pub fn check_shapes(
    plan: &Plan,
    stage: usize,
    tp_rank: usize,
    cfg: &LlamaConfig,
    ty: GgmlType,
) -> Result<ShardSpec, ShardError> {
    let spec = ShardSpec::from_plan(plan, stage, tp_rank, cfg)?;
    for bw in block_weights(cfg, &spec) {
        let got = slice_dims(
            bw.full.0,
            bw.full.1,
            ty.block_elems() as usize,
            &spec,
            bw.split,
        )
        .map_err(|reason| ShardError::Slice {
            tensor: bw.name,
            reason,
        })?;
        if got != bw.local {
            return Err(ShardError::Slice {
                tensor: bw.name,
                reason: format!("slice {got:?} where the rank needs {:?}", bw.local),
            });
        }
    }
    Ok(spec)
}

/// A plan of `tp` x `pp` ranks for a model of `n_layers`, with the planner's layer split (the
/// extra layers go to stages 1, 2, ...). Used where a fixed split is run without the planner: the
/// benchmark and in-process groups.
pub fn fixed_plan(model: &str, n_layers: usize, tp: usize, pp: usize) -> Plan {
    let pp = pp.clamp(1, n_layers.max(1));
    let stages = split::split_layers(n_layers as u32, pp as u32)
        .into_iter()
        .enumerate()
        .map(|(s, [start, end])| whaleflux_crds::StagePlan {
            index: s as i32,
            layers: [start as i32, end as i32],
            node: "local".into(),
            gpus: tp as i32,
            embedding: s == 0,
            head: s + 1 == pp,
        })
        .collect();
    Plan {
        model: model.into(),
        dtype: whaleflux_crds::WeightDtype::default(),
        gpu_model: "cpu".into(),
        objective: whaleflux_crds::Objective::default(),
        tensor_parallel: tp as i32,
        pipeline_parallel: pp as i32,
        replicas: 1,
        gpus_per_replica: (tp * pp) as i32,
        crosses_nodes: false,
        stages,
        groups: Vec::new(),
        memory_per_gpu_bytes: Default::default(),
        estimate: Default::default(),
        notes: Vec::new(),
        rejected: Vec::new(),
    }
}

/// Read a 1-D tensor (a norm) as f32.
pub fn load_vector(g: &Gguf, name: &str, spec: &ShardSpec) -> Result<Vec<f32>, GgufError> {
    let w = load_weight(g, name, spec, Split::Replicated)?;
    let mut out = vec![0f32; w.rows * w.cols];
    for (r, o) in out.chunks_exact_mut(w.cols).enumerate() {
        w.dequantize_row(r, o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv: usize) -> LlamaConfig {
        LlamaConfig {
            n_layers: 30,
            hidden: 576,
            n_heads: heads,
            n_kv_heads: kv,
            ffn: 1536,
            vocab: 100,
            context: 2048,
            rope_base: 10000.0,
            rope_scale: 1.0,
            rope_neox: false,
            rms_eps: 1e-5,
            sliding_window: None,
        }
    }

    fn spec(rank: usize, tp: usize) -> ShardSpec {
        ShardSpec {
            layers: 0..1,
            tp_rank: rank,
            tp_size: tp,
            embedding: false,
            head: false,
        }
    }

    #[test]
    fn kv_heads_split_when_they_divide_and_replicate_when_tp_is_larger() {
        // 3 KV heads over 3 ranks: one each, split by rows.
        assert_eq!(spec(1, 3).kv_split(3), Split::Rows);
        assert_eq!(spec(1, 3).local_kv_heads(3), 1);
        // 4 KV heads over 8 ranks: ranks 2 and 3 share KV head 1.
        assert_eq!(
            spec(3, 8).kv_split(4),
            Split::RowBlock { index: 1, count: 4 }
        );
        assert_eq!(spec(3, 8).local_kv_heads(4), 1);
        assert_eq!(spec(3, 8).local_heads(32), 4);
    }

    #[test]
    fn plan_stages_map_to_layer_ranges_embedding_and_head() {
        let mut plan = fixed_plan("m", 30, 3, 2);
        assert_eq!(fixed_plan("m", 30, 1, 4).stages[1].layers, [7, 15]);
        let c = cfg(9, 3);
        let s = ShardSpec::from_plan(&plan, 1, 0, &c).expect("shard");
        assert_eq!(s.layers, 15..30);
        assert!(s.head && !s.embedding);
        let s = ShardSpec::from_plan(&plan, 0, 2, &c).expect("shard");
        assert!(!s.head && !s.embedding);
        assert_eq!(
            ShardSpec::from_plan(&plan, 0, 3, &c),
            Err(ShardError::Rank { rank: 3, tp: 3 })
        );
        plan.tensor_parallel = 2;
        assert_eq!(
            ShardSpec::from_plan(&plan, 0, 0, &c),
            Err(ShardError::Split(
                whaleflux_crds::split::SplitError::Heads { tp: 2, heads: 9 }
            ))
        );
        plan.stages[1].layers = [15, 31];
        plan.tensor_parallel = 1;
        assert!(matches!(
            ShardSpec::from_plan(&plan, 1, 0, &c),
            Err(ShardError::Layers { .. })
        ));
        plan.stages[1].layers = [14, 30];
        assert_eq!(
            ShardSpec::from_plan(&plan, 1, 0, &c)
                .unwrap_err()
                .to_string(),
            "stage 1 runs layers [14, 30], where the split of 30 layers over 2 stages gives [15, 30]"
        );
    }
}
