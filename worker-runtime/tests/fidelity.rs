//! Fidelity against llama.cpp on the files people download: the SmolLM2 Q4_1 file requantized
//! by llama.cpp's own quantizer (llama-cpp-python 0.3.36, built here by
//! `scripts/llama-venv.sh`) to Q4_K_M, Q5_K_M and Q6_K, the Q4_1 original, the original with
//! Llama 3.1's RoPE scaling added (a `rope_freqs` tensor), and the same weights as a `qwen2`
//! file and with a SentencePiece vocabulary (written with gguf-py).
//!
//! For each prompt (5 to ~150 tokens): the token ids are llama.cpp's; the first greedy token is
//! llama.cpp's (batched or token by token; where those two differ, one of its top 3); and,
//! measured against the truth (the same file's weights dequantized to f32, f32 activations, no
//! activation rounding), our mean top-5 log-prob error is llama.cpp's or less (within the 25%
//! noise of nine prompts; both are printed).
//! SmolLM2 has outlier channels that turn a one-ulp difference into a flipped 8-bit activation
//! a few layers on, so two engines that round in different orders differ by ~0.1-0.5 nats on
//! longer prompts (llama.cpp's batched and token-by-token paths differ from each other by as
//! much); the distance from the truth is what says whether the arithmetic is as good. The
//! distance from llama.cpp is printed beside it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use whaleflux_worker::Runtime;
use whaleflux_worker::engine::sampling::{argmax, log_softmax};
use whaleflux_worker::engine::{KvCache, SeqInput};
use whaleflux_worker::model::gguf::{GgmlType, Gguf};
use whaleflux_worker::shard::LoadOptions;

/// How much larger than llama.cpp's our mean error against the truth may be before the test
/// fails (the means are over a handful of prompts, so they carry noise of their own).
const ACCURACY_SLACK: f64 = 1.25;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
    "1 + 1 = 2. 12345 + 67 =",
    "Whales are marine mammals. The blue whale is the largest animal known to have ever \
     existed, reaching lengths of up to thirty metres. Like all mammals, whales breathe air, \
     and they must surface regularly to do so. Most species live in groups called",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a \
     haiku about GPUs.<|im_end|>\n<|im_start|>assistant\n",
    "fn main() {\n    let xs: Vec<u32> = (1..=10).collect();\n    let total: u32 = xs.iter()",
    "  Héllo wörld! 🐋 don't\n\n\tcode()  12345 + 67 =",
    "Kubernetes is an open-source system for automating deployment, scaling, and management of \
     containerized applications. It groups containers that make up an application into logical \
     units for easy management and discovery. Kubernetes builds upon fifteen years of \
     experience of running production workloads, combined with best-of-breed ideas and \
     practices from the community. Designed on the same principles that allow Google to run \
     billions of containers a week, Kubernetes can scale without increasing your operations \
     team. Whether testing locally or running a global enterprise, Kubernetes flexibility grows \
     with you to deliver your applications consistently and easily no matter how complex your \
     need is. An operator is a method of packaging, deploying and managing a Kubernetes \
     application. In short, an operator",
];

/// The interpreter of the llama.cpp venv; fails (never skips) with the way to get it.
fn llama_python() -> PathBuf {
    let hint = "set WHALEFLUX_LLAMA_PYTHON to the python of llama-cpp-python's venv: run \
                `export WHALEFLUX_LLAMA_PYTHON=$(scripts/llama-venv.sh)` from the repository root";
    let p = std::env::var_os("WHALEFLUX_LLAMA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("WHALEFLUX_LLAMA_PYTHON is not set; {hint}"));
    assert!(
        p.is_file(),
        "WHALEFLUX_LLAMA_PYTHON={} is not a file; {hint}",
        p.display()
    );
    p
}

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/llama_ref.py")
}

