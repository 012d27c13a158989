//! The dot-product kernels of the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): weight row
//! (ggml blocks) × activations quantized to 8-bit blocks of 32. AVX2+FMA versions ([`avx2`]) are
//! picked at run time; the scalar versions are the portable fallback and the definition of the
//! arithmetic. The K-quants have their own module ([`super::kquants`]).

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
    /// Per-block `d * sum(q)` rounded to f16 as ggml's `block_q8_1` stores it: formats with a
    /// min (Q4_1, Q5_1) add `min * s`.
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
    ($fl:expr, $kernel:ident $(::<$($g:tt),+>)? ($($arg:expr),* $(,)?)) => {
        match $fl {
            Flavour::AvxVnni => avx2::vnni::$kernel$(::<$($g),+>)?($($arg),*),
            Flavour::Avx512Vnni => avx2::vnni512::$kernel$(::<$($g),+>)?($($arg),*),
            Flavour::Avx2 | Flavour::Portable => avx2::plain::$kernel$(::<$($g),+>)?($($arg),*),
        }
    };
}

/// Quantize `x` (rows of `cols`, a multiple of 32) to 8-bit blocks.
pub fn quantize_acts(x: &[f32], cols: usize) -> QuantActs {
    quantize_acts_in(flavour(), x, cols)
}

/// [`quantize_acts`] with the kernels of `fl` (a flavour this CPU supports).
fn quantize_acts_in(fl: Flavour, x: &[f32], cols: usize) -> QuantActs {
    let blocks = x.len() / 32;
    let mut q = QuantActs {
        qs: vec![0i8; x.len()],
        d: vec![0f32; blocks],
        s: vec![0f32; blocks],
        blocks: cols / 32,
    };
    #[cfg(target_arch = "x86_64")]
    if fl.simd() {
        // SAFETY: AVX2 was detected at run time (the same code, with SIMD rounding).
        unsafe { quantize_blocks_avx2(x, &mut q) };
        return q;
    }
    quantize_blocks(x, &mut q);
    q
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut QuantActs) {
    quantize_blocks(x, q);
}

#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut QuantActs) {
    for (b, (xb, qb)) in x
        .chunks_exact(32)
        .zip(q.qs.chunks_exact_mut(32))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Exactly ggml's x86 quantize_row_q8_0/q8_1: `127 / amax` as the inverse scale and
        // round-half-to-even (`_mm256_round_ps`). Attention outputs are f16 values, so exact
        // ties are common, and a flipped tie is amplified through SmolLM2's outlier channels.
        let db = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (v, x) in qb.iter_mut().zip(xb) {
            let r = (x * id).round_ties_even() as i8;
            *v = r;
            sum += i32::from(r);
        }
        // Scales are stored as f16 like ggml's block_q8_1, so results match llama.cpp closely.
        q.d[b] = half::f16::from_f32(db).to_f32();
        q.s[b] = half::f16::from_f32(db * sum as f32).to_f32();
    }
}

/// The 32-value formats with 4-bit values (and a fifth bit for Q5): each kernel is generic over
/// one of these, so the layout facts live here once.
pub(crate) mod q32 {
    use crate::model::gguf::GgmlType;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q5_0: u8 = 2;
    pub const Q5_1: u8 = 3;

    /// The format of `ty`, if it is one of these.
    pub fn of(ty: GgmlType) -> Option<u8> {
        match ty {
            GgmlType::Q4_0 => Some(Q4_0),
            GgmlType::Q4_1 => Some(Q4_1),
            GgmlType::Q5_0 => Some(Q5_0),
            GgmlType::Q5_1 => Some(Q5_1),
            _ => None,
        }
    }

    /// Block bytes: `d` (f16), the min (f16) if any, the Q5 bit mask (4 bytes), 16 nibble bytes.
    pub const fn block_bytes(f: u8) -> usize {
        [18, 20, 22, 24][f as usize]
    }

    /// Whether the block stores a min (`d * q + m`) rather than an offset (`d * (q - offset)`).
    pub const fn has_min(f: u8) -> bool {
        f & 1 == 1
    }

    /// Whether values have a fifth bit.
    pub const fn five(f: u8) -> bool {
        f >= 2
    }

    /// The offset subtracted from the unsigned values (0 where a min is stored).
    pub const fn offset(f: u8) -> i32 {
        [8, 0, 16, 0][f as usize]
    }

