//! SIGTERM to real worker processes, as a kubelet sends it: `/readyz` turns 503 at once, new
//! generations get 503 with `Retry-After`, every request in flight (streamed or not) finishes,
//! then the process exits 0 — a whole-model worker and every process of a sharded group alike.
//! A drain that runs out of time ends the streams still open with an error event.

mod common;

use std::time::{Duration, Instant};

use common::procs::{Group, WorkerProc, configs, http, signal, streamed_completion};
use serde_json::Value;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wf-drain-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Waits up to 5 s for `/readyz` on `addr` to answer 503.
fn wait_not_ready(addr: &str) {
    let t = Instant::now();
    loop {
        match http(addr, "GET", "/readyz", &[], "") {
            Some((503, _, body)) => {
                assert_eq!(body, "draining");
                return;
            }
            other => assert!(
                t.elapsed() < Duration::from_secs(5),
                "/readyz still {other:?} 5 s after SIGTERM"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new generation on a draining worker: 503, `Retry-After`, an OpenAI error object.
fn assert_refused(addr: &str) {
    let (code, head, body) = http(
        addr,
        "POST",
        "/v1/completions",
        &[],
        r#"{"model": "smollm2", "prompt": "Hi", "max_tokens": 2}"#,
    )
    .expect("an answer while draining");
    assert_eq!(code, 503, "{body}");
    assert!(head.contains("retry-after:"), "{head}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["code"], "shutting_down", "{body}");
}

/// The data lines of a server-sent-event answer.
fn events(raw: &str) -> Vec<&str> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

/// A stream that ended cleanly with `tokens` generated.
fn assert_complete(raw: &str, tokens: usize) {
    let ev = events(raw);
    assert_eq!(ev.last().copied(), Some("[DONE]"), "{raw}");
    assert!(
        ev.iter().any(|e| e.contains(r#""finish_reason":"length""#)),
        "{raw}"
    );
    let text = ev.iter().filter(|e| e.contains(r#""text":""#)).count();
    // One event per token that produced text, and the final one.
    assert!(
        text >= tokens / 2,
        "only {text} text events for {tokens} tokens"
    );
}

#[test]
fn sigterm_finishes_the_requests_in_flight_then_exits_0() {
    let dir = scratch("one");
    let mut w = WorkerProc::start(&dir, &["--drain-seconds".as_ref(), "60".as_ref()], &[]);
    w.wait_for("ready", |w| w.get("/readyz").is_some());
    let (first, stream) = streamed_completion(&w.addr, 150, &[]);
    let addr = w.addr.clone();
    let plain = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/v1/completions",
            &[],
            r#"{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 120, "temperature": 0}"#,
        )
    });
    first
        .recv_timeout(Duration::from_secs(60))
        .expect("a first streamed token");
    signal(&w.child, libc::SIGTERM);
    wait_not_ready(&w.addr);
    assert_refused(&w.addr);
    let (raw, _) = stream.join().expect("stream thread");
    assert_complete(&raw, 150);
    let (code, _, body) = plain.join().expect("plain thread").expect("plain answer");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{body}"
    );
    let status = w.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", w.log_text());
    let log = w.log_text();
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_drain_out_of_time_ends_open_streams_with_an_error_not_a_clean_end() {
    let dir = scratch("timeout");
    let mut w = WorkerProc::start(&dir, &["--drain-seconds".as_ref(), "0".as_ref()], &[]);
    w.wait_for("ready", |w| w.get("/readyz").is_some());
    let (first, stream) = streamed_completion(&w.addr, 240, &[]);
    first
        .recv_timeout(Duration::from_secs(60))
        .expect("a first streamed token");
    signal(&w.child, libc::SIGTERM);
    let (raw, _) = stream.join().expect("stream thread");
    let ev = events(&raw);
    let last = ev.last().copied().unwrap_or_default();
    assert!(
        last.contains(r#""error""#) && !raw.contains("[DONE]"),
        "a stream cut by the drain's end must end with an error event: {raw}"
    );
    let status = w.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", w.log_text());
    assert!(
        w.log_text().contains("the drain timed out"),
        "{}",
        w.log_text()
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sharded_group_drains_together_and_every_process_exits_0() {
    // Three stages as three processes; the kubelet signals every pod of a deleted group.
    let cfgs = configs(1, 3, false, 20_000);
    let mut g = Group::spawn(&cfgs, "drain", &["--drain-seconds", "60"]);
    g.wait_ready(&cfgs);
    let api = format!("127.0.0.1:{}", cfgs[0].ports.http);
    let (first, stream) = streamed_completion(&api, 150, &[]);
    first
        .recv_timeout(Duration::from_secs(60))
        .expect("a first streamed token");
    for p in &g.procs {
        signal(p, libc::SIGTERM);
    }
    for c in &cfgs {
        wait_not_ready(&format!("127.0.0.1:{}", c.ports.http));
    }
    assert_refused(&api);
    let (raw, _) = stream.join().expect("stream thread");
    assert_complete(&raw, 150);
    for i in 0..cfgs.len() {
        let status = g.wait_exit(i, Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "stage {i}:\n{}", g.log(i));
    }
}
