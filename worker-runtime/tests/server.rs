//! The HTTP API end to end on the real model: good and bad requests, streaming, logprobs,
//! readiness, metrics, continuous batching and the queue limit.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use whaleflux_worker::metrics::Metrics;
use whaleflux_worker::server::{AppState, router};
use whaleflux_worker::{ServeOptions, Worker};

const MODEL: &str = "smollm2";

async fn start(max_batch: usize, max_queue: usize) -> (SocketAddr, Arc<AppState>) {
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(MODEL.into(), metrics.clone(), &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = router(state.clone(), 64 * 1024);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let opts = ServeOptions {
        threads: 2,
        context: 256,
        max_batch,
        max_queue,
    };
    let cfg =
        Worker::single_config(&common::model_path(), MODEL, addr.port(), &opts).expect("config");
    let loaded = Worker::new(cfg, 0, "127.0.0.1", None)
        .and_then(|w| w.start(metrics, Arc::new(|e| panic!("the engine failed: {e}"))))
        .expect("load")
        .api
        .expect("a whole-model worker serves the API");
    assert!(state.loaded.set(loaded).is_ok());
    (addr, state)
}

/// Minimal HTTP/1.1 client: returns status, headers (lowercased) and body. A request that takes
/// more than two minutes fails the test instead of hanging it.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, String) {
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        http_unbounded(addr, method, path, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path} got no full answer within 120 s"))
}

async fn http_unbounded(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head[9..12].parse().expect("status");
    let mut body = body.to_string();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head.to_ascii_lowercase(), body)
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

