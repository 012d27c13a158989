//! Sliding-window attention (`llama.attention.sliding_window`, Mistral's): a position attends to
//! itself and the `w - 1` positions before it. Checked on one-block models derived from the
//! SmolLM2 file with gguf-py (the first block only, with and without a window of 8): in one
//! block a token's keys and values depend on nothing but the token and its position, and RoPE
//! scores depend only on the distance between positions, so the last position of a long prompt
//! under the window must see what the last 8 tokens alone see, in the batched prompt path and
//! in a decode step, and must differ from the whole-context answer. Needs
//! `WHALEFLUX_TEST_MODEL` and `WHALEFLUX_PYTHON` (gguf-py).

mod common;

use whaleflux_worker::Runtime;
use whaleflux_worker::engine::sampling::log_softmax;
use whaleflux_worker::engine::{KvCache, SeqInput};
use whaleflux_worker::shard::LoadOptions;

const WINDOW: usize = 8;

fn one_block(window: Option<usize>) -> Runtime {
    let variant = match window {
        Some(w) => format!("1-block-window-{w}"),
        None => "1-block".to_string(),
    };
    let path = common::derived(&variant, |src, part| {
        let w = window.map(|w| w.to_string());
        let mut args = vec!["window", src, part, "1"];
        args.extend(w.as_deref());
        common::derive_gguf(&args);
    });
    // The f32 path: no f16 cache rounding, whose steps depend on the absolute position.
    Runtime::load_with(&path, 2, LoadOptions::f32()).expect("the derived file loads")
}

/// Log-probabilities at the last position: the whole prompt at once, or all but its last
/// token at once and then the last as a decode step.
fn last(rt: &Runtime, ids: &[u32], decode_last: bool) -> Vec<f32> {
    let mut cache = KvCache::default();
    let mut run = |tokens: &[u32]| {
        rt.model.forward(
            rt.backend.as_ref(),
            &mut [SeqInput {
                tokens,
                cache: &mut cache,
            }],
        )
    };
    let logits = if decode_last {
        run(&ids[..ids.len() - 1]);
        run(&ids[ids.len() - 1..])
    } else {
        run(ids)
    };
    log_softmax(&logits[0])
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_sliding_window_limits_attention_to_the_last_positions() {
    let windowed = one_block(Some(WINDOW));
    assert_eq!(windowed.model.config.sliding_window, Some(WINDOW));
    let whole = one_block(None);
    assert_eq!(whole.model.config.sliding_window, None);
    let ids = windowed
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill")
        .expect("tokens");
    assert!(ids.len() > 2 * WINDOW, "{} tokens", ids.len());
    let tail = &ids[ids.len() - WINDOW..];
    let alone = last(&whole, tail, false);
    for decode_last in [false, true] {
        let got = last(&windowed, &ids, decode_last);
        let d = max_diff(&got, &alone);
        println!(
            "window {WINDOW}, decode step {decode_last}: max |Δ logprob| vs the last {WINDOW} tokens alone = {d:.2e}"
        );
        assert!(d < 1e-4, "decode step {decode_last}: {d}");
    }
    let full = last(&whole, &ids, false);
    let d = max_diff(&full, &alone);
    println!("without the window: max |Δ logprob| = {d:.3}");
    assert!(d > 0.05, "the window must change the answer ({d})");
}