fn run_python(args: &[&str]) -> Vec<u8> {
    let out = Command::new(llama_python())
        .arg(helper())
        .args(args)
        .output()
        .expect("run llama_ref.py");
    assert!(
        out.status.success(),
        "llama_ref.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The SmolLM2 file requantized to `ftype` by llama.cpp.
fn requantized(ftype: &str) -> PathBuf {
    common::derived(ftype, |src, part| {
        run_python(&["quantize", src, part, ftype]);
    })
}

/// How many tensors of each type the file holds.
fn types(path: &Path) -> BTreeMap<String, usize> {
    let g = Gguf::open(path).expect("open the requantized file");
    let mut count = BTreeMap::new();
    for t in g.tensors() {
        *count.entry(format!("{:?}", t.ty)).or_insert(0) += 1;
    }
    count
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    tokens: Vec<u32>,
    first: u32,
    first_stepwise: u32,
    /// (token, logprob batched, logprob token by token) for llama.cpp's batched top 5.
    top: Vec<(u32, f64, f64)>,
}

/// Requantize to `ftype`, check the file holds `must_hold`, then compare with llama.cpp.
fn matches_llama_cpp(ftype: &str, must_hold: &[GgmlType]) {
    let path = requantized(ftype);
    compare(ftype, &path, must_hold);
}

/// The last position's log-probabilities after `ids`.
fn logprobs(rt: &Runtime, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::default();
    let logits = rt.model.forward(
        rt.backend.as_ref(),
        &mut [SeqInput {
            tokens: ids,
            cache: &mut cache,
        }],
    );
    log_softmax(&logits[0])
}

fn compare(label: &str, path: &Path, must_hold: &[GgmlType]) {
    let held = types(path);
    println!("{label}: tensor types {held:?}");
    for ty in must_hold {
        assert!(
            held.contains_key(&format!("{ty:?}")),
            "{label}: llama.cpp's file has no {ty:?} tensor ({held:?})"
        );
    }
    let prompts = path.with_extension("prompts.json");
    std::fs::write(&prompts, serde_json::to_vec(PROMPTS).expect("json")).expect("write");
    let refs: Vec<Reference> = serde_json::from_slice(&run_python(&[
        "logprobs",
        path.to_str().expect("utf-8 path"),
        prompts.to_str().expect("utf-8 path"),
    ]))
    .expect("llama_ref.py output");
    let rt = Runtime::load(path, 2).expect("load the file");
    let truth = Runtime::load_with(path, 2, LoadOptions::f32()).expect("load the f32 truth");
    let mut bad = Vec::new();
    let (mut ours_sum, mut theirs_sum, mut ours_max, mut theirs_max) = (0f64, 0f64, 0f64, 0f64);
    for r in &refs {
        let short: String = r.prompt.chars().take(24).collect();
        let ids = rt.tokenizer.encode(&r.prompt).expect("encode");
        assert_eq!(ids, r.tokens, "{label}: token ids for {:?}", r.prompt);
        let lp = logprobs(&rt, &ids);
        let tl = logprobs(&truth, &ids);
        let first = argmax(&lp);
        // Where llama.cpp's own two paths pick different tokens the top is a near tie, and
        // any of its top 3 is as right as either of them.
        let tie = r.first != r.first_stepwise && r.top.iter().take(3).any(|t| t.0 == first);
        if first != r.first && first != r.first_stepwise && !tie {
            bad.push(format!(
                "{short:?}: first greedy token {first}, llama.cpp {} batched, {} token by token",
                r.first, r.first_stepwise
            ));
        }
        // Largest top-5 error of each engine against the truth, and our distance from
        // llama.cpp beyond its own batched/token-by-token spread.
        let (mut ours, mut batched_err, mut stepwise_err, mut beyond) = (0f64, 0f64, 0f64, 0f64);
        for &(id, batched, stepwise) in &r.top {
            let (got, t) = (f64::from(lp[id as usize]), f64::from(tl[id as usize]));
            ours = ours.max((got - t).abs());
            batched_err = batched_err.max((batched - t).abs());
            stepwise_err = stepwise_err.max((stepwise - t).abs());
            let (lo, hi) = (batched.min(stepwise), batched.max(stepwise));
            beyond = beyond.max((lo - got).max(got - hi).max(0.0));
        }
        let theirs = (batched_err + stepwise_err) / 2.0;
        ours_sum += ours;
        theirs_sum += theirs;
        ours_max = ours_max.max(ours);
        theirs_max = theirs_max.max(batched_err.max(stepwise_err));
        println!(
            "{label} {short:?} ({} tokens): first {first}; |error| vs f32 truth: ours {ours:.4}, \
             llama.cpp {batched_err:.4} batched / {stepwise_err:.4} token by token; \
             beyond llama.cpp's spread {beyond:.4}",
            ids.len()
        );
    }
    let n = refs.len() as f64;
    let (ours_mean, theirs_mean) = (ours_sum / n, theirs_sum / n);
    println!(
        "{label}: mean |top-5 logprob error| vs f32 truth: ours {ours_mean:.4}, llama.cpp \
         {theirs_mean:.4}; max: ours {ours_max:.4}, llama.cpp {theirs_max:.4}"
    );
    if ours_mean > ACCURACY_SLACK * theirs_mean + 0.02 {
        bad.push(format!(
            "mean error against the f32 truth {ours_mean:.4} exceeds llama.cpp's {theirs_mean:.4}"
        ));
    }
    assert!(bad.is_empty(), "{label}:\n{}", bad.join("\n"));
}

#[test]
fn q4_k_m_matches_llama_cpp() {
    // Rows of 576 are not a multiple of 256: llama.cpp falls back to Q5_0 and Q8_0 for those.
    matches_llama_cpp("Q4_K_M", &[GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_0]);
}

#[test]
fn q5_k_m_matches_llama_cpp() {
    matches_llama_cpp("Q5_K_M", &[GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q5_1]);
}

#[test]
fn q6_k_matches_llama_cpp() {
    matches_llama_cpp("Q6_K", &[GgmlType::Q6_K]);
}

#[test]
fn the_q4_1_original_matches_llama_cpp() {
    compare("Q4_1", &common::model_path(), &[GgmlType::Q4_1]);
}

/// Llama 3.1's RoPE scaling reaches llama.cpp as per-frequency divisors (`rope_freqs`): the
/// SmolLM2 file with the llama3 rule's divisors added (factor 8 over an original context of
/// 256, so that even short prompts feel it) changes the answers, and they match llama.cpp's.
#[test]
fn llama3_rope_frequency_factors_match_llama_cpp() {
    let path = common::derived("rope-freqs", |src, part| {
        common::derive_gguf(&["rope-freqs", src, part, "8", "256"]);
    });
    let scaled = Runtime::load(&path, 2).expect("load the scaled file");
    let plain = Runtime::load(&common::model_path(), 2).expect("load the original");
    let prompt = PROMPTS[4];
    let ids = plain.tokenizer.encode(prompt).expect("encode");
    let (a, b) = (logprobs(&plain, &ids), logprobs(&scaled, &ids));
    let moved = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        moved > 0.1,
        "the rope_freqs tensor changed no log-probability by more than {moved}"
    );
    compare("rope_freqs", &path, &[]);
}

/// A `qwen2` file (the SmolLM2 weights under Qwen2's metadata keys and pre-tokenizer, with random
/// Q/K/V biases, written with gguf-py): llama.cpp runs it as Qwen2 (biases, NeoX-style RoPE,
/// single-digit pre-tokenization) and so must we.
#[test]
fn a_qwen2_file_matches_llama_cpp() {
    let path = common::derived("qwen2", |src, part| {
        common::derive_gguf(&["qwen2", src, part])
    });
    let rt = Runtime::load(&path, 2).expect("load the qwen2 file");
    assert!(rt.model.config.rope_neox, "qwen2 takes NeoX-style RoPE");
    compare("qwen2", &path, &[]);
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`, as Llama 2 and Mistral files
/// carry: scored pieces, `<0xXX>` byte pieces, no merges), written with gguf-py over the SmolLM2
/// weights: token ids (space prefix, `▁`, merges by score, byte fallback for the emoji and
/// accents, special tokens written in the text) and answers are llama.cpp's.
#[test]
fn a_sentencepiece_vocabulary_matches_llama_cpp() {
    let path = common::derived("spm", |src, part| common::derive_gguf(&["spm", src, part]));
    compare("spm", &path, &[]);
}
