//! K-quant weights (ggml's Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 values with 4- or
//! 6-bit sub-block scales) multiplied against activations quantized per 256 values as ggml's
//! `block_q8_K` does, so results follow llama.cpp's arithmetic.
//!
//! Every format is decoded into one shape, [`Decoded`]: 256 small integers, a scale and a min
//! per group of 16 and the two f16 super-block factors. Dequantization and the portable dot
//! product both read that shape, so a format's bit layout lives in one function; the AVX2
//! kernels unpack the same bits with vector shifts and are tested against it.

use super::f16_at;
use super::kernels::Flavour;
use crate::model::gguf::GgmlType;

/// Values per super-block.
pub const QK_K: usize = 256;

/// Activations of `n` rows quantized to blocks of 256 int8 with one f32 scale and the sums of
/// each 16 values (ggml's `block_q8_K`).
#[derive(Debug, Clone)]
pub struct KActs {
    /// Quantized values, `n * cols`.
    pub qs: Vec<i8>,
    /// Per-block scales, `n * cols / 256`.
    pub d: Vec<f32>,
    /// Sums of each 16 quantized values, `n * cols / 16`.
    pub bsums: Vec<i16>,
    /// Blocks per row.
    pub blocks: usize,
}

/// Quantize `x` (rows of `cols`, a multiple of 256) as ggml's `quantize_row_q8_K_ref`: the
/// value of largest magnitude maps to -127, rounding to nearest even.
pub fn quantize_acts_k(x: &[f32], cols: usize) -> KActs {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2() {
        // SAFETY: AVX2 was detected at run time (the same code, with SIMD rounding).
        return unsafe { quantize_acts_k_avx2(x, cols) };
    }
    quantize_acts_k_in(x, cols)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_acts_k_avx2(x: &[f32], cols: usize) -> KActs {
    quantize_acts_k_in(x, cols)
}

#[inline(always)]
fn quantize_acts_k_in(x: &[f32], cols: usize) -> KActs {
    let blocks_total = x.len() / QK_K;
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks_total];
    let mut bsums = vec![0i16; x.len() / 16];
    for (b, (xb, qb)) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .enumerate()
    {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (g, s) in qb.chunks_exact(16).zip(&mut bsums[b * 16..(b + 1) * 16]) {
            *s = g.iter().map(|&v| i16::from(v)).sum();
        }
        d[b] = 1.0 / iscale;
    }
    KActs {
        qs,
        d,
        bsums,
        blocks: cols / QK_K,
    }
}

/// One super-block in a format-free shape: value `e` is
/// `d * scale[e / 16] * q[e] - dmin * min[e / 16]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The quantized values (signed for Q3_K and Q6_K, unsigned with a min for the others).
    pub q: [i8; QK_K],
    /// Scale of each group of 16.
    pub scale: [i16; 16],
    /// Min of each group of 16 (zero for Q3_K and Q6_K).
    pub min: [i16; 16],
    /// Super-block scale.
    pub d: f32,
    /// Super-block min scale (zero for Q3_K and Q6_K).
    pub dmin: f32,
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min from Q4_K/Q5_K's 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's sixteen 6-bit scales (stored with +32) from its 12 bytes: the low nibbles come from
/// bytes 0..8 (low then high halves), the top two bits from bytes 8..12.
fn q3_scale(i: usize, q: &[u8]) -> i16 {
    let low = if i < 8 { q[i] & 0xF } else { q[i - 8] >> 4 };
    let high = (q[8 + i % 4] >> (2 * (i / 4))) & 3;
    i16::from(low | (high << 4)) - 32
}

