//! The non-matmul operations of a llama layer — RMSNorm, SwiGLU and attention over an f16 KV
//! cache — computed with llama.cpp's CPU arithmetic, step for step: the same exp approximation,
//! the same summation trees and the same f16 roundings. SmolLM2-class models have outlier
//! channels that turn a one-ulp difference into a flipped 8-bit activation a few layers later,
//! so "close" is not enough to reproduce llama.cpp's log-probabilities; the order of every sum
//! is part of the definition here.
//!
//! The reference is ggml's x86 build with AVX-512 (as `scripts/bench-worker.sh` builds it):
//! `ggml_v_expf` (the AVX-512 form), `ggml_vec_soft_max_f32`, the non-flash attention path
//! (`kq = k·q` and `kqv = v·softmax` as f16 matmuls: tinyBLAS for a sequence's multi-token
//! batch, `ggml_vec_dot_f16` for one token). The scalar functions are the definition; the
//! AVX2 versions produce the same bits. [`attend_f32`] is the f32 reference path's attention,
//! over an f32 cache, with no half-precision rounding.

use half::f16;

/// ggml's `ggml_v_expf`: a degree-5 polynomial on the reduced argument, scaled by `2^n`
/// (max error 1.5 ulp). Inputs below about -103 give 0, above 88.7 give infinity.
#[inline]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),
        (-n).mul_add(f32::from_bits(0x3f31_7200), x),
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `j * 2^n` rounded once (AVX-512 `scalef`); `n` is integral.
#[inline]
fn scalef(j: f32, n: f32) -> f32 {
    if (-126.0..=127.0).contains(&n) {
        j * f32::from_bits(((n as i32 + 127) as u32) << 23)
    } else {
        // Subnormal or overflowing results: the f64 product is exact, one rounding to f32.
        (f64::from(j) * 2f64.powi(n as i32)) as f32
    }
}

/// `x / (1 + e^-x)`, as `ggml_v_silu`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

/// `g[i] = silu(g[i]) * u[i]` (llama.cpp's fused SwiGLU).
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = silu(*gv) * uv;
    }
}

/// `out = x / rms(x) * w`, with the mean of squares summed in f64 as ggml does.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// Sum of 16 lanes in the order of `_mm512_reduce_add_ps` (halves, quarters, pairs).
#[inline]
fn reduce16(v: &[f32; 16]) -> f32 {
    let mut t8 = [0f32; 8];
    for i in 0..8 {
        t8[i] = v[i + 8] + v[i];
    }
    let t4 = [t8[4] + t8[0], t8[5] + t8[1], t8[6] + t8[2], t8[7] + t8[3]];
    (t4[2] + t4[0]) + (t4[3] + t4[1])
}

/// How llama.cpp sums an f16 dot product: tinyBLAS (one 16-lane chain) when the sequence
/// brings several tokens, `ggml_vec_dot_f16` (four 16-lane chains) for a single token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotOrder {
    /// Prompt processing: several new tokens in the batch.
    Batched,
    /// One new token.
    Single,
}

fn dot_f16(a: &[f32], b: &[f16], order: DotOrder) -> f32 {
    let n = a.len();
    match order {
        DotOrder::Batched if n.is_multiple_of(16) => {
            let mut acc = [0f32; 16];
            for (ac, bc) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
                for l in 0..16 {
                    acc[l] = ac[l].mul_add(bc[l].to_f32(), acc[l]);
                }
            }
            reduce16(&acc)
        }
        _ => {
            let np = n & !63;
            let mut s = [[0f32; 16]; 4];
            for i in (0..np).step_by(64) {
                for (j, sj) in s.iter_mut().enumerate() {
                    for (l, v) in sj.iter_mut().enumerate() {
                        let e = i + 16 * j + l;
                        *v = a[e].mul_add(b[e].to_f32(), *v);
                    }
                }
            }
            let mut x = [0f32; 16];
            for l in 0..16 {
                x[l] = (s[0][l] + s[2][l]) + (s[1][l] + s[3][l]);
            }
            let mut sum = f64::from(reduce16(&x));
            for e in np..n {
                sum += f64::from(a[e] * b[e].to_f32());
            }
            sum as f32
        }
    }
}

/// Reusable buffers for the attention kernels.
#[derive(Debug, Default)]
pub struct AttnScratch {
    q: Vec<f32>,
    w: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<AttnScratch> = Default::default();
}

