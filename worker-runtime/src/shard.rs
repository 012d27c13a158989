//! Which part of the model this rank owns. Today a rank owns the whole model; the view is shaped
//! so the sharded issue can hand each tensor-parallel rank a row or column slice and each pipeline
//! stage a layer range without changing the forward pass.

use std::ops::Range;

use crate::backend::Weight;
use crate::model::gguf::{Gguf, GgufError};

/// The slice of the model one rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// Transformer blocks this pipeline stage runs.
    pub layers: Range<usize>,
    /// Tensor-parallel rank.
    pub tp_rank: usize,
    /// Tensor-parallel world size.
    pub tp_size: usize,
}

impl ShardSpec {
    /// One rank running all `n_layers` blocks.
    pub fn whole(n_layers: usize) -> Self {
        Self {
            layers: 0..n_layers,
            tp_rank: 0,
            tp_size: 1,
        }
    }

    /// Whether this stage embeds the tokens (the first stage).
    pub fn has_embedding(&self) -> bool {
        self.layers.start == 0
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
}

/// Copy this rank's part of tensor `name` out of the file.
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
    let n = spec.tp_size.max(1);
    let k = spec.tp_rank;
    let uneven = |what: &str, len: usize| GgufError::BadTensor {
        tensor: name.into(),
        offset: t.offset,
        reason: format!("{what} {len} cannot be split evenly over {n} tensor-parallel ranks"),
    };
    Ok(match split {
        _ if n == 1 => Weight {
            data: data.to_vec(),
            ..w
        },
        Split::Replicated => Weight {
            data: data.to_vec(),
            ..w
        },
        Split::Rows => {
            if rows % n != 0 {
                return Err(uneven("rows", rows));
            }
            let per = rows / n;
            Weight {
                rows: per,
                data: data[k * per * rb..(k + 1) * per * rb].to_vec(),
                ..w
            }
        }
        Split::Cols => {
            let be = t.ty.block_elems() as usize;
            if cols % (n * be) != 0 {
                return Err(uneven("columns", cols));
            }
            let per_b = rb / n;
            let mut out = Vec::with_capacity(rows * per_b);
            for r in 0..rows {
                out.extend_from_slice(&data[r * rb + k * per_b..r * rb + (k + 1) * per_b]);
            }
            Weight {
                cols: cols / n,
                data: out,
                ..w
            }
        }
    })
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