/// Decode one super-block of `ty` (a K-quant) from `b` (one block's bytes).
pub fn decode(ty: GgmlType, b: &[u8]) -> Decoded {
    let mut out = Decoded {
        q: [0; QK_K],
        scale: [0; 16],
        min: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match ty {
        GgmlType::Q2_K => {
            // scales[16] qs[64] d dmin
            let (sc, qs) = (&b[0..16], &b[16..80]);
            out.d = f16_at(b, 80);
            out.dmin = f16_at(b, 82);
            for (g, &s) in sc.iter().enumerate() {
                out.scale[g] = i16::from(s & 0xF);
                out.min[g] = i16::from(s >> 4);
            }
            for (e, q) in out.q.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                *q = ((qs[n * 32 + l] >> (2 * j)) & 3) as i8;
            }
        }
        GgmlType::Q3_K => {
            // hmask[32] qs[64] scales[12] d
            let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            out.d = f16_at(b, 108);
            for g in 0..16 {
                out.scale[g] = q3_scale(g, sc);
            }
            for (e, q) in out.q.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[n * 32 + l] >> (2 * j)) & 3) as i8;
                let high = hm[l] & (1 << (4 * n + j)) != 0;
                *q = low - if high { 0 } else { 4 };
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // d dmin scales[12] (qh[32]) qs[128]
            out.d = f16_at(b, 0);
            out.dmin = f16_at(b, 2);
            let sc = &b[4..16];
            for s in 0..8 {
                let (scale, min) = scale_min_k4(s, sc);
                out.scale[2 * s..2 * s + 2].fill(i16::from(scale));
                out.min[2 * s..2 * s + 2].fill(i16::from(min));
            }
            let five = ty == GgmlType::Q5_K;
            let qs = if five { &b[48..176] } else { &b[16..144] };
            for (e, q) in out.q.iter_mut().enumerate() {
                // Sub-block s = e / 32: pairs of sub-blocks share 32 bytes, low nibbles first.
                let (s, l) = (e / 32, e % 32);
                let byte = qs[(s / 2) * 32 + l];
                let mut v = if s % 2 == 0 { byte & 0xF } else { byte >> 4 };
                if five && b[16 + l] & (1 << s) != 0 {
                    v += 16;
                }
                *q = v as i8;
            }
        }
        GgmlType::Q6_K => {
            // ql[128] qh[64] scales[16] d
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = f16_at(b, 208);
            for (g, &s) in sc.iter().enumerate() {
                out.scale[g] = i16::from(s as i8);
            }
            for (e, q) in out.q.iter_mut().enumerate() {
                // Each 128 values: ql's 64 bytes give low nibbles then high nibbles, qh's 32
                // bytes two bits for each quarter.
                let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
                let lo = ql[n * 64 + (k % 2) * 32 + l];
                let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
                let hi = (qh[n * 32 + l] >> (2 * k)) & 3;
                *q = (lo | (hi << 4)) as i8 - 32;
            }
        }
        _ => unreachable!("decode is only called for K-quants"),
    }
    out
}

/// Decode K-quant row `src` into `out` with ggml's float steps (`(d * scale) * q - dmin * min`).
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes() as usize;
    for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
        let k = decode(ty, b);
        for (e, v) in o.iter_mut().enumerate() {
            let g = e / 16;
            let dl = k.d * f32::from(k.scale[g]);
            let ml = k.dmin * f32::from(k.min[g]);
            *v = dl * f32::from(k.q[e]) - ml;
        }
    }
}

/// Encode `src` as a K-quant with a plain (not error-minimising) choice of scales: tests and
/// synthetic models use it; real files come from llama.cpp's quantizer.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for x in src.chunks(QK_K) {
        let start = out.len();
        out.resize(start + ty.block_bytes() as usize, 0);
        encode_block(ty, x, &mut out[start..]);
    }
    out
}

/// Group statistics for a block: per group of `len` values, a non-positive min and the step
/// that spans `levels` levels from it (or, for signed formats, the largest magnitude).
fn group_steps(x: &[f32], len: usize, levels: f32, signed: bool) -> (Vec<f32>, Vec<f32>) {
    let mut step = Vec::new();
    let mut min = Vec::new();
    for g in x.chunks(len) {
        if signed {
            let amax = g.iter().fold(0f32, |a, v| a.max(v.abs()));
            step.push(amax / levels);
            min.push(0.0);
        } else {
            let lo = g.iter().fold(0f32, |a, &v| a.min(v));
            let hi = g.iter().fold(0f32, |a, &v| a.max(v));
            step.push((hi - lo) / levels);
            min.push(-lo);
        }
    }
    (step, min)
}