/// One query head against cached positions `0..n` of one KV head: `out = softmax(q·kᵀ ·
/// scale) · v`. `k` and `v` hold position `p`'s vector at `p * stride .. p * stride + hd`
/// (`hd = q.len()`). The query is rounded to f16 and the weights too, like the f16 matmuls
/// llama.cpp runs against its f16 cache.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    order: DotOrder,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(n > 0 && out.len() == hd, "attention shapes");
    assert!(k.len() >= (n - 1) * stride + hd && v.len() >= (n - 1) * stride + hd);
    SCRATCH.with_borrow_mut(|scratch| {
        #[cfg(target_arch = "x86_64")]
        if super::kernels::has_avx2() {
            // SAFETY: AVX2, FMA and F16C were detected at run time; shapes asserted above.
            unsafe { avx2::attend(q, k, v, stride, n, scale, order, scratch, out) };
            return;
        }
        attend_scalar(q, k, v, stride, n, scale, order, scratch, out);
    });
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_scalar(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    order: DotOrder,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let hd = q.len();
    scratch.q.clear();
    scratch
        .q
        .extend(q.iter().map(|x| f16::from_f32(*x).to_f32()));
    scratch.w.clear();
    for p in 0..n {
        let s = dot_f16(&scratch.q, &k[p * stride..p * stride + hd], order) * scale;
        scratch.w.push(s);
    }
    softmax_f16(&mut scratch.w);
    let w = &scratch.w;
    // kqv[d] = Σ_p v[p][d] · w[p], as the same kind of f16 dot product over positions.
    let chains = if order == DotOrder::Batched { 1 } else { 4 };
    scratch.acc.clear();
    scratch.acc.resize(chains * 16 * hd, 0.0);
    let acc = &mut scratch.acc;
    for (p, &wp) in w.iter().enumerate() {
        let a = (p / 16) % chains;
        let base = (a * 16 + p % 16) * hd;
        for (d, vv) in v[p * stride..p * stride + hd].iter().enumerate() {
            acc[base + d] = vv.to_f32().mul_add(wp, acc[base + d]);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        let mut lanes = [0f32; 16];
        for (l, lane) in lanes.iter_mut().enumerate() {
            let at = |a: usize| acc[(a * 16 + l) * hd + d];
            *lane = if chains == 1 {
                at(0)
            } else {
                (at(0) + at(2)) + (at(1) + at(3))
            };
        }
        *o = reduce16(&lanes);
    }
}

/// [`attend`] all in f32, for the f32 reference path and its f32 KV cache: nothing is rounded
/// to half precision, so a tensor-parallel group's summation-order noise stays at f32 rounding
/// instead of being stepped up to f16 ulps. Same layout and result as [`attend`] up to that
/// rounding; sums run in a fixed order (8 lanes, then pairwise), so the result is deterministic.
pub fn attend_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(n > 0 && out.len() == hd, "attention shapes");
    assert!(k.len() >= (n - 1) * stride + hd && v.len() >= (n - 1) * stride + hd);
    SCRATCH.with_borrow_mut(|scratch| {
        let w = &mut scratch.w;
        w.clear();
        w.extend((0..n).map(|p| dot_f32(q, &k[p * stride..p * stride + hd]) * scale));
        let mx = w.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f64;
        for s in w.iter_mut() {
            *s = expf(*s - mx);
            sum += f64::from(*s);
        }
        let inv = (1.0 / sum) as f32;
        out.fill(0.0);
        for (p, &wp) in w.iter().enumerate() {
            let wp = wp * inv;
            for (o, &vv) in out.iter_mut().zip(&v[p * stride..p * stride + hd]) {
                *o += wp * vv;
            }
        }
    });
}

