//! Fuzz the OpenAI API's request handling in-process: the body (and the endpoint) come from the
//! input and go through the real axum router of a worker serving a tiny model, so parsing,
//! validation, the chat template, tokenization, admission, generation and the response (plain
//! or streamed) all run. Every request must end in a well-formed answer: a 2xx with choices
//! (or a finished stream), or a 4xx with an error object naming what is wrong; never a panic,
//! a 5xx, or a hang.
//!
//! The first byte: bit 0 picks /v1/chat/completions over /v1/completions, bit 1 drops the JSON
//! content type; the rest is the body.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use whaleflux_worker::metrics::Metrics;
use whaleflux_worker::server::{AppState, router};
use whaleflux_worker::{ServeOptions, Worker};
use whaleflux_worker_fuzz::{ModelSpec, TokenizerKind};

const MODEL: &str = "tiny";
/// The request-body limit the server runs with here.
const BODY_LIMIT: usize = 16 * 1024;

struct Server {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
}

/// A worker on a tiny model (one layer, hidden 32 in two heads, FFN 32, 128 tokens of context, byte-level BPE with
/// ChatML), loaded once per process.
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let spec = ModelSpec {
            arch: 0,
            layers: 0,
            heads: 0,
            kv_heads: 0,
            head_dim: 0,
            ffn: 0,
            context: 112,
            tokenizer: TokenizerKind::Gpt2 { pre: 2 },
            extra_tokens: Vec::new(),
            template: None,
            types: [0, 0, 0],
            tied: true,
            bias: false,
            rope_freqs: false,
            edits: Vec::new(),
            tp: 0,
            pp: 0,
            f32_weights: false,
        };
        let path = std::env::temp_dir().join(format!("whaleflux-fuzz-{}.gguf", std::process::id()));
        std::fs::write(&path, spec.build()).expect("write the tiny model");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let metrics = Arc::new(Metrics::new());
        let state = AppState::new(MODEL.into(), metrics.clone(), &[]);
        let opts = ServeOptions {
            threads: 1,
            context: 128,
            max_batch: 4,
            max_queue: 64,
        };
        let loaded = {
            let _guard = rt.enter();
            let cfg = Worker::single_config(&path, MODEL, 0, &opts).expect("config");
            Worker::new(cfg, 0, "127.0.0.1", None)
                .and_then(|w| w.start(metrics, Arc::new(|e| panic!("the engine failed: {e}"))))
                .expect("load the tiny model")
                .api
                .expect("a whole-model worker serves the API")
        };
        let _ = std::fs::remove_file(&path);
        assert!(state.loaded.set(loaded).is_ok());
        Server {
            rt,
            app: router(state, BODY_LIMIT),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let s = server();
    let path = if mode & 1 == 1 {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut req = Request::post(path);
    if mode & 2 == 0 {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Body::from(body.to_vec())).expect("request");
    let (status, ctype, bytes) = s.rt.block_on(async {
        let resp = s
            .app
            .clone()
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .expect("the whole answer");
        (status, ctype, bytes)
    });
    let text = String::from_utf8_lossy(&bytes);
    if std::env::var_os("WHALEFLUX_FUZZ_VERBOSE").is_some() {
        eprintln!("{path} -> {status}: {text}");
    }
    assert!(
        status.is_success() || status.is_client_error(),
        "{status} for {path}: {text}"
    );
    if ctype.starts_with("text/event-stream") {
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "a stream that does not finish: {text}"
        );
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line != "[DONE]" {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("event {line:?} is not JSON: {e}"));
                assert!(v.get("error").is_none(), "an error event: {line}");
            }
        }
        return;
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"));
    if status.is_success() {
        assert!(v["choices"][0]["finish_reason"].is_string(), "{text}");
    } else {
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "{status} without an error message: {text}");
    }
});
