//! The dot-product kernels: weight row (ggml blocks) × activations quantized to 8-bit blocks of 32.
//! AVX2+FMA versions are picked at run time; the scalar versions are the portable fallback and the
//! definition of the arithmetic.

use std::sync::OnceLock;

use super::f16_at;
use crate::model::gguf::GgmlType;

/// Activations of `n` rows quantized to blocks of 32 int8 with a scale `d` and `s = d * sum(q)`.
#[derive(Debug, Clone)]
pub struct QuantActs {
    /// Quantized values, `n * cols`.
    pub qs: Vec<i8>,
    /// Per-block scales, `n * cols / 32`.
    pub d: Vec<f32>,
    /// Per-block `d * sum(q)`, used by offset formats (Q4_0's -8, Q4_1's min).
    pub s: Vec<f32>,
    /// Blocks per row.
    pub blocks: usize,
}

/// A set of kernels. Each is exact to the scalar definition up to float summation order; the
/// kernels use the best one this CPU has ([`flavour`]), and tests run every one it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Scalar Rust, any CPU: the definition of the arithmetic.
    Portable,
    /// AVX2 + FMA + F16C, `maddubs` + `madd` for the u8×i8 dots.
    Avx2,
    /// AVX2 with AVX-VNNI (VEX `vpdpbusd`: Intel Alder Lake / Sapphire Rapids and later).
    AvxVnni,
    /// AVX2 with AVX512-VNNI and AVX512VL (EVEX `vpdpbusd` on 256-bit registers: Ice Lake,
    /// Zen 4).
    Avx512Vnni,
}

impl Flavour {
    /// Every flavour, portable first.
    pub const ALL: [Flavour; 4] = [
        Flavour::Portable,
        Flavour::Avx2,
        Flavour::AvxVnni,
        Flavour::Avx512Vnni,
    ];

    /// Short name, as logs and test output print it.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Portable => "portable",
            Flavour::Avx2 => "avx2",
            Flavour::AvxVnni => "avx-vnni",
            Flavour::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the flavour.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            };
            match self {
                Flavour::Portable => true,
                Flavour::Avx2 => avx2(),
                Flavour::AvxVnni => avx2() && std::is_x86_feature_detected!("avxvnni"),
                Flavour::Avx512Vnni => {
                    avx2()
                        && std::is_x86_feature_detected!("avx512vnni")
                        && std::is_x86_feature_detected!("avx512vl")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Flavour::Portable
        }
    }

    fn simd(self) -> bool {
        self != Flavour::Portable
    }
}

/// The flavour the kernels use: AVX-VNNI, else AVX512-VNNI, else AVX2, else portable (checked
/// once).
pub fn flavour() -> Flavour {
    static F: OnceLock<Flavour> = OnceLock::new();
    *F.get_or_init(|| {
        [Flavour::AvxVnni, Flavour::Avx512Vnni, Flavour::Avx2]
            .into_iter()
            .find(|f| f.supported())
            .unwrap_or(Flavour::Portable)
    })
}

/// Whether the SIMD (AVX2, FMA, F16C) kernels are in use.
pub fn has_avx2() -> bool {
    flavour().simd()
}

/// Calls `avx2::<flavour>::$kernel(args)` for a SIMD flavour. Callers have checked that the
/// flavour is SIMD and supported by this CPU.
#[cfg(target_arch = "x86_64")]
macro_rules! by_vnni {
    ($fl:expr, $kernel:ident $(::<$n:literal>)? ($($arg:expr),* $(,)?)) => {
        match $fl {
            Flavour::AvxVnni => avx2::vnni::$kernel$(::<$n>)?($($arg),*),
            Flavour::Avx512Vnni => avx2::vnni512::$kernel$(::<$n>)?($($arg),*),
            Flavour::Avx2 | Flavour::Portable => avx2::plain::$kernel$(::<$n>)?($($arg),*),
        }
    };
}

/// Quantize `x` (rows of `cols`, a multiple of 32) to 8-bit blocks.
pub fn quantize_acts(x: &[f32], cols: usize) -> QuantActs {
    quantize_acts_in(flavour(), x, cols)
}