async fn post(addr: SocketAddr, path: &str, v: &Value) -> (u16, Value) {
    let (st, _, body) = http(addr, "POST", path, v.to_string().as_bytes()).await;
    (
        st,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let (addr, _) = start(4, 16).await;
    let c = "/v1/completions";
    let ch = "/v1/chat/completions";
    let cases: Vec<(&str, Vec<u8>, u16, Value)> = vec![
        (c, b"{not json".to_vec(), 400, Value::Null),
        (c, b"[1,2]".to_vec(), 400, Value::Null),
        (c, json!({"model": MODEL, "prompt": 5}).to_string().into_bytes(), 400, json!("prompt")),
        (c, json!({"model": MODEL, "prompt": "x", "max_tokens": "3"}).to_string().into_bytes(), 400, json!("max_tokens")),
        (c, json!({"model": "gpt-9", "prompt": "x"}).to_string().into_bytes(), 404, json!("model")),
        (c, json!({"model": MODEL, "prompt": ""}).to_string().into_bytes(), 400, json!("prompt")),
        (c, json!({"model": MODEL, "prompt": "x", "max_tokens": 100000}).to_string().into_bytes(), 400, json!("max_tokens")),
        (c, json!({"model": MODEL, "prompt": "word ".repeat(400)}).to_string().into_bytes(), 400, json!("prompt")),
        (c, json!({"model": MODEL, "prompt": "x", "temperature": -1}).to_string().into_bytes(), 400, json!("temperature")),
        (c, json!({"model": MODEL, "prompt": "x", "logprobs": 6}).to_string().into_bytes(), 400, json!("logprobs")),
        (c, json!({"model": MODEL, "prompt": "x".repeat(70_000)}).to_string().into_bytes(), 413, Value::Null),
        (ch, json!({"model": MODEL, "messages": "hi"}).to_string().into_bytes(), 400, json!("messages")),
        (ch, json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).to_string().into_bytes(), 400, json!("messages[0].role")),
        (ch, json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string().into_bytes(), 400, json!("top_logprobs")),
        // Fields we do not implement are refused by name, never silently ignored.
        (c, json!({"model": MODEL, "prompt": "x", "best_of": 3}).to_string().into_bytes(), 400, json!("best_of")),
        (c, json!({"model": MODEL, "prompt": "x", "suffix": " end"}).to_string().into_bytes(), 400, json!("suffix")),
        (c, json!({"model": MODEL, "prompt": "x", "logit_bias": {"42": 5}}).to_string().into_bytes(), 400, json!("logit_bias")),
        (ch, json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string().into_bytes(), 400, json!("tools")),
        (ch, json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}).to_string().into_bytes(), 400, json!("tool_choice")),
        (ch, json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}).to_string().into_bytes(), 400, json!("response_format")),
        (c, json!({"model": MODEL, "prompt": "x", "stop": ["y".repeat(257)]}).to_string().into_bytes(), 400, json!("stop")),
    ];
    for (path, body, want_status, want_param) in cases {
        let (st, _, text) = http(addr, "POST", path, &body).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert_eq!(st, want_status, "{shown}: {v}");
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{shown}: {v}"
        );
        assert!(
            e["type"].is_string() && e.get("code").is_some(),
            "{shown}: {v}"
        );
        assert_eq!(e["param"], want_param, "{shown}: {v}");
    }
    let (st, v) = post(addr, c, &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with(" Paris")),
        "{v}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Their neutral values (sent by some clients always) ask for nothing and are accepted.
    let (st, v) = post(addr, c, &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1, "best_of": 1, "suffix": "", "logit_bias": {}, "stop": ["y".repeat(256)]})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(addr, ch, &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_chat_streaming_logprobs_and_metadata() {
    let (addr, _) = start(4, 16).await;
    // Completion with logprobs and a stop string.
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "logprobs": 3, "stop": ["."]
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let ch = &v["choices"][0];
    assert_eq!(ch["text"], " Paris", "{v}");
    assert_eq!(ch["finish_reason"], "stop");
    let lp = &ch["logprobs"];
    assert_eq!(lp["tokens"][0], " Paris");
    assert!(
        (lp["token_logprobs"][0].as_f64().unwrap_or(0.0) + 0.26).abs() < 0.1,
        "{lp}"
    );
    assert_eq!(lp["top_logprobs"][0].as_object().map(|o| o.len()), Some(3));
    // Streaming completion ends with [DONE] and reassembles the same text.
    let (st, head, body) = http(
        addr,
        "POST",
        "/v1/completions",
        json!({
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true}
        })
        .to_string()
        .as_bytes(),
    )
    .await;
    assert_eq!(st, 200);
    assert!(head.contains("text/event-stream"), "{head}");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(
        chunks
            .last()
            .map(|c| c["usage"]["completion_tokens"].clone()),
        Some(json!(5))
    );
    // Chat, plain and streamed, with logprobs.
    let msgs =
        json!([{"role": "user", "content": "What is the capital of France? Answer in one word."}]);
    let (st, v) = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0,
            "logprobs": true, "top_logprobs": 2
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(content.contains("Paris"), "{v}");
    let lps = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !lps.is_empty() && lps[0]["top_logprobs"].as_array().map(Vec::len) == Some(2),
        "{v}"
    );
    let (_, _, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        json!({
            "model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0, "stream": true
        })
        .to_string()
        .as_bytes(),
    )
    .await;
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("json"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, content);
    // Models, health, readiness, metrics.
    let (st, _, body) = http(addr, "GET", "/v1/models", b"").await;
    assert_eq!(st, 200);
    assert!(body.contains(MODEL));
    assert_eq!(http(addr, "GET", "/healthz", b"").await.0, 200);
    assert_eq!(http(addr, "GET", "/readyz", b"").await.0, 200);
    let (_, _, m) = http(addr, "GET", "/metrics", b"").await;
    for name in [
        "whaleflux_worker_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "whaleflux_worker_prompt_tokens_total",
        "whaleflux_worker_generated_tokens_total",
        "whaleflux_worker_time_to_first_token_seconds_bucket",
        "whaleflux_worker_inter_token_seconds_bucket",
        "whaleflux_worker_queue_depth",
        "whaleflux_worker_kv_cache_usage_ratio",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_loaded() {
    let state = AppState::new(MODEL.into(), Arc::new(Metrics::new()), &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(axum::serve(listener, router(state.clone(), 1024)).into_future());
    assert_eq!(http(addr, "GET", "/healthz", b"").await.0, 200);
    assert_eq!(http(addr, "GET", "/readyz", b"").await.0, 503);
    let (st, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x"}),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "not_ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_the_batch_and_the_queue_limit_answers_429() {
    let (addr, state) = start(2, 2).await;
    let req =
        |p: &str, n: usize| json!({"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0});
    // Two sequences run together: each still gets its own greedy answer.
    let alone = post(addr, "/v1/completions", &req("The capital of France is", 6))
        .await
        .1;
    let (ra, rb) = (
        req("The capital of France is", 6),
        req("def fibonacci(n):", 6),
    );
    let (a, b) = tokio::join!(
        post(addr, "/v1/completions", &ra),
        post(addr, "/v1/completions", &rb),
    );
    assert_eq!(a.0, 200);
    assert_eq!(b.0, 200);
    assert_eq!(a.1["choices"][0]["text"], alone["choices"][0]["text"]);
    // A burst of eight long requests: at most two run and two wait at any moment (none can
    // finish within the burst), so at least four are refused with 429 + Retry-After and every
    // accepted one completes.
    let long = req("1, 2, 3, 4, 5, 6, 7,", 48).to_string();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let l = long.clone();
            tokio::spawn(async move { http(addr, "POST", "/v1/completions", l.as_bytes()).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for r in burst {
        let (st, head, body) = r.await.expect("join");
        match st {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert!(head.contains("retry-after: 1"), "{head}");
                assert!(body.contains("queue_full"), "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 2 && refused >= 4, "{ok} accepted, {refused} refused");
    let m = state.metrics.encode();
    let line = format!("status=\"429\"}} {refused}");
    assert!(m.contains(&line), "metrics lack {line}:\n{m}");
}
