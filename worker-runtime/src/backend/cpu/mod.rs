//! CPU backend: activations are quantized to 8-bit blocks as llama.cpp does for each weight
//! format (Q8_0/Q8_1 blocks of 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q8_K blocks of 256 for the
//! K-quants) and multiplied against the weight blocks with AVX2/FMA kernels chosen at run time,
//! or portable scalar code elsewhere; rows are spread over a fixed fork-join pool ([`pool`]).

mod kernels;
mod kquants;
mod ops;
mod pool;
mod rope;

pub use kernels::{
    Flavour, QuantActs, Unpacked4, dot_f32, dot_row, dot_rows4, dot_rows4xt, dot_rows4xt_unpacked,
    flavour, has_avx2, quantize_acts,
};
pub use kquants::{KActs, QK_K, quantize_acts_k};
pub use ops::{
    AttnScratch, DotOrder, attend, attend_f32, expf, rms_norm, silu, swiglu, swiglu_fast,
};
pub use rope::{RopeFreqs, rope};

use std::sync::OnceLock;

use super::{Backend, Weight};
use crate::model::gguf::GgmlType;
use kernels::q32;

/// Tokens from which a matmul unpacks each quad of 32-value rows once for all its tiles.
const UNPACK_FROM_TOKENS: usize = 8;

thread_local! {
    /// Each pool thread's unpacked rows, reused across matmuls.
    static UNPACKED: std::cell::RefCell<Unpacked4> = Default::default();
}

/// f16 bits -> f32, as a table so the hot loops avoid software conversion.
pub(crate) fn f16_table() -> &'static [f32] {
    static T: OnceLock<Vec<f32>> = OnceLock::new();
    T.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect()
    })
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_table()[u16::from_le_bytes([b[i], b[i + 1]]) as usize]
}