/// [`quantize_acts`] with the kernels of `fl` (a flavour this CPU supports).
fn quantize_acts_in(fl: Flavour, x: &[f32], cols: usize) -> QuantActs {
    let blocks_total = x.len() / 32;
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; blocks_total];
    let mut s = vec![0f32; blocks_total];
    #[cfg(target_arch = "x86_64")]
    if fl.simd() {
        // SAFETY: AVX2 was detected at run time (the same code, with SIMD rounding).
        unsafe { quantize_blocks_avx2(x, &mut qs, &mut d, &mut s) };
        return QuantActs {
            qs,
            d,
            s,
            blocks: cols / 32,
        };
    }
    quantize_blocks(x, &mut qs, &mut d, &mut s);
    QuantActs {
        qs,
        d,
        s,
        blocks: cols / 32,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    quantize_blocks(x, qs, d, s);
}

#[inline(always)]
fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Exactly ggml's x86 quantize_row_q8_0/q8_1: `127 / amax` as the inverse scale and
        // round-half-to-even (`_mm256_round_ps`). Attention outputs are f16 values, so exact
        // ties are common, and a flipped tie is amplified through SmolLM2's outlier channels.
        let db = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i8;
            *q = r;
            sum += i32::from(r);
        }
        // Scales are stored as f16 like ggml's block_q8_1, so results match llama.cpp closely.
        d[b] = half::f16::from_f32(db).to_f32();
        s[b] = half::f16::from_f32(db * sum as f32).to_f32();
    }
}

/// Plain f32 dot product.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dot product of one quantized weight row with activation row `t` of `q`.
pub fn dot_row(ty: GgmlType, w: &[u8], q: &QuantActs, t: usize) -> f32 {
    dot_row_in(flavour(), ty, w, q, t)
}

fn dot_row_in(fl: Flavour, ty: GgmlType, w: &[u8], q: &QuantActs, t: usize) -> f32 {
    let nb = q.blocks;
    let qs = &q.qs[t * nb * 32..(t + 1) * nb * 32];
    let d = &q.d[t * nb..(t + 1) * nb];
    let s = &q.s[t * nb..(t + 1) * nb];
    #[cfg(target_arch = "x86_64")]
    if fl.simd() {
        // SAFETY: AVX2 and FMA were detected; slices hold `nb` blocks (checked by callers' shapes).
        unsafe {
            return match ty {
                GgmlType::Q4_1 => avx2::dot_q4_1(w, qs, d, s, nb),
                GgmlType::Q4_0 => avx2::dot_q4_0(w, qs, d, s, nb),
                GgmlType::Q8_0 => avx2::dot_q8_0(w, qs, d, nb),
                _ => scalar_dot(ty, w, qs, d, s, nb),
            };
        }
    }
    scalar_dot(ty, w, qs, d, s, nb)
}

/// Dot products of four weight rows with activation row `t` (shares each activation load).
pub fn dot_rows4(ty: GgmlType, w: [&[u8]; 4], q: &QuantActs, t: usize) -> [f32; 4] {
    dot_rows4_in(flavour(), ty, w, q, t)
}

fn dot_rows4_in(fl: Flavour, ty: GgmlType, w: [&[u8]; 4], q: &QuantActs, t: usize) -> [f32; 4] {
    let nb = q.blocks;
    #[cfg(target_arch = "x86_64")]
    if fl.simd() {
        let qs = &q.qs[t * nb * 32..(t + 1) * nb * 32];
        let d = &q.d[t * nb..(t + 1) * nb];
        let s = &q.s[t * nb..(t + 1) * nb];
        // SAFETY: AVX2 and FMA were detected; the kernel asserts the slice lengths.
        unsafe {
            match ty {
                GgmlType::Q4_1 | GgmlType::Q4_0 => {
                    let min = ty == GgmlType::Q4_1;
                    return by_vnni!(fl, dot4_q4(w, qs, d, s, nb, min));
                }
                GgmlType::Q8_0 => {
                    return by_vnni!(fl, dot4_q8_0(w, qs, d, nb));
                }
                _ => {}
            }
        }
    }
    w.map(|row| dot_row_in(fl, ty, row, q, t))
}