/// `a · b` in f32 over 8 interleaved partial sums (vectorizable, fixed order).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// In place: scores → f16-rounded softmax weights, as `ggml_compute_forward_soft_max_f32`
/// (16-lane partial sums added in f64, then one multiply by the f32 reciprocal).
fn softmax_f16(w: &mut [f32]) {
    let mx = w.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f64;
    for chunk in w.chunks_mut(16) {
        let mut lanes = [0f32; 16];
        for (l, s) in chunk.iter_mut().enumerate() {
            *s = expf(*s - mx);
            lanes[l] = *s;
        }
        sum += f64::from(reduce16(&lanes));
    }
    let inv = (1.0 / sum) as f32;
    for s in w.iter_mut() {
        *s = f16::from_f32(*s * inv).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{AttnScratch, DotOrder, expf};

    /// 8 f16 values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: caller guarantees 8 readable values.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// `_mm512_reduce_add_ps` order of a 16-lane value held as two halves.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn reduce16(lo: __m256, hi: __m256) -> f32 {
        let t8 = _mm256_add_ps(hi, lo);
        let t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
        let t2 = _mm_add_ps(_mm_movehl_ps(t4, t4), t4);
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(q: &[f32], k: *const f16, order: DotOrder) -> f32 {
        let n = q.len();
        let qp = q.as_ptr();
        // SAFETY: `k` holds `n` values (caller), `q` is `n` long.
        unsafe {
            if order == DotOrder::Batched && n.is_multiple_of(16) {
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for i in (0..n).step_by(16) {
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8(k.add(i)), lo);
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), load8(k.add(i + 8)), hi);
                }
                return reduce16(lo, hi);
            }
            let np = n & !63;
            let mut s = [_mm256_setzero_ps(); 8];
            for i in (0..np).step_by(64) {
                for (h, sh) in s.iter_mut().enumerate() {
                    *sh = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(i + 8 * h)),
                        load8(k.add(i + 8 * h)),
                        *sh,
                    );
                }
            }
            // Chains j = 0..4, each as halves (2j, 2j + 1): (s0 + s2) + (s1 + s3).
            let lo = _mm256_add_ps(_mm256_add_ps(s[0], s[4]), _mm256_add_ps(s[2], s[6]));
            let hi = _mm256_add_ps(_mm256_add_ps(s[1], s[5]), _mm256_add_ps(s[3], s[7]));
            let mut sum = f64::from(reduce16(lo, hi));
            for (e, qe) in q.iter().enumerate().skip(np) {
                sum += f64::from(qe * (*k.add(e)).to_f32());
            }
            sum as f32
        }
    }

    /// `e^x` for 8 lanes, bit-identical to [`expf`] while every lane's exponent is normal.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp8(x: __m256) -> Option<__m256> {
        let r = _mm256_set1_ps(f32::from_bits(0x4b40_0000));
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3fb8_aa3b)), r);
        let n = _mm256_sub_ps(z, r);
        let range = _mm256_and_ps(
            _mm256_cmp_ps(n, _mm256_set1_ps(-126.0), _CMP_GE_OQ),
            _mm256_cmp_ps(n, _mm256_set1_ps(127.0), _CMP_LE_OQ),
        );
        if _mm256_movemask_ps(range) != 0xff {
            return None;
        }
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(f32::from_bits(0x35bf_be8e)),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x3f31_7200)), x),
        );
        let u = _mm256_mul_ps(b, b);
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                u,
                _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
            ),
            u,
            _mm256_fmadd_ps(c(0x3f7f_fff6), b, _mm256_set1_ps(1.0)),
        );
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        Some(_mm256_mul_ps(j, _mm256_castsi256_ps(e)))
    }

    /// `g = silu(g) * u`, bit-identical to [`super::swiglu`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 8 <= n {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                match exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)) {
                    Some(e) => {
                        let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                        let y = _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i)));
                        _mm256_storeu_ps(g.as_mut_ptr().add(i), y);
                    }
                    None => {
                        for j in i..i + 8 {
                            g[j] = super::silu(g[j]) * u[j];
                        }
                    }
                }
                i += 8;
            }
        }
        for j in i..n {
            g[j] = super::silu(g[j]) * u[j];
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        order: DotOrder,
        scratch: &mut AttnScratch,
        out: &mut [f32],
    ) {
        let hd = q.len();
        scratch.q.clear();
        scratch
            .q
            .extend(q.iter().map(|x| f16::from_f32(*x).to_f32()));
        scratch.w.clear();
        scratch.w.resize(n.next_multiple_of(16), 0.0);
        let w = &mut scratch.w;
        // SAFETY (all pointer reads below): the caller asserted `k`/`v` hold `n` rows of
        // `hd` at `stride`, and `w` is padded to a multiple of 16.
        unsafe {
            let mut mx = f32::NEG_INFINITY;
            for (p, s) in w.iter_mut().enumerate().take(n) {
                *s = dot(&scratch.q, k.as_ptr().add(p * stride), order) * scale;
                mx = mx.max(*s);
            }
            // Softmax: 16-lane partial sums (zeros past `n`), added in f64.
            let mut sum = 0f64;
            let mxv = _mm256_set1_ps(mx);
            for c in (0..n).step_by(16) {
                let mut halves = [_mm256_setzero_ps(); 2];
                for (h, half) in halves.iter_mut().enumerate() {
                    let at = c + 8 * h;
                    if at + 8 <= n {
                        let x = _mm256_sub_ps(_mm256_loadu_ps(w.as_ptr().add(at)), mxv);
                        if let Some(e) = exp8(x) {
                            _mm256_storeu_ps(w.as_mut_ptr().add(at), e);
                            *half = e;
                            continue;
                        }
                    }
                    for s in &mut w[at.min(n)..(at + 8).min(n)] {
                        *s = expf(*s - mx);
                    }
                    *half = _mm256_loadu_ps(w.as_ptr().add(at));
                }
                sum += f64::from(reduce16(halves[0], halves[1]));
            }
            let inv = (1.0 / sum) as f32;
            for s in &mut w[..n] {
                *s = f16::from_f32(*s * inv).to_f32();
            }
            // kqv: accumulators [chain][lane][hd], position p feeds lane p % 16 of chain
            // (p / 16) % chains.
            let chains = if order == DotOrder::Batched { 1 } else { 4 };
            scratch.acc.clear();
            scratch.acc.resize(chains * 16 * hd, 0.0);
            let acc = scratch.acc.as_mut_ptr();
            let vec8 = hd / 8 * 8;
            for (p, &wp) in w.iter().enumerate().take(n) {
                let base = ((p / 16) % chains * 16 + p % 16) * hd;
                let wv = _mm256_set1_ps(wp);
                let vp = v.as_ptr().add(p * stride);
                let mut d = 0;
                while d < vec8 {
                    let a = acc.add(base + d);
                    _mm256_storeu_ps(a, _mm256_fmadd_ps(load8(vp.add(d)), wv, _mm256_loadu_ps(a)));
                    d += 8;
                }
                for d in vec8..hd {
                    let a = acc.add(base + d);
                    *a = (*vp.add(d)).to_f32().mul_add(wp, *a);
                }
            }
            let lane = |a: usize, l: usize, d: usize| acc.add((a * 16 + l) * hd + d);
            let mut d = 0;
            while d < vec8 {
                let mut lanes = [_mm256_setzero_ps(); 16];
                for (l, lv) in lanes.iter_mut().enumerate() {
                    *lv = if chains == 1 {
                        _mm256_loadu_ps(lane(0, l, d))
                    } else {
                        _mm256_add_ps(
                            _mm256_add_ps(
                                _mm256_loadu_ps(lane(0, l, d)),
                                _mm256_loadu_ps(lane(2, l, d)),
                            ),
                            _mm256_add_ps(
                                _mm256_loadu_ps(lane(1, l, d)),
                                _mm256_loadu_ps(lane(3, l, d)),
                            ),
                        )
                    };
                }
                // The reduce16 tree, across lanes, for 8 dimensions at once.
                let t8: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_add_ps(lanes[i + 8], lanes[i]));
                let t4: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(t8[i + 4], t8[i]));
                let r = _mm256_add_ps(_mm256_add_ps(t4[2], t4[0]), _mm256_add_ps(t4[3], t4[1]));
                _mm256_storeu_ps(out.as_mut_ptr().add(d), r);
                d += 8;
            }
            for (d, o) in out.iter_mut().enumerate().skip(vec8) {
                let mut lanes = [0f32; 16];
                for (l, lv) in lanes.iter_mut().enumerate() {
                    let at = |a: usize| *lane(a, l, d);
                    *lv = if chains == 1 {
                        at(0)
                    } else {
                        (at(0) + at(2)) + (at(1) + at(3))
                    };
                }
                *o = super::reduce16(&lanes);
            }
        }
    }
}

