use std::arch::x86_64::*;

use super::q32;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h(blk: *const u8, off: usize) -> f32 {
    // SAFETY: callers pass pointers inside a block of at least off+2 bytes.
    let bits = unsafe { (blk.add(off) as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: every load is within `n` elements of both slices.
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
    }
    let mut s = hsum(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// One block of a 32-value format (`F`, see [`q32`]) as unsigned bytes in element order: the
/// nibbles (low ones first) and, for Q5, the fifth bit of each value from its 32-bit mask.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const F: u8>(blk: *const u8) -> __m256i {
    let q0 = q32::block_bytes(F) - 16;
    // SAFETY: `blk` points at one whole block (caller's contract).
    let raw = unsafe { _mm_loadu_si128(blk.add(q0) as *const __m128i) };
    let nib = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
        _mm256_set1_epi8(0x0F),
    );
    if !q32::five(F) {
        return nib;
    }
    // SAFETY: the 4 mask bytes precede the nibbles inside the block.
    let qh = unsafe { (blk.add(q0 - 4) as *const u32).read_unaligned() };
    // Byte e takes byte e / 8 of the mask; it is all ones when bit e % 8 is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let set = _mm256_cmpeq_epi8(
        _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
        _mm256_set1_epi64x(-1),
    );
    _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// The pair sums of one block's values `$u` times the activations `$a`, in llama.cpp's lanes:
/// unsigned values times signed activations for formats with a min; for offset formats the
/// signed values `u - offset` through the sign trick (`|x| * sign(a, x)`), so every lane holds
/// the integer ggml's `mul_sum_i8_pairs_float` holds and the float sums round alike.
macro_rules! pair_sums {
    ($f:expr, $u:expr, $a:expr, $mul:path, $ones:expr) => {{
        if q32::has_min($f) {
            $mul($u, $a, $ones)
        } else {
            let x = _mm256_sub_epi8($u, _mm256_set1_epi8(q32::offset($f) as i8));
            $mul(_mm256_sign_epi8(x, x), _mm256_sign_epi8($a, x), $ones)
        }
    }};
}

/// One row of a 32-value format against one activation row (the leftover rows of a task).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q32<const F: u8>(
    w: &[u8],
    qs: &[i8],
    d: &[f32],
    s: &[f32],
    nb: usize,
) -> f32 {
    let bb = q32::block_bytes(F);
    assert!(w.len() >= nb * bb && qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
    let mut acc = _mm256_setzero_ps();
    let mut summ = 0f32;
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        // SAFETY: bounds asserted above.
        unsafe {
            let blk = w.as_ptr().add(b * bb);
            let av = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            let p = pair_sums!(F, unpack::<F>(blk), av, mul_avx2, ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h(blk, 0) * d[b]), _mm256_cvtepi32_ps(p), acc);
            if q32::has_min(F) {
                summ += h(blk, 2) * s[b];
            }
        }
    }
    hsum(acc) + summ
}

/// u8×i8 pair sums to i32 lanes with AVX2 (maddubs + madd; no saturation for 4- and 5-bit
/// weights).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_avx2(w: __m256i, a: __m256i, ones: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones)
}

/// The same with one AVX-VNNI instruction.
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn mul_vnni(w: __m256i, a: __m256i, _ones: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
}

/// The same with AVX512-VNNI on 256-bit registers (AVX512VL).
#[inline]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
fn mul_vnni512(w: __m256i, a: __m256i, _ones: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
}

/// How many blocks ahead the decode kernels prefetch each weight row.
const PREFETCH_BLOCKS: usize = 12;

