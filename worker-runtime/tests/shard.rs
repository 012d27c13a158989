//! Sharded inference in one process: TP ranks as threads, pipeline stages as threads linked by
//! channels. Every split of the real SmolLM2 model must give the single rank's logits and
//! greedy text: on the f32 reference path ([`LoadOptions::f32`]) and on the quantized serving
//! path, each with the tolerance its arithmetic allows (measured numbers below).

mod common;

use std::sync::Arc;
use std::time::Duration;

use whaleflux_worker::backend::Backend;
use whaleflux_worker::backend::cpu::CpuBackend;
use whaleflux_worker::comm::local::ThreadGroup;
use whaleflux_worker::engine::group::{load_rank, local_group_with};
use whaleflux_worker::engine::kv_cache::KvType;
use whaleflux_worker::engine::sampling::argmax;
use whaleflux_worker::engine::{
    Event, Executor, GenRequest, KvCache, Leader, LlamaModel, SamplingParams, SchedulerConfig,
    StageSeq,
};
use whaleflux_worker::metrics::Metrics;
use whaleflux_worker::model::gguf::Gguf;
use whaleflux_worker::model::tokenizer::ModelTokenizer;
use whaleflux_worker::shard::{LoadOptions, ShardSpec, WeightFormat, fixed_plan};

/// Logits of a run: two prompts prefilled in separate steps (both in flight at once), then
/// greedy decode steps of both sequences together.
fn run_logits(exec: &mut dyn Executor, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        exec.launch(&[(i as u64, p)], &[]).expect("launch prefill");
    }
    let mut last: Vec<u32> = Vec::new();
    for _ in prompts {
        let lg = exec.finish().expect("prefill logits");
        last.push(argmax(&lg[0]));
        out.extend(lg);
    }
    for _ in 0..steps {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let inputs: Vec<(u64, &[u32])> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64, t.as_slice()))
            .collect();
        exec.launch(&inputs, &[]).expect("launch decode");
        let lg = exec.finish().expect("decode logits");
        last = lg.iter().map(|l| argmax(l)).collect();
        out.extend(lg);
    }
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    exec.launch(&[], &ids).expect("free");
    exec.finish().expect("free step");
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Greedy completions of `prompts`, submitted concurrently through the scheduler, and the
/// smallest gap between the top two log-probabilities (the top two logits) over every token
/// each generated: a run whose logits stay within `tol` of these can only pick another token
/// where that gap is below `2 * tol`.
fn greedy_texts(
    exec: Box<dyn Executor>,
    tk: Arc<ModelTokenizer>,
    prompts: &[&str],
    max_tokens: usize,
) -> (Vec<String>, Vec<f32>) {
    let engine = whaleflux_worker::engine::scheduler::spawn(
        exec,
        tk.clone(),
        SchedulerConfig {
            max_batch: 4,
            max_queue: 16,
            context: 512,
            prefill_chunk: 512,
        },
        Arc::new(Metrics::new()),
        None,
    )
    .expect("engine");
    let mut rxs = Vec::new();
    for p in prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(GenRequest {
                prompt: tk.encode(p).expect("encode"),
                params: SamplingParams {
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                max_tokens,
                stop: Vec::new(),
                logprobs: Some(2),
                events: tx,
            })
            .expect("submit");
        rxs.push(rx);
    }
    rxs.into_iter()
        .map(|mut rx| {
            let (mut text, mut gap) = (String::new(), f32::INFINITY);
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Token { text: t, top, .. } => {
                        text.push_str(&t);
                        assert_eq!(top.len(), 2, "two top log-probabilities");
                        gap = gap.min(top[0].logprob - top[1].logprob);
                    }
                    Event::Done { .. } => break,
                }
            }
            (text, gap)
        })
        .unzip()
}