/// Four Q4_0/Q4_1 weight rows against activation rows `t` and `t + 1` (prefill: each weight
/// block is unpacked once for two tokens). Returns `[token][row]`.
pub fn dot_rows4x2(ty: GgmlType, w: [&[u8]; 4], q: &QuantActs, t: usize) -> [[f32; 4]; 2] {
    dot_rows4x2_in(flavour(), ty, w, q, t)
}

fn dot_rows4x2_in(
    fl: Flavour,
    ty: GgmlType,
    w: [&[u8]; 4],
    q: &QuantActs,
    t: usize,
) -> [[f32; 4]; 2] {
    let nb = q.blocks;
    #[cfg(target_arch = "x86_64")]
    if fl.simd() && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
        let qs = &q.qs[t * nb * 32..(t + 2) * nb * 32];
        let d = &q.d[t * nb..(t + 2) * nb];
        let s = &q.s[t * nb..(t + 2) * nb];
        let min = ty == GgmlType::Q4_1;
        // SAFETY: AVX2 and FMA were detected; the kernel asserts the slice lengths.
        let (lo, hi) = unsafe {
            (
                by_vnni!(fl, dot_rx2_q4::<2>([w[0], w[1]], qs, d, s, nb, min)),
                by_vnni!(fl, dot_rx2_q4::<2>([w[2], w[3]], qs, d, s, nb, min)),
            )
        };
        return [
            [lo[0][0], lo[0][1], hi[0][0], hi[0][1]],
            [lo[1][0], lo[1][1], hi[1][0], hi[1][1]],
        ];
    }
    [
        dot_rows4_in(fl, ty, w, q, t),
        dot_rows4_in(fl, ty, w, q, t + 1),
    ]
}

