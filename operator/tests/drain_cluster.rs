//! Graceful termination through the whole cluster: a worker pod that goes, because a rollout
//! replaces its group (the StatefulSet controller deletes the old pod) or a scale to 0 removes it
//! (the operator deletes the StatefulSet, the garbage collector its pods), is stopped by the
//! process kubelet as a real kubelet stops it: not Ready at once (the endpoints drop it), the
//! operator's 5 s preStop pause, SIGTERM, and the worker drains. A streamed completion in flight
//! when the pod is deleted ends with every token asked for and `data: [DONE]`; with pods
//! SIGKILLed at deletion it would be cut.
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `kubectl`, and the worker binary (`cargo build -p
//! whaleflux-worker`).

mod cluster;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cluster::{Cluster, Operator, bounded, rtx_nodes};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);
/// How long a streamed completion should run after its pod is deleted: the 5 s preStop pause,
/// then a few seconds of draining.
const STREAM_SECONDS: f64 = 10.0;
/// The deployment's API Service, as pods resolve it.
const SERVICE: &str = "smollm2.default.svc.cluster.local";
/// The prompt: at temperature 0 SmolLM2 continues it past 2000 tokens without an end of text.
const PROMPT: &str = "Once upon a time";

/// A completion request's body.
fn body(max_tokens: usize, stream: bool) -> String {
    let mut b = serde_json::json!({"model": "smollm2-135m", "prompt": PROMPT,
        "max_tokens": max_tokens, "temperature": 0, "stream": stream});
    if stream {
        b["stream_options"] = serde_json::json!({"include_usage": true});
    }
    b.to_string()
}

/// The body of an HTTP/1.1 answer, de-chunked when it is chunked.
fn http_body(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        return String::new();
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return rest.to_string();
    }
    let (mut out, mut rest) = (String::new(), rest);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A streamed completion read on a thread.
struct Streamed {
    /// Fires at the first text event.
    first: std::sync::mpsc::Receiver<()>,
    /// The de-chunked body and when the stream ended.
    done: std::thread::JoinHandle<(String, Instant)>,
}

fn stream(addr: SocketAddr, max_tokens: usize) -> Streamed {
    let (tx, first) = std::sync::mpsc::channel();
    let done = std::thread::spawn(move || {
        let body = body(max_tokens, true);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("request sent");
        let (mut raw, mut buf, mut told) = (Vec::new(), [0u8; 4096], false);
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&raw).contains("\"text\"") {
                told = true;
                let _ = tx.send(());
            }
        }
        (http_body(&raw), Instant::now())
    });
    Streamed { first, done }
}

/// The `data:` payloads of a server-sent-event body.
fn events(body: &str) -> Vec<&str> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