/// Every split (TP=3, PP=2, PP=3, TP=3 x PP=2, threads of this process) against one rank, all
/// with weights as `opts` loads them: logits of two prompts and 6 decode steps within `tol`
/// (pipeline stages bit-identical), the same argmax everywhere, and then, on the same group,
/// the same greedy text of `texts` (`max_tokens` each, decoded together by the scheduler).
/// The texts must have no near-tie on one rank's greedy path (every top-2 gap above
/// `near_tie`), or they could flip legitimately; the test checks that too. The single rank is
/// loaded once and each split once, so the time goes into the comparisons.
fn every_split_matches_the_single_rank(
    opts: LoadOptions,
    tol: f32,
    near_tie: f32,
    texts: &[&str],
    max_tokens: usize,
) {
    splits_match_the_single_rank(
        &common::model_path(),
        opts,
        tol,
        near_tie,
        texts,
        max_tokens,
    );
}

fn splits_match_the_single_rank(
    path: &std::path::Path,
    opts: LoadOptions,
    tol: f32,
    near_tie: f32,
    texts: &[&str],
    max_tokens: usize,
) {
    let g = Gguf::open(path).expect("open");
    let tk = Arc::new(ModelTokenizer::from_gguf(&g).expect("tokenizer"));
    let cfg = whaleflux_worker::model::config::LlamaConfig::from_gguf(&g).expect("cfg");
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "def fibonacci(n):"]
        .iter()
        .map(|p| tk.encode(p).expect("encode"))
        .collect();
    let whole =
        Arc::new(LlamaModel::load_with(&g, ShardSpec::whole(cfg.n_layers), opts).expect("load"));
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(2).expect("cpu"));
    let mut single = Leader::single(whole, be);
    let want = run_logits(&mut single, &prompts, 6);
    assert_eq!(single.cached_sequences(), 0, "every sequence was freed");
    let (want_text, gaps) = greedy_texts(Box::new(single), tk.clone(), texts, max_tokens);
    println!("{:?} one rank: {want_text:?}", opts.weights);
    for (t, gap) in texts.iter().zip(gaps) {
        println!("{:?} {t:?}: smallest top-2 gap {gap}", opts.weights);
        assert!(
            gap > near_tie,
            "{t:?} has a near-tie ({gap} <= {near_tie}) on one rank's greedy path; pick another prompt"
        );
    }
    for (tp, pp) in [(3, 1), (1, 2), (1, 3), (3, 2)] {
        let plan = fixed_plan("smollm2", cfg.n_layers, tp, pp);
        let (mut leader, followers) = local_group_with(&g, &plan, 1, None, opts).expect("group");
        let got = run_logits(&mut leader, &prompts, 6);
        let d = max_diff(&want, &got);
        println!(
            "{:?} TP={tp} PP={pp}: max |logit diff| = {d:e}",
            opts.weights
        );
        if tp == 1 {
            // Pipeline stages compute exactly what one rank computes.
            assert_eq!(d, 0.0, "pipeline stages must be bit-identical");
        } else {
            assert!(d <= tol, "TP={tp} PP={pp}: logits differ by {d} > {tol}");
        }
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!(argmax(a), argmax(b), "TP={tp} PP={pp}: argmax of row {i}");
        }
        assert_eq!(leader.cached_sequences(), 0, "every sequence was freed");
        // The scheduler shuts the group down when it stops.
        let (text, _) = greedy_texts(Box::new(leader), tk.clone(), texts, max_tokens);
        assert_eq!(text, want_text, "TP={tp} PP={pp} greedy text");
        for f in followers {
            f.join().expect("follower thread").expect("clean shutdown");
        }
    }
}

/// Logits tolerance of the f32 reference path. Everything there is f32: weights, matmul
/// activations, attention and its KV cache (no f16 rounding of Q, K/V or the softmax weights),
/// so TP differs from one rank only by the summation order of the all-reduced partial sums.
/// Measured: TP=3 and TP=3 x PP=2 vs one rank 2.9e-5 (2 prompts + 6 decode steps); PP=2 and
/// PP=3 are bit-identical. (With the serving path's f16 attention it was 1.2e-2: the f16
/// roundings turn f32 summation-order noise into f16 ulps.)
const F32_TOL: f32 = 1e-3;

