//! The chart's dashboards and alerts against what the binaries really export: a real
//! `whaleflux-worker` (served a few completions and made to refuse one with 429) and the real
//! `whaleflux operator` (against the in-memory API server and process kubelet, running the
//! smollm2 example to Ready, one StatefulSet apply failing) are scraped; then
//! `charts/tests/check_observability.py` checks that every metric the dashboards and rules name
//! is exported (`exprs --exported`; the worker sees two H100s through the fake NVML from
//! `e2e/`, loaded with its ordinary `--nvml-library` option), runs the promtool unit tests of
//! the alerts (`rules`), and has a real Prometheus scrape both binaries and find data for every
//! panel, the GPU fleet's included. All three run; the test then fails with every failed
//! check's output.
//!
//! Needs `WHALEFLUX_TEST_MODEL`, `WHALEFLUX_PYTHON` (a Python with PyYAML and helm-python-sdk),
//! `kubectl`, and `promtool` and `prometheus` on PATH (Debian's `prometheus` package).

mod cluster;
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cluster::{Cluster, bounded, eventually, root, rtx_nodes};
use whaleflux_e2e::RequestMatch;
use whaleflux_e2e::fake_nvml::{self, FakeNode};
use whaleflux_operator::local::http;

/// The name clients send for the standalone worker's model.
const MODEL_NAME: &str = "smollm2-135m";

/// The Python that runs the check script, from `$WHALEFLUX_PYTHON`.
fn python() -> String {
    std::env::var("WHALEFLUX_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WHALEFLUX_PYTHON is not set: point it at a Python with PyYAML and helm-python-sdk \
             (scripts/test.sh creates one in ~/.cache/whaleflux/venv)"
        )
    })
}