    /// Value `j` (0..32) of one block, unsigned (before the offset or min).
    pub fn value(f: u8, blk: &[u8], j: usize) -> u8 {
        let q0 = block_bytes(f) - 16;
        let nib = if j < 16 {
            blk[q0 + j] & 0x0F
        } else {
            blk[q0 + j - 16] >> 4
        };
        if !five(f) {
            return nib;
        }
        let qh = u32::from_le_bytes([blk[q0 - 4], blk[q0 - 3], blk[q0 - 2], blk[q0 - 1]]);
        nib | ((((qh >> j) & 1) as u8) << 4)
    }
}

/// Calls `avx2::<flavour>::$kernel::<F>(args)` for the 32-value format `f` (see [`q32`]).
#[cfg(target_arch = "x86_64")]
macro_rules! by_format {
    ($fl:expr, $f:expr, $kernel:ident $(::<$($g:tt),+>)? ($($arg:expr),* $(,)?)) => {
        match $f {
            q32::Q4_0 => by_vnni!($fl, $kernel::<{ q32::Q4_0 } $($(, $g)+)?>($($arg),*)),
            q32::Q4_1 => by_vnni!($fl, $kernel::<{ q32::Q4_1 } $($(, $g)+)?>($($arg),*)),
            q32::Q5_0 => by_vnni!($fl, $kernel::<{ q32::Q5_0 } $($(, $g)+)?>($($arg),*)),
            _ => by_vnni!($fl, $kernel::<{ q32::Q5_1 } $($(, $g)+)?>($($arg),*)),
        }
    };
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
        // SAFETY: AVX2 and FMA were detected; the kernels assert the slice lengths.
        unsafe {
            if let Some(f) = q32::of(ty) {
                return match f {
                    q32::Q4_0 => avx2::dot_q32::<{ q32::Q4_0 }>(w, qs, d, s, nb),
                    q32::Q4_1 => avx2::dot_q32::<{ q32::Q4_1 }>(w, qs, d, s, nb),
                    q32::Q5_0 => avx2::dot_q32::<{ q32::Q5_0 }>(w, qs, d, s, nb),
                    _ => avx2::dot_q32::<{ q32::Q5_1 }>(w, qs, d, s, nb),
                };
            }
            if ty == GgmlType::Q8_0 {
                return avx2::dot_q8_0(w, qs, d, nb);
            }
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
        // SAFETY: AVX2 and FMA were detected; the kernels assert the slice lengths.
        unsafe {
            if let Some(f) = q32::of(ty) {
                return by_format!(fl, f, dot4_q32(w, qs, d, s, nb));
            }
            if ty == GgmlType::Q8_0 {
                return by_vnni!(fl, dot4_q8_0(w, qs, d, nb));
            }
        }
    }
    w.map(|row| dot_row_in(fl, ty, row, q, t))
}

/// Four weight rows of a 32-value format with a nibble layout (Q4_0, Q4_1, Q5_0, Q5_1) against
/// activation rows `t..t + T` (prefill: each weight block is unpacked once for `T` tokens).
/// Returns `[token][row]`.
pub fn dot_rows4xt<const T: usize>(
    ty: GgmlType,
    w: [&[u8]; 4],
    q: &QuantActs,
    t: usize,
) -> [[f32; 4]; T] {
    dot_rows4xt_in::<T>(flavour(), ty, w, q, t)
}

fn dot_rows4xt_in<const T: usize>(
    fl: Flavour,
    ty: GgmlType,
    w: [&[u8]; 4],
    q: &QuantActs,
    t: usize,
) -> [[f32; 4]; T] {
    let nb = q.blocks;
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(f)) = (fl.simd(), q32::of(ty)) {
        let qs = &q.qs[t * nb * 32..(t + T) * nb * 32];
        let d = &q.d[t * nb..(t + T) * nb];
        let s = &q.s[t * nb..(t + T) * nb];
        // SAFETY: AVX2 and FMA were detected; the kernel asserts the slice lengths.
        let (lo, hi) = unsafe {
            (
                by_format!(fl, f, dot_rxt_q32::<2, T>([w[0], w[1]], qs, d, s, nb)),
                by_format!(fl, f, dot_rxt_q32::<2, T>([w[2], w[3]], qs, d, s, nb)),
            )
        };
        return std::array::from_fn(|j| [lo[j][0], lo[j][1], hi[j][0], hi[j][1]]);
    }
    std::array::from_fn(|j| dot_rows4_in(fl, ty, w, q, t + j))
}

