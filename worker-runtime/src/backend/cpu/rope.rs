//! Rotary position embedding with ggml's angle cache: the angles, Llama 3.1's frequency factors
//! and linear scaling, adjacent-pair (Llama) or half-split (GPT-NeoX, Qwen2) rotation.

/// How positions turn into rotary angles: the frequency base, a linear position scale
/// (`rope.scaling.type = linear`) and per-frequency divisors (the `rope_freqs` tensor that
/// Llama 3.1's converter writes from its llama3 scaling parameters; empty for none).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    base: f32,
    scale: f32,
    factors: Vec<f32>,
    /// Rotate element `i` with `i + hd / 2` (GPT-NeoX style) rather than `2i` with `2i + 1`.
    neox: bool,
    /// A hash of the three above: the thread-local angle tables are keyed by it.
    id: u64,
}

impl RopeFreqs {
    /// Frequency base `base`, every angle multiplied by `scale` (1 / the linear scaling
    /// factor) and the angle of pair `i` divided by `factors[i]` (empty: none).
    pub fn new(base: f32, scale: f32, factors: Vec<f32>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (base.to_bits(), scale.to_bits()).hash(&mut h);
        factors.iter().for_each(|f| f.to_bits().hash(&mut h));
        Self {
            base,
            scale,
            factors,
            neox: false,
            id: h.finish(),
        }
    }

    /// The same angles, applied to the two halves of each head (GPT-NeoX style: Qwen2).
    pub fn neox(self, neox: bool) -> Self {
        Self { neox, ..self }
    }

    /// Plain RoPE with frequency base `base`.
    pub fn plain(base: f32) -> Self {
        Self::new(base, 1.0, Vec::new())
    }
}

/// Rotary embedding in GGUF's interleaved-pair ("normal") form, for every `hd`-wide head in
/// `x`, at position `pos`. Angles follow ggml's cache: `theta_0 = pos`, `theta_{i+1} = theta_i *
/// base^(-2/hd)` in f32, each divided by its frequency factor and multiplied by the linear
/// scale as `rope_yarn` does without extrapolation, then libm `cosf`/`sinf`; each rotated value
/// is one fused multiply-add (how GCC contracts ggml's `x0*cos - x1*sin`).
pub fn rope(x: &mut [f32], hd: usize, pos: usize, freqs: &RopeFreqs) {
    /// Table key -> cos/sin pairs per position, extended on demand.
    type Tables = Vec<((u64, usize), Vec<f32>)>;
    thread_local! {
        static TABLES: std::cell::RefCell<Tables> = Default::default();
    }
    TABLES.with_borrow_mut(|tables| {
        let key = (freqs.id, hd);
        let at = match tables.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                tables.push((key, Vec::new()));
                tables.len() - 1
            }
        };
        let table = &mut tables[at].1;
        let theta_scale = freqs.base.powf(-2.0 / hd as f32);
        while table.len() < (pos + 1) * hd {
            let mut theta = (table.len() / hd) as f32;
            for i in 0..hd / 2 {
                let ff = freqs.factors.get(i).copied().unwrap_or(1.0);
                let angle = freqs.scale * (theta / ff);
                table.push(angle.cos());
                table.push(angle.sin());
                theta *= theta_scale;
            }
        }
        let cs = &table[pos * hd..(pos + 1) * hd];
        #[cfg(target_arch = "x86_64")]
        if super::kernels::has_avx2() {
            // SAFETY: FMA was detected at run time.
            unsafe { rope_fma(x, hd, cs, freqs.neox) };
            return;
        }
        rotate(x, hd, cs, freqs.neox);
    });
}