/// A scratch folder for the scraped texts and the worker's log, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("wf-observability-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A standalone worker on loopback with one batch slot and one queue place, so that a third
/// concurrent request is refused with 429; killed when dropped.
struct Worker {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Worker {
    /// The worker sees two H100s through the fake NVML (its ordinary `--nvml-library`).
    fn start(dir: &Path) -> Self {
        let port = common::free_port();
        let log = dir.join("worker.log");
        let file = std::fs::File::create(&log).expect("worker log");
        let library = fake_nvml::build(dir).expect("the fake NVML builds");
        let state = dir.join("gpus.state");
        let mut node = FakeNode::h100s(2);
        node.gpus[1].throttle_reasons = 0x4;
        node.write(&state).expect("fake GPU state");
        let child = Command::new(common::worker_binary())
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--threads", "1", "--ctx", "512", "--max-batch", "1"])
            .args(["--max-queue", "1", "--model-name", MODEL_NAME, "--model"])
            .arg(common::model())
            .args(["--gpu-sample-seconds", "1", "--nvml-library"])
            .arg(&library)
            .env(fake_nvml::STATE_ENV, &state)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("whaleflux-worker starts");
        let w = Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while get(w.addr, "/readyz").map(|(code, _)| code) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "the worker is not ready in 90 s; its log:\n{}",
                w.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
        w
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gauge's value from /metrics.
    fn gauge(&self, name: &str) -> Option<f64> {
        let (_, text) = get(self.addr, "/metrics")?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until the gauge `name` is at least `at_least`.
    fn wait_gauge(&self, name: &str, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.gauge(name).is_none_or(|v| v < at_least) {
            assert!(
                Instant::now() < deadline,
                "{name} did not reach {at_least} in 30 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path`; (status, body) or `None` when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http::request(addr, "GET", path, None, Duration::from_secs(10))
        .ok()
        .map(|r| (r.status, r.body))
}

/// A greedy completion of `max_tokens` tokens; the response status.
fn complete_status(addr: SocketAddr, max_tokens: u32) -> u16 {
    let body = serde_json::json!({
        "model": MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    http::request(
        addr,
        "POST",
        "/v1/completions",
        Some(&body),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("completion request to {addr}: {e}"))
    .status
}

/// Runs the check script with `args`: its standard output, or (when it fails) a report of
/// what it printed.
fn check(args: &[&str], limit: Duration) -> Result<String, String> {
    let script = root().join("charts/tests/check_observability.py");
    let out = common::output_within(Command::new(python()).arg(&script).args(args), limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "check_observability.py {} failed ({}):\n{stdout}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Traffic the serving dashboard shows: completions, and one refused because the only batch
/// slot and the only queue place are taken.
fn serve_and_refuse(w: &Worker) {
    for tokens in [4, 8] {
        assert_eq!(complete_status(w.addr, tokens), 200, "{}", w.log_text());
    }
    let addr = w.addr;
    // Long enough to still run while the next two arrive, on a loaded machine too.
    let long = thread::spawn(move || complete_status(addr, 256));
    w.wait_gauge("whaleflux_worker_running_sequences", 1.0);
    let queued = thread::spawn(move || complete_status(addr, 1));
    w.wait_gauge("whaleflux_worker_queue_depth", 1.0);
    assert_eq!(
        complete_status(w.addr, 1),
        429,
        "a request beyond the queue is refused"
    );
    assert_eq!(long.join().expect("long request"), 200);
    assert_eq!(queued.join().expect("queued request"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboards_and_alerts_match_the_exported_metrics() {
    let scratch = Scratch::new();
    let c = Cluster::start(rtx_nodes(1, 4), true).await;
    let op = c.operator("op-observability", 6);
    bounded(Duration::from_secs(360), async {
        // The operator runs the smollm2 example to Ready, so its per-deployment, per-node and
        // planning series have samples; one failed StatefulSet apply gives the reconcile
        // errors a sample too.
        c.install_crds_and_pool();
        c.server.faults().fail(
            RequestMatch::verb_resource("patch", "statefulsets"),
            500,
            Some(1),
        );
        c.kubectl_ok(&["apply", "-f", "-"], Some(&c.smollm2_manifest()));
        c.wait_smollm2_ready("120s", &op);
        eventually(
            "the operator to export whaleflux_leader 1",
            Duration::from_secs(60),
            || async {
                op.get("/metrics")
                    .is_some_and(|(code, body)| code == 200 && body.contains("whaleflux_leader 1"))
            },
        )
        .await;

        tokio::task::block_in_place(|| {
            let worker = Worker::start(&scratch.0);
            serve_and_refuse(&worker);

            let (code, worker_text) = get(worker.addr, "/metrics").expect("worker /metrics");
            assert_eq!(code, 200, "{worker_text}");
            assert!(
                worker_text.contains(r#"status="429""#),
                "the refusal is counted:\n{worker_text}"
            );
            let (code, operator_text) = op.get("/metrics").expect("operator /metrics");
            assert_eq!(code, 200, "{operator_text}");
            let worker_file = scratch.0.join("worker.metrics");
            let operator_file = scratch.0.join("operator.metrics");
            std::fs::write(&worker_file, &worker_text).expect("worker metrics written");
            std::fs::write(&operator_file, &operator_text).expect("operator metrics written");

            // Every metric a dashboard or alert names is exported by one of the binaries.
            let exported = check(
                &[
                    "exprs",
                    "--exported",
                    &worker_file.display().to_string(),
                    &operator_file.display().to_string(),
                ],
                Duration::from_secs(120),
            )
            .and_then(|out| {
                if out.contains("every referenced metric is exported") {
                    Ok(out)
                } else {
                    Err(format!("exprs checked no exported names:\n{out}"))
                }
            });
            // The alerts' promtool unit tests.
            let rules = check(&["rules"], Duration::from_secs(120));
            // A real Prometheus finds data for every serving and operator panel.
            let targets = format!("{},127.0.0.1:{}", worker.addr, op.port);
            let scraped = check(
                &["prometheus", "--targets", &targets],
                Duration::from_secs(180),
            );
            let failed: Vec<String> = [exported, rules, scraped]
                .into_iter()
                .filter_map(Result::err)
                .collect();
            assert!(
                failed.is_empty(),
                "{}\nworker /metrics:\n{worker_text}\noperator /metrics:\n{operator_text}",
                failed.join("\n")
            );
        });
    })
    .await;
}
