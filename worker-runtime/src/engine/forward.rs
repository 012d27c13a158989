//! Llama forward pass (RMSNorm, RoPE in GGUF's interleaved-pair form, grouped-query attention with
//! a KV cache, SwiGLU) over a batch of sequences, each contributing one or more tokens.

use std::ops::Range;

use crate::backend::cpu::{DotOrder, RopeFreqs, attend, attend_f32, swiglu_fast};
use crate::backend::{Backend, Weight};
use crate::comm::{Collective, CommError};
use crate::model::config::LlamaConfig;
use crate::model::gguf::{Gguf, GgufError};
use crate::shard::{
    LoadOptions, ShardSpec, Split, WeightFormat, block_weights, load_vector, load_weight_as,
    local_rows,
};

/// Errors loading model weights.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or its metadata is unusable.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tensor has a shape that does not match the config.
    #[error("tensor {tensor:?} has shape {got:?}, expected {want:?}")]
    Shape {
        tensor: String,
        got: (usize, usize),
        want: (usize, usize),
    },
}

/// Projections of the same input (Q/K/V, gate/up) run as one matmul when their encodings match,
/// which halves thread dispatches and activation quantization per layer. The fused matrix
/// takes over the parts' bytes, so the weights are held once.
struct Fused {
    /// The projections; only their shapes once `fused` holds the bytes.
    parts: Vec<Weight>,
    fused: Option<Weight>,
}

impl Fused {
    fn new(mut parts: Vec<Weight>) -> Self {
        let same = parts
            .windows(2)
            .all(|p| p[0].ty == p[1].ty && p[0].cols == p[1].cols);
        let fused = (same && !parts.is_empty()).then(|| {
            let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
            for p in &mut parts {
                data.extend_from_slice(&p.data);
                p.data = Vec::new();
            }
            Weight {
                ty: parts[0].ty,
                rows: parts.iter().map(|p| p.rows).sum(),
                cols: parts[0].cols,
                data,
            }
        });
        Self { parts, fused }
    }

    /// Bytes of weights held.
    fn bytes(&self) -> usize {
        match &self.fused {
            Some(f) => f.data.len(),
            None => self.parts.iter().map(|w| w.data.len()).sum(),
        }
    }

    /// `outs[i]` receives `x · parts[i]ᵀ` (`n × parts[i].rows`).
    fn apply(
        &self,
        be: &dyn Backend,
        x: &[f32],
        n: usize,
        tmp: &mut Vec<f32>,
        outs: &mut [&mut Vec<f32>],
    ) {
        match &self.fused {
            Some(f) => {
                tmp.resize(n * f.rows, 0.0);
                be.matmul(f, x, n, tmp);
                let mut col = 0;
                for (p, out) in self.parts.iter().zip(outs.iter_mut()) {
                    for t in 0..n {
                        out[t * p.rows..(t + 1) * p.rows]
                            .copy_from_slice(&tmp[t * f.rows + col..t * f.rows + col + p.rows]);
                    }
                    col += p.rows;
                }
            }
            None => {
                for (p, out) in self.parts.iter().zip(outs.iter_mut()) {
                    be.matmul(p, x, n, out);
                }
            }
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Fused,
    /// This rank's slices of the Q, K and V biases (Qwen2), if the file has them.
    qkv_bias: Option<[Vec<f32>; 3]>,
    wo: Weight,
    ffn_norm: Vec<f32>,
    gate_up: Fused,
    down: Weight,
}

/// The weights of one stage of a llama model.
pub struct LlamaModel {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// What this rank owns.
    pub spec: ShardSpec,
    embd: Weight,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Weight,
    kv_type: KvType,
    rope: RopeFreqs,
}

pub use super::kv_cache::{KvCache, KvLayer, KvType};

/// One sequence's share of a stage's batch when the rows arrive as activations (every stage
/// but the first, and the tensor-parallel peers of the first).
pub struct StageSeq<'a> {
    /// New rows, appended after what `cache` holds.
    pub n: usize,
    /// The sequence's cache on this rank.
    pub cache: &'a mut KvCache,
}

/// One sequence's share of a forward batch.
pub struct SeqInput<'a> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub cache: &'a mut KvCache,
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    crate::backend::cpu::rms_norm(x, w, eps, out);
}