/// An f32 row's bytes as `f32`s, without a copy, where the encoding and alignment allow (the
/// f32 reference path's weights); `None` means decode it with [`dequantize_row`].
fn f32_row(ty: GgmlType, src: &[u8]) -> Option<&[f32]> {
    if ty != GgmlType::F32 || cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` only yields aligned elements.
    let (head, row, tail) = unsafe { src.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(row)
}

/// Decode one encoded row into f32 (the reference every kernel is tested against).
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(b[2 + j] as i8);
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let Some(f) = q32::of(ty) else { return };
            for (o, b) in out
                .chunks_exact_mut(32)
                .zip(src.chunks_exact(q32::block_bytes(f)))
            {
                let d = f16_at(b, 0);
                let (m, off) = if q32::has_min(f) {
                    (f16_at(b, 2), 0.0)
                } else {
                    (0.0, q32::offset(f) as f32)
                };
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (f32::from(q32::value(f, b, j)) - off) + m;
                }
            }
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            kquants::dequantize_row(ty, src, out)
        }
    }
}

/// Encode f32 values as one of the supported types (tests and the reference path use it).
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => src.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in src.chunks(32) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in src.chunks(32) {
                let max = b
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for b in src.chunks(32) {
                let min = b.iter().fold(f32::MAX, |a, &v| a.min(v));
                let max = b.iter().fold(f32::MIN, |a, &v| a.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(half::f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // ggml's reference quantizers: Q5_0 maps the value of largest magnitude to -16,
            // Q5_1 spans min..max in 31 steps.
            for b in src.chunks(32) {
                let (d, min, vals): (f32, Option<f32>, Vec<u8>) = if ty == GgmlType::Q5_0 {
                    let max = b
                        .iter()
                        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    let d = max / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    (
                        d,
                        None,
                        b.iter().map(|v| ((v * id + 16.5) as u8).min(31)).collect(),
                    )
                } else {
                    let min = b.iter().fold(f32::MAX, |a, &v| a.min(v));
                    let max = b.iter().fold(f32::MIN, |a, &v| a.max(v));
                    let d = (max - min) / 31.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let vals = b.iter().map(|v| (((v - min) * id + 0.5) as u8).min(31));
                    (d, Some(min), vals.collect())
                };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                if let Some(min) = min {
                    out.extend(half::f16::from_f32(min).to_le_bytes());
                }
                let qh = (0..32).fold(0u32, |h, j| h | (u32::from(vals[j] >> 4) << j));
                out.extend(qh.to_le_bytes());
                for j in 0..16 {
                    out.push((vals[j] & 0x0F) | ((vals[j + 16] & 0x0F) << 4));
                }
            }
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            out = kquants::quantize_row(ty, src);
        }
    }
    out
}

/// A matmul's activations, quantized as its weight format's kernels take them.
enum Acts {
    /// Blocks of 32 (the 32-value formats).
    Q8(QuantActs),
    /// Blocks of 256 (the K-quants).
    K(KActs),
}

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint output elements from parallel row chunks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The CPU backend: a fixed fork-join pool plus the SIMD kernels.
pub struct CpuBackend {
    pool: pool::Pool,
    threads: usize,
}

/// Errors creating the CPU backend.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} CPU worker threads: {source}")]
pub struct CpuError {
    threads: usize,
    #[source]
    source: std::io::Error,
}

impl CpuBackend {
    /// A backend using `threads` worker threads (0 = one per available core).
    pub fn new(threads: usize) -> Result<Self, CpuError> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = pool::Pool::new(threads).map_err(|source| CpuError { threads, source })?;
        f16_table();
        Ok(Self { pool, threads })
    }
}

/// Rows handled by one task: one even share per thread (measured fastest for decode with the
/// spinning pool), a multiple of 4 so the four-row kernels cover it.
fn rows_per_task(rows: usize, threads: usize) -> usize {
    let target = rows.div_ceil(threads.max(1)).div_ceil(4) * 4;
    target.clamp(8, 1 << 16).min(rows.max(1))
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        match kernels::flavour() {
            kernels::Flavour::AvxVnni => "cpu-avx2-vnni",
            kernels::Flavour::Avx512Vnni => "cpu-avx2-avx512vnni",
            kernels::Flavour::Avx2 => "cpu-avx2",
            kernels::Flavour::Portable => "cpu-scalar",
        }
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn matmul(&self, w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * w.cols, "matmul input shape");
        assert_eq!(out.len(), n * w.rows, "matmul output shape");
        let acts = match w.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            ty if ty.is_k_quant() => Some(Acts::K(quantize_acts_k(x, w.cols))),
            _ => Some(Acts::Q8(quantize_acts(x, w.cols))),
        };
        let rows = w.rows;
        let chunk = rows_per_task(rows, self.threads);
        let tasks = rows.div_ceil(chunk);
        let ptr = SendPtr(out.as_mut_ptr());
        let ptr = &ptr;
        let acts = acts.as_ref();
        let body = move |task: usize| {
            let r0 = task * chunk;
            let r1 = (r0 + chunk).min(rows);
            // SAFETY (all writes below): (t, r) pairs are disjoint between tasks and in bounds.
            let put = |t: usize, r: usize, v: f32| unsafe { *ptr.0.add(t * rows + r) = v };
            let mut tmp = Vec::new();
            let q = match acts {
                Some(Acts::Q8(q)) => Some(q),
                Some(Acts::K(k)) => {
                    // Each weight row is unpacked once per group of tokens, while in cache.
                    let mut vals = [0f32; kquants::MAX_TOKENS];
                    for r in r0..r1 {
                        for t0 in (0..n).step_by(kquants::MAX_TOKENS) {
                            let out = &mut vals[..kquants::MAX_TOKENS.min(n - t0)];
                            kquants::dot_tokens(w.ty, w.row(r), k, t0, out);
                            for (j, v) in out.iter().enumerate() {
                                put(t0 + j, r, *v);
                            }
                        }
                    }
                    return;
                }
                None => None,
            };
            let Some(q) = q else {
                // Each weight row is decoded once and dotted with every token's row while it
                // is in cache (memory traffic of one pass over the weights, not `n`).
                tmp.resize(w.cols, 0.0);
                for r in r0..r1 {
                    let row = match f32_row(w.ty, w.row(r)) {
                        Some(row) => row,
                        None => {
                            dequantize_row(w.ty, w.row(r), &mut tmp);
                            &tmp
                        }
                    };
                    for t in 0..n {
                        put(t, r, dot_f32(row, &x[t * w.cols..(t + 1) * w.cols]));
                    }
                }
                return;
            };
            let quad = r0 + (r1 - r0) / 4 * 4;
            let pair_tokens = q32::of(w.ty).is_some();
            let mut r = r0;
            while r < quad {
                let rows4 = [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)];
                let mut t = 0;
                let put_tokens = |t: usize, v: &[[f32; 4]]| {
                    for (dt, vt) in v.iter().enumerate() {
                        for (i, val) in vt.iter().enumerate() {
                            put(t + dt, r + i, *val);
                        }
                    }
                };
                // A prompt's many tiles share the four rows: unpacked once, not per tile.
                if pair_tokens && n >= UNPACK_FROM_TOKENS {
                    UNPACKED.with_borrow_mut(|up| {
                        if up.fill(w.ty, rows4, q.blocks) {
                            while t + 4 <= n {
                                put_tokens(t, &dot_rows4xt_unpacked::<4>(up, q, t));
                                t += 4;
                            }
                        }
                    });
                }
                while pair_tokens && t + 4 <= n {
                    put_tokens(t, &dot_rows4xt::<4>(w.ty, rows4, q, t));
                    t += 4;
                }
                while pair_tokens && t + 2 <= n {
                    put_tokens(t, &dot_rows4xt::<2>(w.ty, rows4, q, t));
                    t += 2;
                }
                while t < n {
                    for (i, val) in dot_rows4(w.ty, rows4, q, t).into_iter().enumerate() {
                        put(t, r + i, val);
                    }
                    t += 1;
                }
                r += 4;
            }
            for r in quad..r1 {
                for t in 0..n {
                    put(t, r, dot_row(w.ty, w.row(r), q, t));
                }
            }
        };
        if tasks == 1 || self.threads == 1 {
            (0..tasks).for_each(body);
        } else {
            self.parallel_for(tasks, &body);
        }
    }

    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.pool.run(n, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    fn weight(ty: GgmlType, rows: usize, cols: usize) -> (Weight, Vec<f32>) {
        let src = data(rows * cols, 7);
        let mut bytes = Vec::new();
        for r in src.chunks(cols) {
            bytes.extend(quantize_row(ty, r));
        }
        let w = Weight {
            ty,
            rows,
            cols,
            data: bytes,
        };
        // The reference uses the dequantized weights, so only activation rounding differs.
        let mut deq = vec![0f32; rows * cols];
        for (r, o) in deq.chunks_exact_mut(cols).enumerate() {
            w.dequantize_row(r, o);
        }
        (w, deq)
    }

    fn reference(deq: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                out[t * rows + r] = (0..cols).map(|c| deq[r * cols + c] * x[t * cols + c]).sum();
            }
        }
        out
    }

    #[test]
    fn quantize_dequantize_round_trip() {
        let x = data(256, 3);
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 1e-2),
            (GgmlType::Q8_0, 1e-2),
            (GgmlType::Q4_0, 0.15),
            (GgmlType::Q4_1, 0.08),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q5_1, 0.04),
            (GgmlType::Q4_K, 0.12),
            (GgmlType::Q6_K, 0.03),
        ] {
            let mut y = vec![0f32; 256];
            dequantize_row(ty, &quantize_row(ty, &x), &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(err <= tol, "{ty:?}: max error {err} > {tol}");
        }
    }

    #[test]
    fn every_kernel_matches_the_f32_reference() {
        let (rows, cols) = (37, 256);
        for threads in [1, 3] {
            let be = CpuBackend::new(threads).expect("pool");
            for ty in [
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q5_0,
                GgmlType::Q5_1,
                GgmlType::Q8_0,
                GgmlType::Q2_K,
                GgmlType::Q3_K,
                GgmlType::Q4_K,
                GgmlType::Q5_K,
                GgmlType::Q6_K,
                GgmlType::F32,
                GgmlType::F16,
                GgmlType::BF16,
            ] {
                let (w, deq) = weight(ty, rows, cols);
                for n in [1, 4] {
                    let x = data(n * cols, 11 + n as u32);
                    let want = reference(&deq, &x, rows, cols, n);
                    let mut got = vec![0f32; n * rows];
                    be.matmul(&w, &x, n, &mut got);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        // 8-bit activations: error bounded by ~1% of the row's magnitude.
                        let tol = 0.02 * (1.0 + b.abs()) + 0.05;
                        assert!(
                            (a - b).abs() <= tol,
                            "{ty:?} n={n} t={threads} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        let cols = 512;
        let x = data(cols, 5);
        let q = quantize_acts(&x, cols);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            let (w, _) = weight(ty, 3, cols);
            for r in 0..3 {
                let simd = dot_row(ty, w.row(r), &q, 0);
                let scalar = kernels::scalar_dot(ty, w.row(r), &q.qs, &q.d, &q.s, q.blocks);
                assert!(
                    (simd - scalar).abs() <= 1e-3 * (1.0 + scalar.abs()),
                    "{ty:?}: {simd} vs {scalar}"
                );
            }
        }
        let y = data(cols, 9);
        let plain: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot_f32(&x, &y) - plain).abs() < 1e-3);
    }
}