/// Four weight rows of a 32-value format unpacked once for all of a prompt's token tiles
/// ([`dot_rows4xt`] unpacks each block again for every tile). SIMD flavours only; the results
/// are [`dot_rows4xt`]'s, bit for bit.
#[derive(Debug, Default)]
pub struct Unpacked4 {
    format: u8,
    nb: usize,
    vals: Vec<u8>,
    dw: Vec<f32>,
    mw: Vec<f32>,
}

impl Unpacked4 {
    /// Unpacks `w` (rows of `nb` blocks of `ty`); false, with nothing done, where `ty` or this
    /// CPU has no unpacked kernel.
    pub fn fill(&mut self, ty: GgmlType, w: [&[u8]; 4], nb: usize) -> bool {
        self.fill_in(flavour(), ty, w, nb)
    }

    fn fill_in(&mut self, fl: Flavour, ty: GgmlType, w: [&[u8]; 4], nb: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(f)) = (fl.simd(), q32::of(ty)) {
            self.format = f;
            self.nb = nb;
            self.vals.resize(4 * nb * 64, 0);
            self.dw.resize(4 * nb, 0.0);
            self.mw.resize(4 * nb, 0.0);
            let rows = self
                .vals
                .chunks_exact_mut(nb * 64)
                .zip(self.dw.chunks_exact_mut(nb))
                .zip(self.mw.chunks_exact_mut(nb));
            for (row, ((vals, dw), mw)) in w.into_iter().zip(rows) {
                // SAFETY: AVX2, FMA and F16C were detected; the unpacker asserts the lengths.
                unsafe {
                    match f {
                        q32::Q4_0 => avx2::unpack_rows::<{ q32::Q4_0 }>(row, nb, vals, dw, mw),
                        q32::Q4_1 => avx2::unpack_rows::<{ q32::Q4_1 }>(row, nb, vals, dw, mw),
                        q32::Q5_0 => avx2::unpack_rows::<{ q32::Q5_0 }>(row, nb, vals, dw, mw),
                        _ => avx2::unpack_rows::<{ q32::Q5_1 }>(row, nb, vals, dw, mw),
                    }
                }
            }
            return true;
        }
        let _ = (fl, ty, w, nb);
        false
    }
}

/// [`dot_rows4xt`] on rows [`Unpacked4::fill`] unpacked. Returns `[token][row]`.
pub fn dot_rows4xt_unpacked<const T: usize>(
    up: &Unpacked4,
    q: &QuantActs,
    t: usize,
) -> [[f32; 4]; T] {
    dot_rows4xt_unpacked_in::<T>(flavour(), up, q, t)
}