/// Logits tolerance of the quantized serving path. Activations are rounded to 8 bits per
/// 32-wide block before every matmul, so a value the TP summation order moves across a
/// rounding boundary changes by a whole step, and SmolLM2's outlier channel (|x| ~ 2.2e4 from
/// layer 11 on) carries it. Measured: TP=3 vs one rank 1.06 on this test's inputs and up to
/// 1.51 over 20 prompts x 12-24 decode steps; a 1-ulp change of the embeddings on one rank
/// alone moves them by up to 0.94. Each TP layer on its own matches the single rank's to f32
/// rounding (see the per-layer test), so this is accumulated rounding, not a sharding error.
const QUANTIZED_TOL: f32 = 2.0;

#[test]
fn on_the_f32_path_every_split_matches_the_single_rank() {
    every_split_matches_the_single_rank(
        LoadOptions::f32(),
        F32_TOL,
        // A logit moves by at most F32_TOL, so a top-2 gap moves by at most twice that.
        2.0 * F32_TOL,
        &[
            "The capital of France is",
            "Once upon a time",
            "def fibonacci(n):",
        ],
        24,
    );
}

/// Qwen2's Q/K/V biases follow their weights' rows onto each tensor-parallel rank: the
/// `qwen2` file derived from SmolLM2 (random biases, written with gguf-py) computes on every
/// split what one rank computes.
#[test]
fn a_qwen2_file_splits_like_one_rank() {
    let path = common::derived("qwen2", |src, part| {
        common::derive_gguf(&["qwen2", src, part])
    });
    splits_match_the_single_rank(&path, LoadOptions::f32(), F32_TOL, 0.0, &[], 0);
}

#[test]
fn on_the_quantized_path_every_split_matches_the_single_rank() {
    every_split_matches_the_single_rank(
        LoadOptions::default(),
        QUANTIZED_TOL,
        // The TP change of the top-2 gap itself (not of any logit) measured at most 0.61 over
        // 20 prompts x 24 steps. Most natural prompts have a gap below that within 12 tokens
        // (e.g. "Once upon a time": 0.014), so they may flip legitimately; these do not.
        1.0,
        &["1, 2, 3,", "10, 20, 30,"],
        12,
    );
}