/// Super-block factor and integer group values for `v`, with at most `max` levels.
fn super_scale(v: &[f32], max: f32) -> (f32, Vec<u8>) {
    let top = v.iter().fold(0f32, |a, &s| a.max(s));
    let d = half::f16::from_f32(top / max).to_f32();
    let q = v
        .iter()
        .map(|&s| {
            if d > 0.0 {
                (s / d).round().clamp(0.0, max) as u8
            } else {
                0
            }
        })
        .collect();
    (d, q)
}

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

fn encode_block(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let level = |v: f32, step: f32, lo: f32, hi: f32| {
        if step > 0.0 {
            (v / step).round().clamp(lo, hi) as i32
        } else {
            0
        }
    };
    match ty {
        GgmlType::Q2_K => {
            let (step, min) = group_steps(x, 16, 3.0, false);
            let (d, sc) = super_scale(&step, 15.0);
            let (dmin, mn) = super_scale(&min, 15.0);
            put_f16(out, 80, d);
            put_f16(out, 82, dmin);
            let (d, dmin) = (f16_at(out, 80), f16_at(out, 82));
            for g in 0..16 {
                out[g] = sc[g] | (mn[g] << 4);
            }
            for (e, &v) in x.iter().enumerate() {
                let g = e / 16;
                let q = level(v + dmin * f32::from(mn[g]), d * f32::from(sc[g]), 0.0, 3.0);
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                out[16 + n * 32 + l] |= (q as u8) << (2 * j);
            }
        }
        GgmlType::Q3_K => {
            let (step, _) = group_steps(x, 16, 3.0, true);
            let (d, sc) = super_scale(&step, 31.0);
            put_f16(out, 108, d);
            let d = f16_at(out, 108);
            for (g, &s) in sc.iter().enumerate() {
                let v = s + 32;
                if g < 8 {
                    out[96 + g] |= v & 0xF;
                } else {
                    out[96 + g - 8] |= (v & 0xF) << 4;
                }
                out[96 + 8 + g % 4] |= (v >> 4) << (2 * (g / 4));
            }
            for (e, &v) in x.iter().enumerate() {
                let q = level(v, d * f32::from(sc[e / 16]), -4.0, 3.0) + 4;
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                out[32 + n * 32 + l] |= ((q & 3) as u8) << (2 * j);
                if q >= 4 {
                    out[l] |= 1 << (4 * n + j);
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let top = if five { 31.0 } else { 15.0 };
            let (step, min) = group_steps(x, 32, top, false);
            let (d, sc) = super_scale(&step, 63.0);
            let (dmin, mn) = super_scale(&min, 63.0);
            put_f16(out, 0, d);
            put_f16(out, 2, dmin);
            let (d, dmin) = (f16_at(out, 0), f16_at(out, 2));
            for j in 0..8 {
                if j < 4 {
                    out[4 + j] |= sc[j] & 63;
                    out[4 + j + 4] |= mn[j] & 63;
                } else {
                    out[4 + j + 4] |= (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
                    out[4 + j - 4] |= (sc[j] >> 4) << 6;
                    out[4 + j] |= (mn[j] >> 4) << 6;
                }
            }
            let q0 = if five { 48 } else { 16 };
            for (e, &v) in x.iter().enumerate() {
                let s = e / 32;
                let q = level(v + dmin * f32::from(mn[s]), d * f32::from(sc[s]), 0.0, top) as u8;
                let l = e % 32;
                let shift = if s % 2 == 0 { 0 } else { 4 };
                out[q0 + (s / 2) * 32 + l] |= (q & 0xF) << shift;
                if five && q >= 16 {
                    out[16 + l] |= 1 << s;
                }
            }
        }
        GgmlType::Q6_K => {
            let (step, _) = group_steps(x, 16, 31.0, true);
            let (d, sc) = super_scale(&step, 127.0);
            put_f16(out, 208, d);
            let d = f16_at(out, 208);
            for (g, &s) in sc.iter().enumerate() {
                out[192 + g] = s;
            }
            for (e, &v) in x.iter().enumerate() {
                let q = (level(v, d * f32::from(sc[e / 16]), -32.0, 31.0) + 32) as u8;
                let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
                let shift = if k < 2 { 0 } else { 4 };
                out[n * 64 + (k % 2) * 32 + l] |= (q & 0xF) << shift;
                out[128 + n * 32 + l] |= (q >> 4) << (2 * k);
            }
        }
        _ => unreachable!("encode_block is only called for K-quants"),
    }
}

/// Most tokens one call of [`dot_tokens`] takes.
pub const MAX_TOKENS: usize = 4;

/// One K-quant weight row against activation rows `t0..t0 + out.len()` (at most
/// [`MAX_TOKENS`]): each super-block is unpacked once for all of them (prefill).
pub fn dot_tokens(ty: GgmlType, w: &[u8], a: &KActs, t0: usize, out: &mut [f32]) {
    dot_tokens_in(super::kernels::flavour(), ty, w, a, t0, out)
}

fn dot_tokens_in(fl: Flavour, ty: GgmlType, w: &[u8], a: &KActs, t0: usize, out: &mut [f32]) {
    let nb = a.blocks;
    let n = out.len();
    assert!(
        (1..=MAX_TOKENS).contains(&n),
        "1 to {MAX_TOKENS} tokens per call"
    );
    let qs = &a.qs[t0 * nb * QK_K..(t0 + n) * nb * QK_K];
    let d = &a.d[t0 * nb..(t0 + n) * nb];
    let bsums = &a.bsums[t0 * nb * 16..(t0 + n) * nb * 16];
    #[cfg(target_arch = "x86_64")]
    if fl != Flavour::Portable {
        // SAFETY: the flavour is supported (callers check), so AVX2, FMA and F16C are present.
        unsafe { avx2::dot(ty, w, qs, d, bsums, nb, out) };
        return;
    }
    let _ = fl;
    for (j, o) in out.iter_mut().enumerate() {
        *o = scalar_dot(
            ty,
            w,
            &qs[j * nb * QK_K..(j + 1) * nb * QK_K],
            &d[j * nb..(j + 1) * nb],
            &bsums[j * nb * 16..(j + 1) * nb * 16],
            nb,
        );
    }
}

/// Portable kernel; also the definition the SIMD kernels must match:
/// `sum_b a.d * (d * sum_g scale_g * (q_g . a_g) - dmin * sum_g min_g * bsum_g)`.
pub(crate) fn scalar_dot(
    ty: GgmlType,
    w: &[u8],
    qs: &[i8],
    d: &[f32],
    bsums: &[i16],
    nb: usize,
) -> f32 {
    let bb = ty.block_bytes() as usize;
    let mut acc = 0f32;
    for b in 0..nb {
        let k = decode(ty, &w[b * bb..(b + 1) * bb]);
        let a = &qs[b * QK_K..(b + 1) * QK_K];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for g in 0..16 {
            let dot: i32 = (g * 16..(g + 1) * 16)
                .map(|e| i32::from(k.q[e]) * i32::from(a[e]))
                .sum();
            sumi += i32::from(k.scale[g]) * dot;
            summ += i32::from(k.min[g]) * i32::from(bsums[b * 16 + g]);
        }
        acc += d[b] * (k.d * sumi as f32 - k.dmin * summ as f32);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::tests::data;

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Random bytes with sane f16 factors: every bit pattern of the packed fields is exercised.
    fn random_blocks(ty: GgmlType, nb: usize, seed: u64) -> Vec<u8> {
        let bb = ty.block_bytes() as usize;
        let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let mut out: Vec<u8> = (0..nb * bb)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let factors: &[usize] = match ty {
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => &[0, 2],
        };
        for b in 0..nb {
            for (i, &at) in factors.iter().enumerate() {
                let v = 0.001 + 0.0007 * ((b + i) % 5) as f32;
                put_f16(&mut out[b * bb..], at, v);
            }
        }
        out
    }

    fn dot_row_in(fl: Flavour, ty: GgmlType, w: &[u8], a: &KActs, t: usize) -> f32 {
        let mut out = [0f32];
        dot_tokens_in(fl, ty, w, a, t, &mut out);
        out[0]
    }

    #[test]
    fn round_trip_error_is_within_each_formats_step() {
        let x = data(2 * QK_K, 3);
        for (ty, tol) in [
            // Half a step of each format on values in [-1, 1], plus the rounding of the scales.
            (GgmlType::Q2_K, 0.5),
            (GgmlType::Q3_K, 0.2),
            (GgmlType::Q4_K, 0.12),
            (GgmlType::Q5_K, 0.07),
            (GgmlType::Q6_K, 0.03),
        ] {
            let bytes = quantize_row(ty, &x);
            assert_eq!(bytes.len(), 2 * ty.block_bytes() as usize, "{ty:?} size");
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(err <= tol, "{ty:?}: max error {err} > {tol}");
        }
    }

    #[test]
    fn activations_quantize_like_ggml_q8_k() {
        let mut x = data(QK_K, 5);
        x[17] = -3.0;
        let a = quantize_acts_k(&x, QK_K);
        // The largest magnitude maps to -127 (its sign flipped into the scale).
        assert_eq!(a.qs[17], -127);
        assert!((a.d[0] - 3.0 / 127.0).abs() < 1e-7);
        for g in 0..16 {
            let s: i16 = a.qs[g * 16..(g + 1) * 16]
                .iter()
                .map(|&v| i16::from(v))
                .sum();
            assert_eq!(a.bsums[g], s);
        }
        let zeros = quantize_acts_k(&[0.0; QK_K], QK_K);
        assert!(zeros.qs.iter().all(|&v| v == 0) && zeros.d[0] == 0.0);
    }

    /// Every flavour this CPU supports equals the portable definition, and both are close to the
    /// f32 truth (dequantized weights times unquantized activations), on random bit patterns.
    #[test]
    fn every_supported_flavour_matches_the_definition_and_the_f32_reference() {
        let nb = 3;
        let cols = nb * QK_K;
        let x = data(2 * cols, 7);
        let a = quantize_acts_k(&x, cols);
        for fl in Flavour::ALL.into_iter().filter(|f| f.supported()) {
            for ty in TYPES {
                for seed in 0..4 {
                    let w = random_blocks(ty, nb, 11 + seed);
                    let mut deq = vec![0f32; cols];
                    dequantize_row(ty, &w, &mut deq);
                    let mut both = [0f32; 2];
                    dot_tokens_in(fl, ty, &w, &a, 0, &mut both);
                    for t in 0..2 {
                        let got = dot_row_in(fl, ty, &w, &a, t);
                        assert_eq!(got, both[t], "{} {ty:?}: one token vs two", fl.name());
                        let def = scalar_dot(
                            ty,
                            &w,
                            &a.qs[t * cols..(t + 1) * cols],
                            &a.d[t * nb..(t + 1) * nb],
                            &a.bsums[t * nb * 16..(t + 1) * nb * 16],
                            nb,
                        );
                        let truth: f64 = deq
                            .iter()
                            .zip(&x[t * cols..(t + 1) * cols])
                            .map(|(p, q)| f64::from(*p) * f64::from(*q))
                            .sum();
                        let scale: f64 = deq.iter().map(|v| f64::from(v.abs())).sum();
                        assert!(
                            (got - def).abs() <= 1e-4 * (1.0 + def.abs()),
                            "{} {ty:?} seed {seed} t {t}: {got} vs definition {def}",
                            fl.name()
                        );
                        // 8-bit activations: error well under 1% of the row's magnitude.
                        assert!(
                            (f64::from(got) - truth).abs() <= 0.01 * scale / 8.0 + 1e-3,
                            "{} {ty:?} seed {seed} t {t}: {got} vs f32 {truth}",
                            fl.name()
                        );
                    }
                }
            }
        }
    }
}