fn dot_rows4xt_unpacked_in<const T: usize>(
    fl: Flavour,
    up: &Unpacked4,
    q: &QuantActs,
    t: usize,
) -> [[f32; 4]; T] {
    let nb = up.nb;
    assert!(
        fl.simd() && nb == q.blocks,
        "an unpacked row set is filled for these activations"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let qs = &q.qs[t * nb * 32..(t + T) * nb * 32];
        let d = &q.d[t * nb..(t + T) * nb];
        let s = &q.s[t * nb..(t + T) * nb];
        let vals = |r: usize| &up.vals[r * nb * 64..(r + 1) * nb * 64];
        let dw = |r: usize| &up.dw[r * nb..(r + 1) * nb];
        let mw = |r: usize| &up.mw[r * nb..(r + 1) * nb];
        // SAFETY: AVX2 and FMA were detected (a SIMD flavour filled it); the kernel asserts the
        // slice lengths.
        let (lo, hi) = unsafe {
            (
                by_format!(
                    fl,
                    up.format,
                    dot_rxt_pre::<2, T>(
                        [vals(0), vals(1)],
                        [dw(0), dw(1)],
                        [mw(0), mw(1)],
                        qs,
                        d,
                        s,
                        nb
                    )
                ),
                by_format!(
                    fl,
                    up.format,
                    dot_rxt_pre::<2, T>(
                        [vals(2), vals(3)],
                        [dw(2), dw(3)],
                        [mw(2), mw(3)],
                        qs,
                        d,
                        s,
                        nb
                    )
                ),
            )
        };
        std::array::from_fn(|j| [lo[j][0], lo[j][1], hi[j][0], hi[j][1]])
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no SIMD flavour on this architecture")
}

/// Portable kernel; also the definition the SIMD kernels must match: integer dot products of
/// the signed values per block (llama.cpp's arithmetic), scaled by both blocks' `d`, plus
/// `min * s` for formats with a min.
pub(crate) fn scalar_dot(
    ty: GgmlType,
    w: &[u8],
    qs: &[i8],
    d: &[f32],
    s: &[f32],
    nb: usize,
) -> f32 {
    let mut acc = 0f32;
    if ty == GgmlType::Q8_0 {
        for b in 0..nb {
            let blk = &w[b * 34..(b + 1) * 34];
            let a = &qs[b * 32..(b + 1) * 32];
            let dot: i32 = (0..32)
                .map(|j| i32::from(blk[2 + j] as i8) * i32::from(a[j]))
                .sum();
            acc += f16_at(blk, 0) * d[b] * dot as f32;
        }
    } else if let Some(f) = q32::of(ty) {
        let bb = q32::block_bytes(f);
        for b in 0..nb {
            let blk = &w[b * bb..(b + 1) * bb];
            let a = &qs[b * 32..(b + 1) * 32];
            let dot: i32 = (0..32)
                .map(|j| (i32::from(q32::value(f, blk, j)) - q32::offset(f)) * i32::from(a[j]))
                .sum();
            acc += f16_at(blk, 0) * d[b] * dot as f32;
            if q32::has_min(f) {
                acc += f16_at(blk, 2) * s[b];
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::quantize_row;

    /// Values in [-1, 1) from a seeded xorshift (the kernels' tests share it).
    pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
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

    /// [`data`] times `amp` (activations and angles of a chosen range).
    pub(crate) fn scaled_data(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        data(n, seed).into_iter().map(|v| v * amp).collect()
    }

    /// Every kernel flavour this CPU supports, through the one-row, four-row and two-token
    /// paths with activations quantized by that flavour, against the f32 reference (dequantized
    /// weights times unquantized activations) and against the scalar definition. Prints which
    /// flavours ran; a supported flavour that did not run fails.
    #[test]
    fn every_supported_flavour_matches_the_f32_reference() {
        let cols = 320;
        let x = data(4 * cols, 1);
        let mut ran = Vec::new();
        for fl in Flavour::ALL.into_iter().filter(|f| f.supported()) {
            let q = quantize_acts_in(fl, &x, cols);
            let portable = quantize_acts_in(Flavour::Portable, &x, cols);
            assert_eq!(q.qs, portable.qs, "{}: quantized activations", fl.name());
            assert_eq!(q.d, portable.d, "{}: block scales", fl.name());
            for ty in [
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q5_0,
                GgmlType::Q5_1,
                GgmlType::Q8_0,
            ] {
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
                let pair = dot_rows4xt_in::<2>(fl, ty, w, &q, 0);
                let quad = dot_rows4xt_in::<4>(fl, ty, w, &q, 0);
                let mut up = Unpacked4::default();
                if up.fill_in(fl, ty, w, q.blocks) {
                    // The unpacked tiles are the same arithmetic, bit for bit.
                    assert_eq!(dot_rows4xt_unpacked_in::<4>(fl, &up, &q, 0), quad, "{ty:?}");
                    assert_eq!(dot_rows4xt_unpacked_in::<2>(fl, &up, &q, 0), pair, "{ty:?}");
                } else {
                    assert!(!fl.simd() || q32::of(ty).is_none(), "{ty:?}");
                }
                let name = fl.name();
                for r in 0..4 {
                    for (what, got, t) in [
                        ("row", one[r], 1),
                        ("rows4", four[r], 1),
                        ("rows4x2[0]", pair[0][r], 0),
                        ("rows4x2[1]", pair[1][r], 1),
                        ("rows4x4[0]", quad[0][r], 0),
                        ("rows4x4[1]", quad[1][r], 1),
                        ("rows4x4[2]", quad[2][r], 2),
                        ("rows4x4[3]", quad[3][r], 3),
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