/// [`swiglu`] with the AVX2 kernel where available (same bits).
pub fn swiglu_fast(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { avx2::swiglu(g, u) };
        return;
    }
    swiglu(g, u);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::kernels::tests::scaled_data as data;

    #[test]
    fn expf_is_within_two_ulp_of_libm_and_handles_the_ends() {
        for x in data(10_000, 1, 80.0)
            .into_iter()
            .chain([0.0, -0.0, 1.0, -1.0])
        {
            let (got, want) = (expf(x), f64::from(x).exp());
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (f64::from(got) - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        // Subnormal results round once.
        let tiny = expf(-100.0);
        assert!(tiny > 0.0 && (f64::from(tiny) - (-100f64).exp()).abs() < 1e-44);
    }

    #[test]
    fn swiglu_simd_matches_scalar_bits_and_the_f32_reference() {
        let g0 = data(1000, 2, 12.0);
        let u = data(1000, 3, 2.0);
        let mut a = g0.clone();
        let mut b = g0.clone();
        swiglu(&mut a, &u);
        swiglu_fast(&mut b, &u);
        assert_eq!(a, b);
        for ((x, y), uv) in g0.iter().zip(&a).zip(&u) {
            let want = f64::from(*x) / (1.0 + (-f64::from(*x)).exp()) * f64::from(*uv);
            assert!((f64::from(*y) - want).abs() <= 1e-5 * (1.0 + want.abs()));
        }
    }

    #[test]
    fn rms_norm_matches_the_f64_reference() {
        let x = data(576, 4, 3.0);
        let w = data(576, 5, 1.0);
        let mut out = vec![0f32; 576];
        rms_norm(&x, &w, 1e-5, &mut out);
        let ms = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 576.0;
        for ((o, v), g) in out.iter().zip(&x).zip(&w) {
            let want = f64::from(*v) / (ms + 1e-5).sqrt() * f64::from(*g);
            assert!((f64::from(*o) - want).abs() < 1e-5);
        }
    }

    /// Plain f64 attention over the f16 values.
    fn reference(q: &[f32], k: &[f16], v: &[f16], stride: usize, n: usize, scale: f32) -> Vec<f64> {
        let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|h| h.to_f32()).collect() };
        reference_f32(q, &wide(k), &wide(v), stride, n, scale)
    }

    /// Plain f64 attention over the f32 values.
    fn reference_f32(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        n: usize,
        scale: f32,
    ) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = (0..n)
            .map(|p| {
                (0..hd)
                    .map(|d| f64::from(q[d]) * f64::from(k[p * stride + d]))
                    .sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..hd)
            .map(|d| {
                (0..n)
                    .map(|p| e[p] / sum * f64::from(v[p * stride + d]))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn f32_attention_matches_the_f64_reference_to_f32_rounding() {
        for (hd, stride, n) in [
            (64, 192, 1),
            (64, 192, 37),
            (64, 64, 130),
            (72, 144, 21),
            (8, 8, 5),
        ] {
            let q = data(hd, 6, 2.0);
            let k = data(n * stride, 7, 2.0);
            let v = data(n * stride, 8, 1.0);
            let scale = 1.0 / (hd as f32).sqrt();
            let want = reference_f32(&q, &k, &v, stride, n, scale);
            let mut got = vec![0f32; hd];
            attend_f32(&q, &k, &v, stride, n, scale, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "hd {hd} n {n}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn attention_matches_f64_reference_and_simd_matches_scalar_bits() {
        let mut scratch = AttnScratch::default();
        for (hd, stride, n) in [
            (64, 192, 1),
            (64, 192, 37),
            (64, 64, 130),
            (72, 144, 21),
            (8, 8, 5),
        ] {
            let q = data(hd, 6, 2.0);
            let k: Vec<f16> = data(n * stride, 7, 2.0)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let v: Vec<f16> = data(n * stride, 8, 1.0)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let want = reference(&q, &k, &v, stride, n, scale);
            for order in [DotOrder::Batched, DotOrder::Single] {
                let mut a = vec![0f32; hd];
                let mut b = vec![0f32; hd];
                attend(&q, &k, &v, stride, n, scale, order, &mut a);
                attend_scalar(&q, &k, &v, stride, n, scale, order, &mut scratch, &mut b);
                assert_eq!(a, b, "hd {hd} n {n} {order:?}: SIMD and scalar differ");
                for (got, w) in a.iter().zip(&want) {
                    // f16 query and weights: ~1e-3 relative.
                    assert!(
                        (f64::from(*got) - w).abs() <= 3e-3 * (1.0 + w.abs()),
                        "hd {hd} n {n} {order:?}: {got} vs {w}"
                    );
                }
            }
        }
    }
}