/// Asserts a stream ended cleanly with `max_tokens` generated: `[DONE]` last, finish reason
/// `length`, and the usage chunk's count.
fn assert_complete(body: &str, max_tokens: usize, what: &str) {
    let ev = events(body);
    assert_eq!(
        ev.last().copied(),
        Some("[DONE]"),
        "{what}: the stream was cut, not drained:\n{}",
        tail(body)
    );
    let json: Vec<Value> = ev
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    assert!(
        json.iter().all(|e| e["error"].is_null()),
        "{what}: an error event:\n{}",
        tail(body)
    );
    let finish: Vec<&str> = json
        .iter()
        .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["length"], "{what}:\n{}", tail(body));
    let usage = json
        .iter()
        .find_map(|e| e["usage"]["completion_tokens"].as_u64());
    assert_eq!(
        usage,
        Some(max_tokens as u64),
        "{what}: every token asked for:\n{}",
        tail(body)
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().rev().take(6).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The worker's address on its pod IP.
async fn api_addr(pods: &Api<Pod>, name: &str) -> SocketAddr {
    let ip = pods
        .get(name)
        .await
        .expect("pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    format!("{ip}:8000").parse().expect("address")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Streams a completion from `pod`, runs `go` (which gets the pod deleted) once the first
/// token has come, and checks the stream was drained: still in flight when the worker got its
/// SIGTERM, after the pod had turned Terminating and not Ready, and complete.
async fn drained_while<F: FnOnce()>(
    c: &Cluster,
    op: &Operator,
    pods: &Api<Pod>,
    name: &str,
    max_tokens: usize,
    what: &str,
    go: F,
) {
    let kubelet = c.kubelet.as_ref().expect("kubelet");
    let drains_before = kubelet
        .logs("default", name, "worker")
        .matches(" draining ")
        .count();
    let s = stream(api_addr(pods, name).await, max_tokens);
    s.first
        .recv_timeout(Duration::from_secs(60))
        .expect("a first streamed token");
    let deleted = Instant::now();
    go();
    // The pod turns Terminating and not Ready while the stream runs, and the API Service's
    // name stops resolving to it (the endpoints drop it before the drain).
    let (mut unready_while_streaming, mut out_of_dns) = (false, false);
    while !s.done.is_finished() {
        let p = pods.get_opt(name).await.expect("get pod");
        if let Some(p) = p
            && p.metadata.deletion_timestamp.is_some()
            && !ready(&p)
        {
            unready_while_streaming = true;
            out_of_dns |= cluster::dns_a(kubelet.dns_addr(), SERVICE).is_empty();
        }
        assert!(
            deleted.elapsed() < WAIT,
            "{what}: the stream did not end\n{}",
            c.diagnose(op)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (body, ended) = s.done.join().expect("stream thread");
    let log = kubelet.logs("default", name, "worker");
    let drain = log
        .lines()
        .filter(|l| l.contains(" draining "))
        .nth(drains_before)
        .unwrap_or_else(|| panic!("{what}: the worker never drained (no SIGTERM):\n{log}"))
        .to_string();
    eprintln!(
        "{what}: stream of {max_tokens} tokens ended {:.1} s after the delete; {drain}",
        ended.duration_since(deleted).as_secs_f64()
    );
    assert!(
        drain.contains("cause=\"SIGTERM\"") && drain.contains("in_flight=1"),
        "{what}: SIGTERM must reach the worker while the stream is in flight (raise \
         STREAM_SECONDS if the stream ended first): {drain}"
    );
    assert!(
        ended.duration_since(deleted) >= Duration::from_secs(5),
        "{what}: the stream outlasted the 5 s preStop pause"
    );
    assert!(
        unready_while_streaming && out_of_dns,
        "{what}: the pod was Terminating, not Ready and out of {SERVICE} while it drained"
    );
    assert_complete(&body, max_tokens, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_and_a_scale_to_zero_drain_the_streams_in_flight() {
    let c = Cluster::start(rtx_nodes(1, 4), true).await;
    let op = c.operator("op-drain", 6);
    let test = async {
        c.install_crds_and_pool();
        let client = c.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        c.kubectl_ok(&["apply", "-f", "-"], Some(&c.smollm2_manifest()));
        c.wait_smollm2_ready("90s", &op);
        let t0 = Instant::now();
        let name = "smollm2-g0-0";

        // The decode speed of this machine's worker, to size a stream that outlasts the pause.
        let addr = api_addr(&pods, name).await;
        let probe = 64;
        let start = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            whaleflux_operator::local::http::request(
                addr,
                "POST",
                "/v1/completions",
                Some(&body(probe, false)),
                Duration::from_secs(60),
            )
        })
        .await
        .expect("request thread")
        .expect("a completion");
        assert_eq!(r.status, 200, "{}", r.body);
        let rate = probe as f64 / start.elapsed().as_secs_f64();
        // At most what the 2048-token context leaves after the prompt.
        let max_tokens = ((rate * STREAM_SECONDS) as usize).clamp(200, 2000);
        eprintln!("decode: {rate:.0} tokens/s; streams of {max_tokens} tokens");

        // A rollout: the changed spec replaces the group, the StatefulSet controller deletes the
        // old pod, and its stream drains before the new pod starts.
        drained_while(&c, &op, &pods, name, max_tokens, "rollout", || {
            c.kubectl_ok(
                &[
                    "patch",
                    "llmd/smollm2",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"serving":{"maxConcurrentSequences":4}}}"#,
                ],
                None,
            );
        })
        .await;
        c.wait_smollm2("jsonpath={.status.observedGeneration}=2", "60s", &op);
        c.wait_smollm2_ready("90s", &op);
        c.eventually_or_diagnose(&op, "the new pod Ready", WAIT, || async {
            pods.get_opt(name)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none() && ready(&p))
        })
        .await;

        // A scale to 0: the operator deletes the group, the pod is drained, then it goes.
        drained_while(&c, &op, &pods, name, max_tokens, "scale to 0", || {
            c.kubectl_ok(&["scale", "llmd/smollm2", "--replicas=0"], None);
        })
        .await;
        c.eventually_or_diagnose(&op, "the drained pod to go", WAIT, || async {
            pods.get_opt(name).await.is_ok_and(|p| p.is_none())
        })
        .await;
        eprintln!(
            "both drains checked {:.1} s after Ready",
            t0.elapsed().as_secs_f64()
        );
    };
    bounded(Duration::from_secs(240), test).await;
}
