//! Helpers shared by the operator tests: planner requests and checks, and the real
//! `whaleflux` and worker binaries run as processes.
#![allow(dead_code)]

use std::env;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{InterNodeNetwork, Objective, Plan, WeightDtype};
use whaleflux_operator::planner::legality::{kv_heads_per_rank, split_layers, tp_is_legal};
use whaleflux_operator::planner::models::preset;
use whaleflux_operator::planner::{PlanRequest, Pool, Settings};

/// A fixed "now" so quarantine checks do not depend on the clock.
pub fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().expect("timestamp")
}

/// A request for a preset with the given serving limits.
pub fn request(model: &str, dtype: WeightDtype, ctx: u64, seqs: u64, replicas: u32) -> PlanRequest {
    PlanRequest {
        model: preset(model).expect("preset"),
        dtype,
        max_context: ctx,
        max_sequences: seqs,
        replicas,
        tensor_parallel: None,
        pipeline_parallel: None,
        objective: Objective::MinGpus,
        settings: Settings::default(),
    }
}

/// A pool from a `--gpus` string.
pub fn gpus(spec: &str, net: InterNodeNetwork) -> Pool {
    Pool::from_gpus_spec(spec, net).expect("gpus spec")
}

/// Reads a fixture file.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks everything a chosen plan must satisfy: legal split, contiguous even layers, memory
/// under usable, placement on usable nodes without over-committing any node's free GPUs.
pub fn assert_legal(req: &PlanRequest, pool: &Pool, plan: &Plan, now: Timestamp) {
    let m = &req.model;
    let tp = plan.tensor_parallel as u32;
    let pp = plan.pipeline_parallel as u32;
    assert!(tp_is_legal(m, tp), "illegal TP {tp}");
    assert!(pp >= 1 && pp <= m.layers, "illegal PP {pp}");
    if let Some(f) = req.tensor_parallel {
        assert_eq!(f, tp);
    }
    if let Some(f) = req.pipeline_parallel {
        assert_eq!(f, pp);
    }
    assert_eq!(
        plan.gpus_per_replica,
        plan.tensor_parallel * plan.pipeline_parallel
    );
    assert_eq!(plan.stages.len() as u32, pp);
    let ranges: Vec<[u32; 2]> = plan
        .stages
        .iter()
        .map(|s| [s.layers[0] as u32, s.layers[1] as u32])
        .collect();
    assert_eq!(ranges, split_layers(m.layers, pp));
    let sizes: Vec<u32> = ranges.iter().map(|r| r[1] - r[0]).collect();
    let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
    assert!(
        hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
        "uneven {sizes:?}"
    );
    assert!(plan.stages[0].embedding && plan.stages[pp as usize - 1].head);
    let mem = &plan.memory_per_gpu_bytes;
    assert_eq!(
        mem.total,
        mem.weights + mem.kv_cache + mem.activations + mem.overhead
    );
    assert!(mem.total <= mem.usable, "{mem:?}");
    assert!(kv_heads_per_rank(m, tp) >= 1);
    assert!(plan.estimate.decode_tokens_per_second > 0.0);
    assert!(plan.estimate.time_per_token_ms > 0.0);
    // Placement: every part of every stage of every group is a known, Ready, unquarantined
    // node, named once per stage, and the GPUs can be handed out without over-committing any
    // node (the plan records which nodes a stage uses, not how many GPUs each gives: a flow).
    assert_eq!(plan.groups.len() as u32, req.replicas);
    let free = |name: &str| -> i32 {
        let node = pool
            .nodes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("unknown node {name}"));
        assert!(node.ready, "{name} is not ready");
        assert!(
            node.quarantined_until.as_ref().is_none_or(|t| t.0 <= now),
            "{name} is quarantined"
        );
        node.allocatable.min(node.gpu_count)
    };
    let mut stages: Vec<Vec<String>> = Vec::new();
    for g in &plan.groups {
        assert_eq!(g.nodes.len() as u32, pp);
        for s in &g.nodes {
            let parts: Vec<String> = s.split('+').map(String::from).collect();
            // A stage spans nodes only in a plan that says it crosses nodes.
            assert!(parts.len() == 1 || plan.crosses_nodes, "{s}");
            let mut uniq = parts.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), parts.len(), "{s} names a node twice");
            assert!(
                parts.len() as i32 <= plan.tensor_parallel,
                "{s}: more nodes than GPUs"
            );
            stages.push(parts);
        }
    }
    if let Some(g0) = plan.groups.first() {
        let s: Vec<&str> = plan.stages.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(g0.nodes.iter().map(String::as_str).collect::<Vec<_>>(), s);
    }
    // Each part gives at least one GPU; the rest of each stage's TP is a flow to its parts.
    let mut cap: std::collections::BTreeMap<String, i32> = Default::default();
    for parts in &stages {
        for p in parts {
            *cap.entry(p.clone()).or_insert_with(|| free(p)) -= 1;
        }
    }
    for (n, c) in &cap {
        assert!(*c >= 0, "{n} over-committed");
    }
    let demand: Vec<i32> = stages
        .iter()
        .map(|p| plan.tensor_parallel - p.len() as i32)
        .collect();
    assert!(
        assignable(&stages, &demand, &cap),
        "GPUs over-committed: {:?}",
        plan.groups
    );
}

