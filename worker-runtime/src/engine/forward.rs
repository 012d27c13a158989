//! Llama forward pass (RMSNorm, RoPE in GGUF's interleaved-pair form, grouped-query attention with
//! a KV cache, SwiGLU) over a batch of sequences, each contributing one or more tokens.

use std::ops::Range;

use crate::backend::{Backend, Weight};
use crate::model::config::LlamaConfig;
use crate::model::gguf::{Gguf, GgufError};
use crate::shard::{ShardSpec, Split, load_vector, load_weight};

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
/// which halves thread dispatches and activation quantization per layer.
struct Fused {
    parts: Vec<Weight>,
    fused: Option<Weight>,
}

impl Fused {
    fn new(parts: Vec<Weight>) -> Self {
        let same = parts
            .windows(2)
            .all(|p| p[0].ty == p[1].ty && p[0].cols == p[1].cols);
        let fused = (same && !parts.is_empty()).then(|| Weight {
            ty: parts[0].ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: parts[0].cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        });
        Self { parts, fused }
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
    inv_freq: Vec<f32>,
}

/// Per-sequence key/value cache for the layers of this stage.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's share of a forward batch.
pub struct SeqInput<'a> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub cache: &'a mut KvCache,
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint ranges from parallel tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl LlamaModel {
    /// Load this rank's weights from a parsed GGUF file.
    pub fn load(g: &Gguf, spec: ShardSpec) -> Result<Self, LoadError> {
        let config = LlamaConfig::from_gguf(g)?;
        let c = &config;
        let hd = c.head_dim();
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
        let tp = spec.tp_size.max(1);
        let mut layers = Vec::new();
        for l in spec.layers.clone() {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let m = |s: &str, split: Split, want: (usize, usize)| -> Result<Weight, LoadError> {
                check(load_weight(g, &n(s), &spec, split)?, &n(s), want)
            };
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm"), c.hidden)?,
                qkv: Fused::new(vec![
                    m("attn_q", Split::Rows, (c.n_heads * hd / tp, c.hidden))?,
                    m("attn_k", Split::Rows, (c.n_kv_heads * hd / tp, c.hidden))?,
                    m("attn_v", Split::Rows, (c.n_kv_heads * hd / tp, c.hidden))?,
                ]),
                wo: m("attn_output", Split::Cols, (c.hidden, c.n_heads * hd / tp))?,
                ffn_norm: vec(&n("ffn_norm"), c.hidden)?,
                gate_up: Fused::new(vec![
                    m("ffn_gate", Split::Rows, (c.ffn / tp, c.hidden))?,
                    m("ffn_up", Split::Rows, (c.ffn / tp, c.hidden))?,
                ]),
                down: m("ffn_down", Split::Cols, (c.hidden, c.ffn / tp))?,
            });
        }
        let embd = check(
            load_weight(g, "token_embd.weight", &spec, Split::Replicated)?,
            "token_embd.weight",
            (c.vocab, c.hidden),
        )?;
        let output = match g.tensor("output.weight") {
            Some(_) => check(
                load_weight(g, "output.weight", &spec, Split::Replicated)?,
                "output.weight",
                (c.vocab, c.hidden),
            )?,
            None => embd.clone(),
        };
        let out_norm = vec("output_norm.weight", c.hidden)?;
        let inv_freq = (0..hd / 2)
            .map(|i| c.rope_base.powf(-2.0 * i as f32 / hd as f32))
            .collect();
        Ok(Self {
            config,
            spec,
            embd,
            layers,
            out_norm,
            output,
            inv_freq,
        })
    }

    /// Layers this stage runs.
    pub fn layer_range(&self) -> Range<usize> {
        self.spec.layers.clone()
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let hd = self.config.head_dim();
        for head in x.chunks_exact_mut(hd) {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos as f32 * f).sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
            }
        }
    }

    /// Run the batch and return the logits of each sequence's last new token. Sequences with no
    /// new tokens are skipped and get no logits entry, so callers always pass at least one.
    pub fn forward(&self, be: &dyn Backend, seqs: &mut [SeqInput<'_>]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (h, hd) = (c.hidden, c.head_dim());
        let (nh, nkv) = (c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let t_total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        // (sequence index, position) of every row.
        let mut rows = Vec::with_capacity(t_total);
        for (si, s) in seqs.iter().enumerate() {
            for i in 0..s.tokens.len() {
                rows.push((si, s.cache.len + i));
            }
        }
        let mut x = vec![0f32; t_total * h];
        let mut r = 0;
        for s in seqs.iter() {
            for &tok in s.tokens {
                let tok = (tok as usize).min(c.vocab - 1);
                self.embd.dequantize_row(tok, &mut x[r * h..(r + 1) * h]);
                r += 1;
            }
        }
        for s in seqs.iter_mut() {
            let new_len = s.cache.len + s.tokens.len();
            s.cache.k.resize(self.layers.len(), Vec::new());
            s.cache.v.resize(self.layers.len(), Vec::new());
            for l in 0..self.layers.len() {
                s.cache.k[l].resize(new_len * kvd, 0.0);
                s.cache.v[l].resize(new_len * kvd, 0.0);
            }
        }
        let mut xn = vec![0f32; t_total * h];
        let mut q = vec![0f32; t_total * qd];
        let mut k = vec![0f32; t_total * kvd];
        let mut v = vec![0f32; t_total * kvd];
        let mut att = vec![0f32; t_total * qd];
        let mut o = vec![0f32; t_total * h];
        let mut g = vec![0f32; t_total * c.ffn];
        let mut u = vec![0f32; t_total * c.ffn];
        let mut tmp = Vec::new();
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            for (xr, nr) in x.chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
                rmsnorm(xr, &layer.attn_norm, c.rms_eps, nr);
            }
            layer
                .qkv
                .apply(be, &xn, t_total, &mut tmp, &mut [&mut q, &mut k, &mut v]);
            for (ri, &(si, pos)) in rows.iter().enumerate() {
                self.rope(&mut q[ri * qd..(ri + 1) * qd], pos);
                self.rope(&mut k[ri * kvd..(ri + 1) * kvd], pos);
                // The cache and the attention inputs are f16, as in llama.cpp.
                for val in q[ri * qd..(ri + 1) * qd]
                    .iter_mut()
                    .chain(&mut k[ri * kvd..(ri + 1) * kvd])
                    .chain(&mut v[ri * kvd..(ri + 1) * kvd])
                {
                    *val = round_f16(*val);
                }
                let cache = &mut *seqs[si].cache;
                cache.k[li][pos * kvd..(pos + 1) * kvd]
                    .copy_from_slice(&k[ri * kvd..(ri + 1) * kvd]);
                cache.v[li][pos * kvd..(pos + 1) * kvd]
                    .copy_from_slice(&v[ri * kvd..(ri + 1) * kvd]);
            }
            let caches: Vec<(&[f32], &[f32])> = seqs
                .iter()
                .map(|s| (s.cache.k[li].as_slice(), s.cache.v[li].as_slice()))
                .collect();
            let out = SendPtr(att.as_mut_ptr());
            let out = &out;
            let (rows_ref, q_ref, caches_ref) = (&rows, &q, &caches);
            be.parallel_for(t_total * nh, &move |task| {
                let (ri, head) = (task / nh, task % nh);
                let (si, pos) = rows_ref[ri];
                let (kc, vc) = caches_ref[si];
                let kvh = head / (nh / nkv);
                let qv = &q_ref[ri * qd + head * hd..ri * qd + (head + 1) * hd];
                let mut scores: Vec<f32> = (0..=pos)
                    .map(|p| {
                        let kr = &kc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                        crate::backend::cpu::dot_f32(qv, kr) * scale
                    })
                    .collect();
                let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - mx).exp();
                    sum += *s;
                }
                let mut acc = [0f32; 256];
                let acc = &mut acc[..hd.min(256)];
                for (p, s) in scores.iter().enumerate() {
                    let w = round_f16(s / sum);
                    let vr = &vc[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                    for (a, vv) in acc.iter_mut().zip(vr) {
                        *a += w * vv;
                    }
                }
                // SAFETY: each (row, head) task writes its own disjoint hd-wide slot.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(ri * qd + head * hd), hd) };
                dst.copy_from_slice(acc);
            });
            be.matmul(&layer.wo, &att, t_total, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            for (xr, nr) in x.chunks_exact(h).zip(xn.chunks_exact_mut(h)) {
                rmsnorm(xr, &layer.ffn_norm, c.rms_eps, nr);
            }
            layer
                .gate_up
                .apply(be, &xn, t_total, &mut tmp, &mut [&mut g, &mut u]);
            for (gv, uv) in g.iter_mut().zip(&u) {
                *gv = *gv / (1.0 + (-*gv).exp()) * uv;
            }
            be.matmul(&layer.down, &g, t_total, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Logits only for each sequence's last row.
        let mut last = Vec::with_capacity(seqs.len() * h);
        let mut end = 0;
        for s in seqs.iter().filter(|s| !s.tokens.is_empty()) {
            end += s.tokens.len();
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
}