/// The kernels of the 32-value formats, instantiated once per instruction set.
macro_rules! q32_kernels {
    ($feat:literal, $mul:path) => {
        /// Four rows of format `F` (see [`q32`]) against one activation row.
        #[target_feature(enable = $feat)]
        pub(in super::super) unsafe fn dot4_q32<const F: u8>(
            w: [&[u8]; 4],
            qs: &[i8],
            d: &[f32],
            s: &[f32],
            nb: usize,
        ) -> [f32; 4] {
            let bb = q32::block_bytes(F);
            assert!(w.iter().all(|r| r.len() >= nb * bb));
            assert!(qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut off = [0f32; 4];
            let ones = _mm256_set1_epi16(1);
            for b in 0..nb {
                // SAFETY: bounds asserted above.
                unsafe {
                    let av = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
                    let (da, sa) = (*d.get_unchecked(b), *s.get_unchecked(b));
                    for r in 0..4 {
                        let blk = w[r].as_ptr().add(b * bb);
                        // Four weight streams per thread outrun the hardware prefetcher.
                        _mm_prefetch::<_MM_HINT_T0>(
                            blk.wrapping_add(PREFETCH_BLOCKS * bb) as *const i8
                        );
                        let p = pair_sums!(F, unpack::<F>(blk), av, $mul, ones);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(h(blk, 0) * da),
                            _mm256_cvtepi32_ps(p),
                            acc[r],
                        );
                        if q32::has_min(F) {
                            off[r] += h(blk, 2) * sa;
                        }
                    }
                }
            }
            [
                hsum(acc[0]) + off[0],
                hsum(acc[1]) + off[1],
                hsum(acc[2]) + off[2],
                hsum(acc[3]) + off[3],
            ]
        }

        /// `R` rows of format `F` against `T` activation rows (`qs`, `d`, `s` hold them one
        /// after another): prefill unpacks each weight block once for `T` tokens.
        #[target_feature(enable = $feat)]
        pub(in super::super) unsafe fn dot_rxt_q32<const F: u8, const R: usize, const T: usize>(
            w: [&[u8]; R],
            qs: &[i8],
            d: &[f32],
            s: &[f32],
            nb: usize,
        ) -> [[f32; R]; T] {
            let bb = q32::block_bytes(F);
            assert!(w.iter().all(|r| r.len() >= nb * bb));
            assert!(qs.len() >= T * nb * 32 && d.len() >= T * nb && s.len() >= T * nb);
            let mut acc = [[_mm256_setzero_ps(); R]; T];
            let mut off = [[0f32; R]; T];
            let ones = _mm256_set1_epi16(1);
            for b in 0..nb {
                // SAFETY: bounds asserted above.
                unsafe {
                    let mut a = [_mm256_setzero_si256(); T];
                    for (t, at) in a.iter_mut().enumerate() {
                        *at = _mm256_loadu_si256(
                            qs.as_ptr().add((t * nb + b) * 32) as *const __m256i
                        );
                    }
                    for r in 0..R {
                        let blk = w[r].as_ptr().add(b * bb);
                        let wv = unpack::<F>(blk);
                        let dw = h(blk, 0);
                        for t in 0..T {
                            let p = pair_sums!(F, wv, a[t], $mul, ones);
                            acc[t][r] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * *d.get_unchecked(t * nb + b)),
                                _mm256_cvtepi32_ps(p),
                                acc[t][r],
                            );
                        }
                        if q32::has_min(F) {
                            let m = h(blk, 2);
                            for t in 0..T {
                                off[t][r] += m * *s.get_unchecked(t * nb + b);
                            }
                        }
                    }
                }
            }
            let mut out = [[0f32; R]; T];
            for t in 0..T {
                for r in 0..R {
                    out[t][r] = hsum(acc[t][r]) + off[t][r];
                }
            }
            out
        }

        /// [`dot_rxt_q32`] on rows unpacked once by [`unpack_rows`] (`vals`: 64 bytes a
        /// block, `dw`/`mw` its scale and min): the same integers and floats in the same order,
        /// without unpacking each weight block again for every tile of tokens.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub(in super::super) unsafe fn dot_rxt_pre<const F: u8, const R: usize, const T: usize>(
            vals: [&[u8]; R],
            dw: [&[f32]; R],
            mw: [&[f32]; R],
            qs: &[i8],
            d: &[f32],
            s: &[f32],
            nb: usize,
        ) -> [[f32; R]; T] {
            assert!(
                (0..R).all(|r| vals[r].len() >= nb * 64 && dw[r].len() >= nb && mw[r].len() >= nb)
            );
            assert!(qs.len() >= T * nb * 32 && d.len() >= T * nb && s.len() >= T * nb);
            let mut acc = [[_mm256_setzero_ps(); R]; T];
            let mut off = [[0f32; R]; T];
            let ones = _mm256_set1_epi16(1);
            for b in 0..nb {
                // SAFETY: bounds asserted above.
                unsafe {
                    let mut a = [_mm256_setzero_si256(); T];
                    for (t, at) in a.iter_mut().enumerate() {
                        *at = _mm256_loadu_si256(
                            qs.as_ptr().add((t * nb + b) * 32) as *const __m256i
                        );
                    }
                    for r in 0..R {
                        let v = vals[r].as_ptr().add(b * 64);
                        let w0 = _mm256_loadu_si256(v as *const __m256i);
                        let dwr = *dw[r].get_unchecked(b);
                        if q32::has_min(F) {
                            for t in 0..T {
                                let p = $mul(w0, a[t], ones);
                                acc[t][r] = _mm256_fmadd_ps(
                                    _mm256_set1_ps(dwr * *d.get_unchecked(t * nb + b)),
                                    _mm256_cvtepi32_ps(p),
                                    acc[t][r],
                                );
                            }
                            let m = *mw[r].get_unchecked(b);
                            for t in 0..T {
                                off[t][r] += m * *s.get_unchecked(t * nb + b);
                            }
                        } else {
                            let x = _mm256_loadu_si256(v.add(32) as *const __m256i);
                            for t in 0..T {
                                let p = $mul(w0, _mm256_sign_epi8(a[t], x), ones);
                                acc[t][r] = _mm256_fmadd_ps(
                                    _mm256_set1_ps(dwr * *d.get_unchecked(t * nb + b)),
                                    _mm256_cvtepi32_ps(p),
                                    acc[t][r],
                                );
                            }
                        }
                    }
                }
            }
            let mut out = [[0f32; R]; T];
            for t in 0..T {
                for r in 0..R {
                    out[t][r] = hsum(acc[t][r]) + off[t][r];
                }
            }
            out
        }

        /// Four Q8_0 rows against one activation row.
        #[target_feature(enable = $feat)]
        pub(in super::super) unsafe fn dot4_q8_0(
            w: [&[u8]; 4],
            qs: &[i8],
            d: &[f32],
            nb: usize,
        ) -> [f32; 4] {
            assert!(w.iter().all(|r| r.len() >= nb * 34));
            assert!(qs.len() >= nb * 32 && d.len() >= nb);
            let mut acc = [_mm256_setzero_ps(); 4];
            let ones = _mm256_set1_epi16(1);
            for (b, &da) in d.iter().enumerate().take(nb) {
                // SAFETY: bounds asserted above.
                unsafe {
                    let av = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
                    for r in 0..4 {
                        let blk = w[r].as_ptr().add(b * 34);
                        _mm_prefetch::<_MM_HINT_T0>(
                            blk.wrapping_add(PREFETCH_BLOCKS * 34) as *const i8
                        );
                        let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                        let aw = _mm256_sign_epi8(wv, wv);
                        let sa = _mm256_sign_epi8(av, wv);
                        let p = $mul(aw, sa, ones);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(h(blk, 0) * da),
                            _mm256_cvtepi32_ps(p),
                            acc[r],
                        );
                    }
                }
            }
            [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
        }
    };
}