/// Whether every stage `s` can take `demand[s]` more GPUs from its nodes without any node
/// giving more than `cap` (max flow by augmenting paths; the pools in tests are small).
fn assignable(
    stages: &[Vec<String>],
    demand: &[i32],
    cap: &std::collections::BTreeMap<String, i32>,
) -> bool {
    let nodes: Vec<&String> = cap.keys().collect();
    let mut left: Vec<i32> = nodes.iter().map(|n| cap[*n]).collect();
    // flow[s][n]: GPUs stage s takes from node n beyond its first.
    let mut flow = vec![vec![0i32; nodes.len()]; stages.len()];
    let index = |name: &String| nodes.iter().position(|n| *n == name).unwrap_or(0);
    // One unit at a time: find a path stage -> node (-> stage already using it -> node)*.
    fn augment(
        s: usize,
        stages: &[Vec<usize>],
        left: &mut [i32],
        flow: &mut [Vec<i32>],
        seen: &mut [bool],
    ) -> bool {
        for &n in &stages[s] {
            if seen[n] {
                continue;
            }
            seen[n] = true;
            if left[n] > 0 {
                left[n] -= 1;
                flow[s][n] += 1;
                return true;
            }
            // Node full: move one unit of another stage off it, if that stage can go elsewhere.
            for other in 0..stages.len() {
                if flow[other][n] > 0 && augment(other, stages, left, flow, seen) {
                    flow[other][n] -= 1;
                    flow[s][n] += 1;
                    return true;
                }
            }
        }
        false
    }
    let by_index: Vec<Vec<usize>> = stages
        .iter()
        .map(|p| p.iter().map(index).collect())
        .collect();
    for (s, d) in demand.iter().enumerate() {
        for _ in 0..*d {
            let mut seen = vec![false; nodes.len()];
            if !augment(s, &by_index, &mut left, &mut flow, &mut seen) {
                return false;
            }
        }
    }
    true
}

/// Runs `cmd` to completion like `Command::output`, failing the test when it takes longer than
/// `limit` (see [`whaleflux_e2e::output_within`]).
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    whaleflux_e2e::output_within(cmd, None, limit)
}

/// The SmolLM2 GGUF the workers load, from `$WHALEFLUX_TEST_MODEL`.
pub fn model() -> PathBuf {
    whaleflux_e2e::test_model()
}

/// The worker binary beside `whaleflux` (what `whaleflux run` and the kubelet start).
pub fn worker_binary() -> PathBuf {
    let worker = Path::new(env!("CARGO_BIN_EXE_whaleflux")).with_file_name("whaleflux-worker");
    assert!(
        worker.is_file(),
        "{} is missing: build it with `cargo build -p whaleflux-worker` (cargo builds only the \
         binaries of the package under test; `cargo nextest run --workspace` builds it too)",
        worker.display()
    );
    worker
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `whaleflux` with the worker binary checked and no model or worker overrides from the
/// caller's environment.
pub fn whaleflux() -> Command {
    worker_binary();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whaleflux"));
    cmd.env_remove("WHALEFLUX_MODEL")
        .env_remove("WHALEFLUX_WORKER_BIN")
        .env("RUST_LOG", "info");
    cmd
}

/// A running `whaleflux run`: its output lines as they come, killed (with its workers, which
/// die with it) when dropped.
pub struct Run {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Run {
    /// Starts `whaleflux run ARGS`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_in(args, &env::temp_dir())
    }

    /// Starts with `tmp` as TMPDIR, where `whaleflux run` keeps its run folder.
    pub fn start_in(args: &[&str], tmp: &Path) -> Self {
        Self::start_with(args, tmp, &[])
    }

    /// Starts with `tmp` as TMPDIR and extra environment variables.
    pub fn start_with(args: &[&str], tmp: &Path, envs: &[(&str, &str)]) -> Self {
        let mut child = whaleflux()
            .arg("run")
            .args(args)
            .env("TMPDIR", tmp)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start whaleflux run");
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[whaleflux run] {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for an output line containing every one of `parts`; panics with the output so far
    /// after `timeout` or when the output ends.
    pub fn wait_for(&mut self, parts: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {parts:?} in {timeout:?}; output:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "whaleflux run ended without a line with {parts:?}; output:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Drain what is left so the output is complete.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "whaleflux run still running after {timeout:?}; output:\n{}",
                self.seen.join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A greedy completion of `prompt` from the OpenAI API at `addr`: the generated text.
pub fn complete(addr: SocketAddr, prompt: &str, max_tokens: u32) -> String {
    let body = serde_json::json!({
        "model": "smollm2-135m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    let r = whaleflux_operator::local::http::request(
        addr,
        "POST",
        "/v1/completions",
        Some(&body),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("completion request to {addr}: {e}"));
    assert_eq!(r.status, 200, "{addr}: {}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].text in {}", r.body))
        .to_string()
}

/// The request with a fixed (or free) TP, PP and an objective.
pub fn with(mut r: PlanRequest, tp: Option<u32>, pp: Option<u32>, obj: Objective) -> PlanRequest {
    r.tensor_parallel = tp;
    r.pipeline_parallel = pp;
    r.objective = obj;
    r
}

/// The estimate is rounded for display (3 decimals of ms, 1 of tokens/s) and both describe the
/// same period: tokens/s = concurrency / time per token.
pub fn assert_estimate_consistent(p: &whaleflux_crds::Plan) {
    let e = &p.estimate;
    assert_eq!(
        (e.time_per_token_ms * 1e3).round() / 1e3,
        e.time_per_token_ms
    );
    assert_eq!(
        (e.decode_tokens_per_second * 10.0).round() / 10.0,
        e.decode_tokens_per_second
    );
    let from_time = f64::from(e.concurrency) * 1e3 / e.time_per_token_ms;
    assert!(
        (from_time - e.decode_tokens_per_second).abs() / e.decode_tokens_per_second < 1e-3,
        "{e:?}"
    );
}