/// Each TP=3 layer, fed the single rank's input to that layer, gives the single rank's output
/// up to f32 rounding: for a prompt (prefill) and then one decode row against the cache. A
/// sharding bug (wrong KV head for a query head, RoPE position, a norm or residual applied on
/// every rank) shows up as an O(1) relative error at the first layer it touches. Measured:
/// at most 1.1e-6 of max |x| (f32 weights) and 3.2e-7 (quantized).
#[test]
fn every_tp_layer_computes_the_single_ranks_layer_to_f32_rounding() {
    let g = Gguf::open(&common::model_path()).expect("open");
    let tk = ModelTokenizer::from_gguf(&g).expect("tokenizer");
    let cfg = whaleflux_worker::model::config::LlamaConfig::from_gguf(&g).expect("cfg");
    let toks = tk.encode("The capital of France is").expect("encode");
    let (n, h, tp) = (toks.len(), cfg.hidden, 3);
    let spec = |l: usize, r: usize, size: usize| ShardSpec {
        layers: l..l + 1,
        tp_rank: r,
        tp_size: size,
        embedding: r == 0,
        head: false,
    };
    for weights in [WeightFormat::F32, WeightFormat::AsStored] {
        let opts = LoadOptions { weights };
        let be = CpuBackend::new(1).expect("cpu");
        let bes: Vec<CpuBackend> = (0..tp).map(|_| CpuBackend::new(1).expect("cpu")).collect();
        let embed = LlamaModel::load_with(&g, spec(0, 0, 1), opts).expect("load");
        // The single rank's hidden rows entering the current layer.
        let mut x = embed.embed(&toks);
        for l in 0..cfg.n_layers {
            let one = LlamaModel::load_with(&g, spec(l, 0, 1), opts).expect("load");
            let ranks: Vec<LlamaModel> = (0..tp)
                .map(|r| LlamaModel::load_with(&g, spec(l, r, tp), opts).expect("load"))
                .collect();
            // Prefill of all rows but the last, then the last row as a decode step.
            let steps = [(0, n - 1), (n - 1, n)];
            let mut want = x.clone();
            let mut cache = KvCache::default();
            for &(a, b) in &steps {
                let mut seq = [StageSeq {
                    n: b - a,
                    cache: &mut cache,
                }];
                one.forward_layers(&be, None, &mut seq, &mut want[a * h..b * h])
                    .expect("single layer");
            }
            // The f32 path is f32 throughout, its KV cache included.
            let kv = match weights {
                WeightFormat::F32 => KvType::F32,
                WeightFormat::AsStored => KvType::F16,
            };
            assert_eq!(cache.kv_type(), kv, "{weights:?} KV cache type");
            let groups = ThreadGroup::new(0, tp, Duration::from_secs(60));
            let outs: Vec<Vec<f32>> = std::thread::scope(|sc| {
                let handles: Vec<_> = groups
                    .into_iter()
                    .zip(ranks.iter().zip(&bes))
                    .map(|(group, (m, b))| {
                        let mut y = x.clone();
                        sc.spawn(move || {
                            let mut cache = KvCache::default();
                            for &(s, e) in &steps {
                                let mut seq = [StageSeq {
                                    n: e - s,
                                    cache: &mut cache,
                                }];
                                m.forward_layers(b, Some(&group), &mut seq, &mut y[s * h..e * h])
                                    .expect("TP layer");
                            }
                            y
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect()
            });
            for (r, o) in outs.iter().enumerate() {
                assert_eq!(
                    o, &outs[0],
                    "{weights:?} layer {l}: TP rank {r} disagrees with rank 0"
                );
            }
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = outs[0]
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                d <= 1e-5 * scale,
                "{weights:?} layer {l}: TP=3 differs from one rank by {d} (max |x| {scale})"
            );
            x = want;
        }
    }
}

#[test]
fn a_tp_rank_holds_a_third_of_the_layer_weights_and_only_its_stage() {
    let path = common::model_path();
    let g = Gguf::open(&path).expect("open");
    let one = load_rank(&g, &fixed_plan("m", 30, 1, 1), 0, 0).expect("single");
    let plan = fixed_plan("m", 30, 3, 2);
    let ranks: Vec<LlamaModel> = (0..2)
        .flat_map(|s| (0..3).map(move |r| (s, r)))
        .map(|(s, r)| load_rank(&g, &plan, s, r).expect("rank"))
        .collect();
    let layer_total: usize = ranks.iter().map(|m| m.layer_weight_bytes()).sum();
    assert_eq!(layer_total, one.layer_weight_bytes());
    for m in &ranks {
        let share = m.layer_weight_bytes() as f64 / one.layer_weight_bytes() as f64;
        // A sixth: a third of the heads/FFN of half of the layers.
        assert!((share - 1.0 / 6.0).abs() < 0.01, "share {share}");
    }
    // Embedding on stage 0 rank 0, the (tied) head on the last stage's rank 0, nothing else.
    // The single rank holds both (the tied head as its own copy).
    let embd = (one.weight_bytes() - one.layer_weight_bytes()) / 2;
    for (i, m) in ranks.iter().enumerate() {
        let extra = m.weight_bytes() - m.layer_weight_bytes();
        if i == 0 || i == 3 {
            assert!(
                extra as f64 > 0.9 * embd as f64,
                "rank {i} lacks the embedding/head"
            );
        } else {
            assert!(
                extra < 100_000,
                "rank {i} holds {extra} bytes beyond its layers"
            );
        }
    }
}
