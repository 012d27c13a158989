//! The AVX2 K-quant kernel: the same bits as [`super::decode`], unpacked with vector shifts.

use std::arch::x86_64::*;

use super::QK_K;
use crate::backend::cpu::f16_at;
use crate::model::gguf::GgmlType;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// `sum_k sum_e u[k][e] * a[32k + e] * scale[(32k + e) / 16]` for one super-block: `u` holds
/// unsigned values (< 64), so `maddubs` cannot saturate (2 * 63 * 127 < 2^15).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted(u: &[__m256i; 8], a: *const i8, scale: &[__m256i; 8]) -> __m256i {
    let mut sum = _mm256_setzero_si256();
    for k in 0..8 {
        // SAFETY: the caller passes 256 readable activations.
        let ak = unsafe { _mm256_loadu_si256(a.add(32 * k) as *const __m256i) };
        let p = _mm256_maddubs_epi16(u[k], ak);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, scale[k]));
    }
    sum
}

/// The scales of groups `2k` and `2k + 1` as the 16-bit lanes `weighted` multiplies by.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_lanes(scale: &[i16; 16]) -> [__m256i; 8] {
    std::array::from_fn(|k| {
        _mm256_set_m128i(
            _mm_set1_epi16(scale[2 * k + 1]),
            _mm_set1_epi16(scale[2 * k]),
        )
    })
}

/// Broadcast bit `shift` of every byte of `v` to the value `1 << to` (0 when clear).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits(v: __m256i, mask: u8, shift: i32, to: i32) -> __m256i {
    let s = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift));
    let m = _mm256_and_si256(s, _mm256_set1_epi8(mask as i8));
    _mm256_sll_epi16(m, _mm_cvtsi32_si128(to))
}

/// One K-quant row against `out.len()` activation rows (`qs`, `d`, `bsums` hold them one
/// after another): the values are unpacked once per super-block to unsigned bytes (Q3_K
/// and Q6_K offset by +4 and +32, taken back through the 16-value sums), multiplied with
/// `maddubs`, weighted by the group scales with `madd`, and the mins subtracted.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(
    ty: GgmlType,
    w: &[u8],
    qs: &[i8],
    d: &[f32],
    bsums: &[i16],
    nb: usize,
    out: &mut [f32],
) {
    let bb = ty.block_bytes() as usize;
    let n = out.len();
    assert!(w.len() >= nb * bb && qs.len() >= n * nb * QK_K);
    assert!(d.len() >= n * nb && bsums.len() >= n * nb * 16);
    let mut acc = [0f32; super::MAX_TOKENS];
    let lo4 = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    for b in 0..nb {
        let blk = &w[b * bb..(b + 1) * bb];
        let mut u = [zero; 8];
        let mut scale = [0i16; 16];
        let mut min = [0i16; 16];
        // The offset taken back from unsigned values: `offset * sum_g scale_g * bsum_g`.
        let mut offset = 0i32;
        let (dw, dmin);
        let ld = |at: usize| {
            // SAFETY: callers read 32 bytes inside the block (sizes fixed by the format).
            unsafe { _mm256_loadu_si256(blk.as_ptr().add(at) as *const __m256i) }
        };
        match ty {
            GgmlType::Q2_K => {
                for g in 0..16 {
                    scale[g] = i16::from(blk[g] & 0xF);
                    min[g] = i16::from(blk[g] >> 4);
                }
                for n in 0..2 {
                    let q = ld(16 + 32 * n);
                    for j in 0..4 {
                        u[4 * n + j] = bits(q, 3, 2 * j as i32, 0);
                    }
                }
                dw = f16_at(blk, 80);
                dmin = f16_at(blk, 82);
            }
            GgmlType::Q3_K => {
                for (g, s) in scale.iter_mut().enumerate() {
                    *s = super::q3_scale(g, &blk[96..108]);
                }
                let hm = ld(0);
                for n in 0..2 {
                    let q = ld(32 + 32 * n);
                    for j in 0..4 {
                        let low = bits(q, 3, 2 * j as i32, 0);
                        let high = bits(hm, 1, (4 * n + j) as i32, 2);
                        u[4 * n + j] = _mm256_or_si256(low, high);
                    }
                }
                offset = 4;
                dw = f16_at(blk, 108);
                dmin = 0.0;
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let sc = &blk[4..16];
                for s in 0..8 {
                    let (a, m) = super::scale_min_k4(s, sc);
                    scale[2 * s..2 * s + 2].fill(i16::from(a));
                    min[2 * s..2 * s + 2].fill(i16::from(m));
                }
                let five = ty == GgmlType::Q5_K;
                let q0 = if five { 48 } else { 16 };
                let qh = if five { ld(16) } else { zero };
                for j in 0..4 {
                    let q = ld(q0 + 32 * j);
                    u[2 * j] = _mm256_and_si256(q, lo4);
                    u[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
                    if five {
                        let s = 2 * j as i32;
                        u[2 * j] = _mm256_or_si256(u[2 * j], bits(qh, 1, s, 4));
                        u[2 * j + 1] = _mm256_or_si256(u[2 * j + 1], bits(qh, 1, s + 1, 4));
                    }
                }
                dw = f16_at(blk, 0);
                dmin = f16_at(blk, 2);
            }
            GgmlType::Q6_K => {
                for (g, s) in scale.iter_mut().enumerate() {
                    *s = i16::from(blk[192 + g] as i8);
                }
                for n in 0..2 {
                    let ql0 = ld(64 * n);
                    let ql1 = ld(64 * n + 32);
                    let qh = ld(128 + 32 * n);
                    let hi4 = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
                    u[4 * n] = _mm256_or_si256(_mm256_and_si256(ql0, lo4), bits(qh, 3, 0, 4));
                    u[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(ql1, lo4), bits(qh, 3, 2, 4));
                    u[4 * n + 2] = _mm256_or_si256(hi4(ql0), bits(qh, 3, 4, 4));
                    u[4 * n + 3] = _mm256_or_si256(hi4(ql1), bits(qh, 3, 6, 4));
                }
                offset = 32;
                dw = f16_at(blk, 208);
                dmin = 0.0;
            }
            _ => unreachable!("the K-quant kernel is only called for K-quants"),
        }
        let lanes = scale_lanes(&scale);
        // SAFETY: reads 16 i16 from each 16-value array.
        let (scale_v, min_v) = unsafe {
            (
                _mm256_loadu_si256(scale.as_ptr() as *const __m256i),
                _mm256_loadu_si256(min.as_ptr() as *const __m256i),
            )
        };
        let off_v = _mm256_set1_epi32(offset);
        for (j, acc) in acc.iter_mut().enumerate().take(n) {
            let at = j * nb + b;
            // SAFETY: 256 activations and 16 sums of block `b` of token `j` are in bounds
            // (asserted above).
            let (v, bs) = unsafe {
                (
                    weighted(&u, qs.as_ptr().add(at * QK_K), &lanes),
                    _mm256_loadu_si256(bsums.as_ptr().add(at * 16) as *const __m256i),
                )
            };
            // The offset and the mins, weighted by the 16-value sums, in 32-bit lanes.
            let corr = _mm256_mullo_epi32(_mm256_madd_epi16(scale_v, bs), off_v);
            let sumi = hsum_i32(_mm256_sub_epi32(v, corr));
            let summ = hsum_i32(_mm256_madd_epi16(min_v, bs));
            *acc += d[at] * (dw * sumi as f32 - dmin * summ as f32);
        }
    }
    out.copy_from_slice(&acc[..n]);
}