/// Plain AVX2 + FMA.
pub(super) mod plain {
    use super::*;
    q32_kernels!("avx2,fma,f16c", mul_avx2);
}

/// AVX2 + FMA + AVX-VNNI.
pub(super) mod vnni {
    use super::*;
    q32_kernels!("avx2,fma,f16c,avxvnni", mul_vnni);
}

/// AVX2 + FMA + AVX512-VNNI/VL (256-bit).
pub(super) mod vnni512 {
    use super::*;
    q32_kernels!("avx2,fma,f16c,avx512vnni,avx512vl", mul_vnni512);
}

/// Unpacks a row of format `F` for [`plain::dot_rxt_pre`] and its kin: per block, 32 bytes of
/// the values the pair sums multiply (`|u - offset|`, or `u` for formats with a min), then 32
/// bytes of `u - offset` (whose signs the activations take), and the scale and min as f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn unpack_rows<const F: u8>(
    row: &[u8],
    nb: usize,
    vals: &mut [u8],
    dw: &mut [f32],
    mw: &mut [f32],
) {
    let bb = q32::block_bytes(F);
    assert!(row.len() >= nb * bb && vals.len() >= nb * 64 && dw.len() >= nb && mw.len() >= nb);
    for b in 0..nb {
        // SAFETY: bounds asserted above.
        unsafe {
            let blk = row.as_ptr().add(b * bb);
            let u = unpack::<F>(blk);
            let out = vals.as_mut_ptr().add(b * 64);
            if q32::has_min(F) {
                _mm256_storeu_si256(out as *mut __m256i, u);
                *mw.get_unchecked_mut(b) = h(blk, 2);
            } else {
                let x = _mm256_sub_epi8(u, _mm256_set1_epi8(q32::offset(F) as i8));
                _mm256_storeu_si256(out as *mut __m256i, _mm256_sign_epi8(x, x));
                _mm256_storeu_si256(out.add(32) as *mut __m256i, x);
            }
            *dw.get_unchecked_mut(b) = h(blk, 0);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_q8_0(w: &[u8], qs: &[i8], d: &[f32], nb: usize) -> f32 {
    assert!(w.len() >= nb * 34 && qs.len() >= nb * 32 && d.len() >= nb);
    let mut acc = _mm256_setzero_ps();
    let ones = _mm256_set1_epi16(1);
    for (b, &db) in d.iter().enumerate().take(nb) {
        // SAFETY: bounds asserted above.
        unsafe {
            let blk = w.as_ptr().add(b * 34);
            let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let av = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            let sa = _mm256_sign_epi8(av, wv);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h(blk, 0) * db), _mm256_cvtepi32_ps(p), acc);
        }
    }
    hsum(acc)
}