#[inline(always)]
fn rotate(x: &mut [f32], hd: usize, cs: &[f32], neox: bool) {
    let turn =
        |x0: f32, x1: f32, c: &[f32]| (x0.mul_add(c[0], -(x1 * c[1])), x0.mul_add(c[1], x1 * c[0]));
    for head in x.chunks_exact_mut(hd) {
        if neox {
            let (lo, hi) = head.split_at_mut(hd / 2);
            for ((a, b), c) in lo.iter_mut().zip(hi).zip(cs.chunks_exact(2)) {
                (*a, *b) = turn(*a, *b, c);
            }
        } else {
            for (pair, c) in head.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                (pair[0], pair[1]) = turn(pair[0], pair[1], c);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rope_fma(x: &mut [f32], hd: usize, cs: &[f32], neox: bool) {
    rotate(x, hd, cs, neox);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cpu::kernels::tests::scaled_data as data;

    /// Frequency factors divide each pair's angle and the linear scale multiplies it, as
    /// ggml's `rope_yarn` does without extrapolation; ones and a scale of 1 change nothing.
    #[test]
    fn rope_frequency_factors_and_linear_scale_change_the_angles() {
        let hd = 8;
        let x0 = data(hd, 3, 1.0);
        let factors = vec![1.0, 2.0, 4.0, 8.0];
        let pos = 37;
        let mut x = x0.clone();
        rope(
            &mut x,
            hd,
            pos,
            &RopeFreqs::new(10_000.0, 0.5, factors.clone()),
        );
        for i in 0..hd / 2 {
            let th = 0.5 * pos as f64 * 10_000f64.powf(-2.0 * i as f64 / hd as f64)
                / f64::from(factors[i]);
            let (a, b) = (f64::from(x0[2 * i]), f64::from(x0[2 * i + 1]));
            let want = (a * th.cos() - b * th.sin(), a * th.sin() + b * th.cos());
            assert!((f64::from(x[2 * i]) - want.0).abs() < 1e-4, "pair {i}");
            assert!((f64::from(x[2 * i + 1]) - want.1).abs() < 1e-4, "pair {i}");
        }
        // NeoX style: element i turns with element i + hd / 2, by pair i's angle.
        let mut nx = x0.clone();
        let plain_freqs = RopeFreqs::plain(10_000.0);
        rope(&mut nx, hd, pos, &plain_freqs.clone().neox(true));
        for i in 0..hd / 2 {
            let th = pos as f64 * 10_000f64.powf(-2.0 * i as f64 / hd as f64);
            let (a, b) = (f64::from(x0[i]), f64::from(x0[i + hd / 2]));
            assert!((f64::from(nx[i]) - (a * th.cos() - b * th.sin())).abs() < 1e-4);
            assert!((f64::from(nx[i + hd / 2]) - (a * th.sin() + b * th.cos())).abs() < 1e-4);
        }
        let (mut plain, mut ones) = (x0.clone(), x0.clone());
        rope(&mut plain, hd, pos, &RopeFreqs::plain(10_000.0));
        rope(
            &mut ones,
            hd,
            pos,
            &RopeFreqs::new(10_000.0, 1.0, vec![1.0; 4]),
        );
        assert_eq!(plain, ones);
        assert_ne!(plain, x);
    }

    #[test]
    fn rope_rotates_pairs_like_the_f64_formula() {
        let hd = 64;
        let x0 = data(3 * hd, 9, 2.0);
        for pos in [0usize, 1, 17, 500] {
            let mut x = x0.clone();
            rope(&mut x, hd, pos, &RopeFreqs::plain(100_000.0));
            for (h, head) in x.chunks_exact(hd).enumerate() {
                for i in 0..hd / 2 {
                    let th = pos as f64 * 100_000f64.powf(-2.0 * i as f64 / hd as f64);
                    let (a, b) = (
                        f64::from(x0[h * hd + 2 * i]),
                        f64::from(x0[h * hd + 2 * i + 1]),
                    );
                    let want = (a * th.cos() - b * th.sin(), a * th.sin() + b * th.cos());
                    // f32 angle accumulation: error grows with the position.
                    let tol = 1e-5 * (1.0 + pos as f64);
                    assert!(
                        (f64::from(head[2 * i]) - want.0).abs() <= tol,
                        "pos {pos} i {i}"
                    );
                    assert!(
                        (f64::from(head[2 * i + 1]) - want.1).abs() <= tol,
                        "pos {pos} i {i}"
                    );
                }
            }
        }
    }
}