/// Placeholder for a matrix this rank does not hold (embedding or head of another stage).
fn no_weight(cols: usize) -> Weight {
    Weight {
        ty: crate::model::gguf::GgmlType::F32,
        rows: 0,
        cols,
        data: Vec::new(),
    }
}

struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint ranges from parallel tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl LlamaModel {
    /// Load this rank's weights from a parsed GGUF file, as stored.
    pub fn load(g: &Gguf, spec: ShardSpec) -> Result<Self, LoadError> {
        Self::load_with(g, spec, LoadOptions::default())
    }

    /// Load this rank's weights, in the format `opts` asks for (f32 for the reference path).
    pub fn load_with(g: &Gguf, spec: ShardSpec, opts: LoadOptions) -> Result<Self, LoadError> {
        let fmt = opts.weights;
        let config = LlamaConfig::from_gguf(g)?;
        let c = &config;
        let check = |w: Weight, name: &str, want: (usize, usize)| -> Result<Weight, LoadError> {
            if (w.rows, w.cols) != want {
                return Err(LoadError::Shape {
                    tensor: name.into(),
                    got: (w.rows, w.cols),
                    want,
                });
            }
            Ok(w)
        };
        let vec = |name: &str, len: usize| -> Result<Vec<f32>, LoadError> {
            let v = load_vector(g, name, &spec)?;
            if v.len() != len {
                return Err(LoadError::Shape {
                    tensor: name.into(),
                    got: (1, v.len()),
                    want: (1, len),
                });
            }
            Ok(v)
        };
        let mut layers = Vec::new();
        for l in spec.layers.clone() {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let blocks = block_weights(c, &spec);
            let bias = |i: usize| -> Result<Option<Vec<f32>>, LoadError> {
                let (bw, name) = (&blocks[i], format!("blk.{l}.{}.bias", blocks[i].name));
                if g.tensor(&name).is_none() {
                    return Ok(None);
                }
                let full = vec(&name, bw.full.0)?;
                Ok(Some(full[local_rows(bw.full.0, &spec, bw.split)].to_vec()))
            };
            let qkv_bias = match (bias(0)?, bias(1)?, bias(2)?) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                (None, None, None) => None,
                _ => {
                    return Err(GgufError::BadTensor {
                        tensor: format!("blk.{l}.attn_q.bias"),
                        offset: 0,
                        reason: "Q, K and V biases come together: the file has some of the \
                                 three, not all"
                            .into(),
                    }
                    .into());
                }
            };
            let [q, k, v, o, gate, up, down] = blocks.map(|bw| {
                let name = n(bw.name);
                check(
                    load_weight_as(g, &name, &spec, bw.split, fmt)?,
                    &name,
                    bw.local,
                )
            });
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm"), c.hidden)?,
                qkv: Fused::new(vec![q?, k?, v?]),
                qkv_bias,
                wo: o?,
                ffn_norm: vec(&n("ffn_norm"), c.hidden)?,
                gate_up: Fused::new(vec![gate?, up?]),
                down: down?,
            });
        }
        let tied = g.tensor("output.weight").is_none();
        // A tied output head is the embedding matrix, so the last stage loads it too.
        let embd = if spec.embedding || (spec.head && tied) {
            check(
                load_weight_as(g, "token_embd.weight", &spec, Split::Replicated, fmt)?,
                "token_embd.weight",
                (c.vocab, c.hidden),
            )?
        } else {
            no_weight(c.hidden)
        };
        let output = match (spec.head, tied) {
            (false, _) => no_weight(c.hidden),
            (true, true) => embd.clone(),
            (true, false) => check(
                load_weight_as(g, "output.weight", &spec, Split::Replicated, fmt)?,
                "output.weight",
                (c.vocab, c.hidden),
            )?,
        };
        let embd = if spec.embedding {
            embd
        } else {
            no_weight(c.hidden)
        };
        // Llama 3.1's converter writes its llama3 RoPE scaling as per-frequency divisors.
        let factors = if g.tensor("rope_freqs.weight").is_some() {
            vec("rope_freqs.weight", c.head_dim() / 2)?
        } else {
            Vec::new()
        };
        let rope = RopeFreqs::new(c.rope_base, c.rope_scale, factors).neox(c.rope_neox);
        let out_norm = if spec.head {
            vec("output_norm.weight", c.hidden)?
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            spec,
            embd,
            layers,
            out_norm,
            output,
            // The f32 reference path is f32 throughout, attention and its cache included.
            kv_type: match fmt {
                WeightFormat::AsStored => KvType::F16,
                WeightFormat::F32 => KvType::F32,
            },
            rope,
        })
    }

    /// Element type of the KV cache this model fills (f16 on the serving path, f32 on the
    /// f32 reference path).
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Layers this stage runs.
    pub fn layer_range(&self) -> Range<usize> {
        self.spec.layers.clone()
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        crate::backend::cpu::rope(x, self.config.head_dim(), pos, &self.rope);
    }

    /// Bytes of weights this rank copied out of the file and holds (what sharding divides).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes()
                    + l.gate_up.bytes()
                    + l.wo.data.len()
                    + l.down.data.len()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        let head = if std::ptr::eq(self.output.data.as_ptr(), self.embd.data.as_ptr()) {
            0
        } else {
            self.output.data.len()
        };
        layers + self.embd.data.len() + head + 4 * self.out_norm.len()
    }

    /// Bytes of the transformer blocks' weights only (the part tensor parallelism splits).
    pub fn layer_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.qkv.bytes() + l.gate_up.bytes() + l.wo.data.len() + l.down.data.len())
            .sum()
    }

    /// Run the batch and return the logits of each sequence's last new token. Sequences with no
    /// new tokens are skipped and get no logits entry, so callers always pass at least one.
    /// Needs the whole model on this rank ([`ShardSpec::whole`]).
    pub fn forward(&self, be: &dyn Backend, seqs: &mut [SeqInput<'_>]) -> Vec<Vec<f32>> {
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut x = self.embed(&tokens);
        let mut stage: Vec<StageSeq<'_>> = seqs
            .iter_mut()
            .map(|s| StageSeq {
                n: s.tokens.len(),
                cache: &mut *s.cache,
            })
            .collect();
        let counts: Vec<usize> = stage.iter().map(|s| s.n).collect();
        match self.forward_layers(be, None, &mut stage, &mut x) {
            Ok(()) => self.head(be, &x, &counts),
            // Without a collective nothing can fail.
            Err(e) => unreachable!("single-rank forward cannot fail: {e}"),
        }
    }

    /// Embedding rows of `tokens` (`tokens.len() × hidden`); needs the embedding.
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden;
        let mut x = vec![0f32; tokens.len() * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
            let tok = (tok as usize).min(c.vocab - 1);
            self.embd.dequantize_row(tok, row);
        }
        x
    }

    /// Logits of each sequence's last row; `counts[i]` rows of `x` belong to sequence `i` and
    /// sequences with no rows get no entry. Needs the output head (the last stage).
    pub fn head(&self, be: &dyn Backend, x: &[f32], counts: &[usize]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden;
        let mut last = Vec::with_capacity(counts.len() * h);
        let mut end = 0;
        for &n in counts.iter().filter(|&&n| n > 0) {
            end += n;
            let mut nr = vec![0f32; h];
            rmsnorm(
                &x[(end - 1) * h..end * h],
                &self.out_norm,
                c.rms_eps,
                &mut nr,
            );
            last.extend(nr);
        }
        let n_out = last.len() / h;
        let mut logits = vec![0f32; n_out * c.vocab];
        be.matmul(&self.output, &last, n_out, &mut logits);
        logits.chunks_exact(c.vocab).map(|l| l.to_vec()).collect()
    }

    /// Run this stage's layers over `x` (`sum(n) × hidden` rows, sequence by sequence), in
    /// place. With a tensor-parallel group each rank computes its heads and FFN slice and the
    /// partial outputs of the attention output and down projections are summed across ranks.
    pub fn forward_layers(
        &self,
        be: &dyn Backend,
        tp: Option<&dyn Collective>,
        seqs: &mut [StageSeq<'_>],
        x: &mut [f32],
    ) -> Result<(), CommError> {
        let c = &self.config;
        let (h, hd) = (c.hidden, c.head_dim());
        let (nh, nkv) = (
            self.spec.local_heads(c.n_heads),
            self.spec.local_kv_heads(c.n_kv_heads),
        );
        let ffn = c.ffn / self.spec.tp_size.max(1);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let t_total: usize = seqs.iter().map(|s| s.n).sum();
        debug_assert_eq!(x.len(), t_total * h);
        // (sequence index, position) of every row.
        let mut rows = Vec::with_capacity(t_total);
        for (si, s) in seqs.iter().enumerate() {
            for i in 0..s.n {
                rows.push((si, s.cache.len() + i));
            }
        }
        for s in seqs.iter_mut() {
            s.cache.reserve(self.layers.len(), kvd, s.n, self.kv_type);
        }
        // llama.cpp sums attention dot products differently for one token and for several.
        let orders: Vec<DotOrder> = seqs
            .iter()
            .map(|s| match s.n {
                1 => DotOrder::Single,
                _ => DotOrder::Batched,
            })
            .collect();
        let mut xn = vec![0f32; t_total * h];
        let mut q = vec![0f32; t_total * qd];
        let mut k = vec![0f32; t_total * kvd];
        let mut v = vec![0f32; t_total * kvd];
        let mut att = vec![0f32; t_total * qd];
        let mut o = vec![0f32; t_total * h];
        let mut g = vec![0f32; t_total * ffn];
        let mut u = vec![0f32; t_total * ffn];
        let mut tmp = Vec::new();
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            for (xr, nr) in x.chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
                rmsnorm(xr, &layer.attn_norm, c.rms_eps, nr);
            }
            layer
                .qkv
                .apply(be, &xn, t_total, &mut tmp, &mut [&mut q, &mut k, &mut v]);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                for (out, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    for row in out.chunks_exact_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    }
                }
            }
            for (ri, &(si, pos)) in rows.iter().enumerate() {
                self.rope(&mut q[ri * qd..(ri + 1) * qd], pos);
                self.rope(&mut k[ri * kvd..(ri + 1) * kvd], pos);
                seqs[si].cache.write(
                    li,
                    pos,
                    &k[ri * kvd..(ri + 1) * kvd],
                    &v[ri * kvd..(ri + 1) * kvd],
                );
            }
            let caches: Vec<_> = seqs.iter().map(|s| s.cache.layer(li)).collect();
            let out = SendPtr(att.as_mut_ptr());
            let out = &out;
            let (rows_ref, q_ref, caches_ref, orders) = (&rows, &q, &caches, &orders);
            let window = c.sliding_window;
            be.parallel_for(t_total * nh, &move |task| {
                let (ri, head) = (task / nh, task % nh);
                let (si, pos) = rows_ref[ri];
                // The positions this one attends to: all before it, or its window's.
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let kv0 = first * kvd + head / (nh / nkv) * hd;
                // SAFETY: each (row, head) task writes its own disjoint hd-wide slot.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(ri * qd + head * hd), hd) };
                let qh = &q_ref[ri * qd + head * hd..ri * qd + (head + 1) * hd];
                // One branch per head task (the model's cache type), none in the kernels.
                match caches_ref[si] {
                    KvLayer::F16 { k, v } => attend(
                        qh,
                        &k[kv0..],
                        &v[kv0..],
                        kvd,
                        pos + 1 - first,
                        scale,
                        orders[si],
                        dst,
                    ),
                    KvLayer::F32 { k, v } => {
                        attend_f32(qh, &k[kv0..], &v[kv0..], kvd, pos + 1 - first, scale, dst)
                    }
                }
            });
            be.matmul(&layer.wo, &att, t_total, &mut o);
            if let Some(tp) = tp {
                tp.all_reduce_sum(&mut o)?;
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            for (xr, nr) in x.chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
                rmsnorm(xr, &layer.ffn_norm, c.rms_eps, nr);
            }
            layer
                .gate_up
                .apply(be, &xn, t_total, &mut tmp, &mut [&mut g, &mut u]);
            swiglu_fast(&mut g, &u);
            be.matmul(&layer.down, &g, t_total, &mut o);
            if let Some(tp) = tp {
                tp.all_reduce_sum(&mut o)?;
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.n);
        }
        Ok(())
    }
}
