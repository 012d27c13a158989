//! Token selection: greedy, temperature, top-k, top-p, repetition penalty, seeded randomness;
//! log-probabilities for the API; stop-string handling.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = disabled.
    pub top_k: usize,
    /// 1.0 = disabled.
    pub top_p: f32,
    /// 1.0 = disabled; >1 discourages tokens already seen.
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; random when absent.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// Per-sequence sampler state.
pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
}

/// Natural-log softmax of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = logits.iter().map(|&l| (l - mx).exp()).sum::<f32>().ln() + mx;
    logits.iter().map(|&l| l - lse).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &lp) in logprobs.iter().enumerate() {
        if best.len() < n || best.last().is_some_and(|b| lp > b.1) {
            let at = best.partition_point(|b| b.1 >= lp);
            best.insert(at, (i as u32, lp));
            best.truncate(n);
        }
    }
    best
}

impl Sampler {
    /// A sampler for one sequence.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        Self { params, rng }
    }

    /// Pick the next token from raw logits; `history` feeds the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let rp = self.params.repetition_penalty;
        if rp != 1.0 && rp > 0.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / rp } else { *v * rp };
                }
            }
        }
        if self.params.temperature <= 0.0 {
            return argmax(&l);
        }
        let mut cand: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v / self.params.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let mx = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - mx).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (c, p) in cand.iter().zip(&probs) {
            if r < *p {
                return c.0;
            }
            r -= p;
        }
        cand.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Where the earliest stop string starts in `text`, if any.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that could begin a stop string (held back while
/// streaming so a stop string split across tokens is never sent).
pub fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                best = best.max(i);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(), &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(), &[1]), 4);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits(), &[]), 1);
        }
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(9),
            ..Default::default()
        });
        for _ in 0..100 {
            let t = s.sample(&logits(), &[]);
            assert!(t == 1 || t == 4, "token {t} outside the nucleus");
        }
    }

    #[test]
    fn same_seed_same_tokens_and_temperature_spreads() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits(), &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..200).map(|_| s.sample(&logits(), &[])).collect()
        };
        assert_eq!(a, b);
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 4,
            "temperature 1 should visit most tokens: {distinct:?}"
        );
    }

    #[test]
    fn logprobs_normalize_and_rank() {
        let lp = log_softmax(&logits());
        let total: f32 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let top = top_logprobs(&lp, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 2]);
    }

    #[test]
    fn stop_strings() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x\n\n", &stops), Some(4));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(partial_stop_len("abc EN", &stops), 2);
        assert_eq!(partial_stop_len("abc\n", &stops), 1);
        assert_eq!(partial_stop_len("abc", &stops), 0);
    }
}