/// Portable kernel; also the definition the SIMD kernels must match.
pub(crate) fn scalar_dot(
    ty: GgmlType,
    w: &[u8],
    qs: &[i8],
    d: &[f32],
    s: &[f32],
    nb: usize,
) -> f32 {
    let mut acc = 0f32;
    match ty {
        GgmlType::Q8_0 => {
            for b in 0..nb {
                let blk = &w[b * 34..(b + 1) * 34];
                let a = &qs[b * 32..(b + 1) * 32];
                let dot: i32 = (0..32)
                    .map(|j| i32::from(blk[2 + j] as i8) * i32::from(a[j]))
                    .sum();
                acc += f16_at(blk, 0) * d[b] * dot as f32;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let bb = ty.block_bytes() as usize;
            let q0 = bb - 16;
            for b in 0..nb {
                let blk = &w[b * bb..(b + 1) * bb];
                let a = &qs[b * 32..(b + 1) * 32];
                let mut dot = 0i32;
                for j in 0..16 {
                    dot += i32::from(blk[q0 + j] & 0x0F) * i32::from(a[j]);
                    dot += i32::from(blk[q0 + j] >> 4) * i32::from(a[j + 16]);
                }
                let dw = f16_at(blk, 0);
                acc += dw * d[b] * dot as f32;
                acc += if ty == GgmlType::Q4_1 {
                    f16_at(blk, 2) * s[b]
                } else {
                    -8.0 * dw * s[b]
                };
            }
        }
        _ => {}
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

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

    /// Sum of u4 weights (one 16-byte block, low nibbles first) times int8 activations, as f32x8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_dot(q: *const u8, a: *const i8) -> __m256 {
        // SAFETY: q points at 16 readable bytes and a at 32 (caller's contract).
        unsafe {
            let raw = _mm_loadu_si128(q as *const __m128i);
            let mask = _mm256_set1_epi8(0x0F);
            let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
            let av = _mm256_loadu_si256(a as *const __m256i);
            let p16 = _mm256_maddubs_epi16(w, av);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: &[u8], qs: &[i8], d: &[f32], s: &[f32], nb: usize) -> f32 {
        assert!(w.len() >= nb * 20 && qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
        let mut acc = _mm256_setzero_ps();
        let mut summ = 0f32;
        for b in 0..nb {
            // SAFETY: bounds asserted above.
            unsafe {
                let blk = w.as_ptr().add(b * 20);
                let p = nibble_dot(blk.add(4), qs.as_ptr().add(b * 32));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(h(blk, 0) * d[b]), p, acc);
                summ += h(blk, 2) * s[b];
            }
        }
        hsum(acc) + summ
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_0(w: &[u8], qs: &[i8], d: &[f32], s: &[f32], nb: usize) -> f32 {
        assert!(w.len() >= nb * 18 && qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
        let mut acc = _mm256_setzero_ps();
        let mut off = 0f32;
        for b in 0..nb {
            // SAFETY: bounds asserted above.
            unsafe {
                let blk = w.as_ptr().add(b * 18);
                let p = nibble_dot(blk.add(2), qs.as_ptr().add(b * 32));
                let dw = h(blk, 0);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[b]), p, acc);
                off += dw * s[b];
            }
        }
        hsum(acc) - 8.0 * off
    }

    /// u8×i8 pair sums to i32 lanes with AVX2 (maddubs + madd; no saturation for 4-bit weights).
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

    /// The Q4 kernels, instantiated once per instruction set.
    macro_rules! q4_kernels {
        ($feat:literal, $mul:path) => {
            /// Four Q4_1 (`min = true`) or Q4_0 rows against one activation row.
            #[target_feature(enable = $feat)]
            pub(in super::super) unsafe fn dot4_q4(
                w: [&[u8]; 4],
                qs: &[i8],
                d: &[f32],
                s: &[f32],
                nb: usize,
                min: bool,
            ) -> [f32; 4] {
                let bb = if min { 20 } else { 18 };
                let q0 = bb - 16;
                assert!(w.iter().all(|r| r.len() >= nb * bb));
                assert!(qs.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut off = [0f32; 4];
                let mask = _mm256_set1_epi8(0x0F);
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
                            let raw = _mm_loadu_si128(blk.add(q0) as *const __m128i);
                            let wv = _mm256_and_si256(
                                _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                mask,
                            );
                            let p = $mul(wv, av, ones);
                            let dw = h(blk, 0);
                            acc[r] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * da),
                                _mm256_cvtepi32_ps(p),
                                acc[r],
                            );
                            off[r] += if min { h(blk, 2) * sa } else { -8.0 * dw * sa };
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

            /// `R` Q4 rows against two activation rows (`qs`, `d`, `s` hold both rows).
            #[target_feature(enable = $feat)]
            pub(in super::super) unsafe fn dot_rx2_q4<const R: usize>(
                w: [&[u8]; R],
                qs: &[i8],
                d: &[f32],
                s: &[f32],
                nb: usize,
                min: bool,
            ) -> [[f32; R]; 2] {
                let bb = if min { 20 } else { 18 };
                let q0 = bb - 16;
                assert!(w.iter().all(|r| r.len() >= nb * bb));
                assert!(qs.len() >= 2 * nb * 32 && d.len() >= 2 * nb && s.len() >= 2 * nb);
                let mut acc0 = [_mm256_setzero_ps(); R];
                let mut acc1 = [_mm256_setzero_ps(); R];
                let mut off = [[0f32; R]; 2];
                let mask = _mm256_set1_epi8(0x0F);
                let ones = _mm256_set1_epi16(1);
                for b in 0..nb {
                    // SAFETY: bounds asserted above.
                    unsafe {
                        let a0 = _mm256_loadu_si256(qs.as_ptr().add(b * 32) as *const __m256i);
                        let a1 =
                            _mm256_loadu_si256(qs.as_ptr().add((nb + b) * 32) as *const __m256i);
                        let (d0, d1) = (*d.get_unchecked(b), *d.get_unchecked(nb + b));
                        let (s0, s1) = (*s.get_unchecked(b), *s.get_unchecked(nb + b));
                        for r in 0..R {
                            let blk = w[r].as_ptr().add(b * bb);
                            let raw = _mm_loadu_si128(blk.add(q0) as *const __m128i);
                            let wv = _mm256_and_si256(
                                _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                                mask,
                            );
                            let p0 = $mul(wv, a0, ones);
                            let p1 = $mul(wv, a1, ones);
                            let dw = h(blk, 0);
                            acc0[r] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * d0),
                                _mm256_cvtepi32_ps(p0),
                                acc0[r],
                            );
                            acc1[r] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dw * d1),
                                _mm256_cvtepi32_ps(p1),
                                acc1[r],
                            );
                            let m = if min { h(blk, 2) } else { -8.0 * dw };
                            off[0][r] += m * s0;
                            off[1][r] += m * s1;
                        }
                    }
                }
                let mut out = [[0f32; R]; 2];
                for r in 0..R {
                    out[0][r] = hsum(acc0[r]) + off[0][r];
                    out[1][r] = hsum(acc1[r]) + off[1][r];
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
        q4_kernels!("avx2,fma,f16c", mul_avx2);
    }

    /// AVX2 + FMA + AVX-VNNI.
    pub(super) mod vnni {
        use super::*;
        q4_kernels!("avx2,fma,f16c,avxvnni", mul_vnni);
    }

    /// AVX2 + FMA + AVX512-VNNI/VL (256-bit).
    pub(super) mod vnni512 {
        use super::*;
        q4_kernels!("avx2,fma,f16c,avx512vnni,avx512vl", mul_vnni512);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::quantize_row;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// Every kernel flavour this CPU supports, through the one-row, four-row and two-token
    /// paths with activations quantized by that flavour, against the f32 reference (dequantized
    /// weights times unquantized activations) and against the scalar definition. Prints which
    /// flavours ran; a supported flavour that did not run fails.
    #[test]
    fn every_supported_flavour_matches_the_f32_reference() {
        let cols = 320;
        let x = data(2 * cols, 1);
        let mut ran = Vec::new();
        for fl in Flavour::ALL.into_iter().filter(|f| f.supported()) {
            let q = quantize_acts_in(fl, &x, cols);
            let portable = quantize_acts_in(Flavour::Portable, &x, cols);
            assert_eq!(q.qs, portable.qs, "{}: quantized activations", fl.name());
            assert_eq!(q.d, portable.d, "{}: block scales", fl.name());
            for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|r| quantize_row(ty, &data(cols, 10 + r)))
                    .collect();
                let w = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                let nb = q.blocks;
                let scalar = |r: usize, t: usize| {
                    scalar_dot(
                        ty,
                        w[r],
                        &q.qs[t * nb * 32..(t + 1) * nb * 32],
                        &q.d[t * nb..(t + 1) * nb],
                        &q.s[t * nb..(t + 1) * nb],
                        nb,
                    )
                };
                // The f32 truth: dequantized weights, activations as they were.
                let reference = |r: usize, t: usize| {
                    let mut deq = vec![0f32; cols];
                    crate::backend::cpu::dequantize_row(ty, w[r], &mut deq);
                    deq.iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>() as f32
                };
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * (1.0 + b.abs());
                let near = |a: f32, b: f32| (a - b).abs() <= 0.02 * (1.0 + b.abs()) + 0.05;
                let one: Vec<f32> = (0..4).map(|r| dot_row_in(fl, ty, w[r], &q, 1)).collect();
                let four = dot_rows4_in(fl, ty, w, &q, 1);
                let pair = dot_rows4x2_in(fl, ty, w, &q, 0);
                let name = fl.name();
                for r in 0..4 {
                    for (what, got, t) in [
                        ("row", one[r], 1),
                        ("rows4", four[r], 1),
                        ("rows4x2[0]", pair[0][r], 0),
                        ("rows4x2[1]", pair[1][r], 1),
                    ] {
                        assert!(
                            close(got, scalar(r, t)),
                            "{name} {ty:?} {what} [{r}]: {got} vs scalar {}",
                            scalar(r, t)
                        );
                        assert!(
                            near(got, reference(r, t)),
                            "{name} {ty:?} {what} [{r}]: {got} vs f32 {}",
                            reference(r, t)
                        );
                    }
                }
            }
            ran.push(fl);
        }
        let supported: Vec<Flavour> = Flavour::ALL.into_iter().filter(|f| f.supported()).collect();
        eprintln!(
            "kernel flavours run: {}; not supported by this CPU: {}",
            ran.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
            Flavour::ALL
                .iter()
                .filter(|f| !f.supported())
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(ran, supported, "a flavour this CPU supports did not run");
        assert!(ran.contains(&flavour()), "the flavour in use ran");
    }
}
