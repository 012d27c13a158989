//! Sharded groups as real `whaleflux-worker` processes, one per stage (TP ranks as threads) or
//! one per (stage, TP rank) over TCP, configured the way `whaleflux run` configures them: the
//! same greedy text as one process, and a dead peer takes the group down fast with its name.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use whaleflux_crds::{PeerAddress, WorkerConfig, WorkerModel, WorkerPorts, WorkerServing};
use whaleflux_worker::shard::fixed_plan;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Every process's config of a `tp` x `pp` group: stage-major, one per TP rank when
/// `tp_processes`, else one per stage (as `local_ranks` + `for_local_process` lay them out).
fn configs(tp: usize, pp: usize, tp_processes: bool, timeout_ms: i64) -> Vec<WorkerConfig> {
    let plan = fixed_plan("smollm2-135m", 30, tp, pp);
    let ranks: Vec<(i32, Option<i32>)> = (0..pp as i32)
        .flat_map(|s| {
            let rs: Vec<Option<i32>> = if tp_processes {
                (0..tp as i32).map(Some).collect()
            } else {
                vec![None]
            };
            rs.into_iter().map(move |r| (s, r))
        })
        .collect();
    let peers: Vec<PeerAddress> = ranks
        .iter()
        .map(|&(stage, tp_rank)| PeerAddress {
            stage,
            tp_rank,
            host: "127.0.0.1".into(),
            port: i32::from(free_port()),
        })
        .collect();
    ranks
        .iter()
        .zip(&peers)
        .map(|(&(stage, tp_rank), p)| WorkerConfig {
            deployment: "smollm2".into(),
            model: WorkerModel {
                path: common::model_path().display().to_string(),
                served_name: "smollm2".into(),
            },
            plan: plan.clone(),
            group: 0,
            stage: Some(stage),
            tp_rank,
            peers: peers.clone(),
            ports: WorkerPorts {
                http: i32::from(free_port()),
                peer: p.port,
            },
            serving: WorkerServing {
                max_context_length: 512,
                max_concurrent_sequences: 4,
                max_queue: 16,
            },
            threads: 1,
            peer_timeout_ms: timeout_ms,
            formation_timeout_ms: timeout_ms,
        })
        .collect()
}

struct Group {
    procs: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Group {
    /// What worker `i` has logged so far.
    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("worker-{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(cfgs: &[WorkerConfig], name: &str) -> Group {
    let dir = std::env::temp_dir().join(format!("wf-shard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let procs = cfgs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let f = dir.join(format!("worker-{i}.json"));
            std::fs::write(&f, serde_json::to_vec(c).expect("json")).expect("write");
            // Logs go to a file: a pipe nobody reads while the worker runs would fill and block it.
            let log = std::fs::File::create(dir.join(format!("worker-{i}.log"))).expect("log");
            Command::new(env!("CARGO_BIN_EXE_whaleflux-worker"))
                .args(["serve", "--host", "127.0.0.1", "--config"])
                .arg(&f)
                .env("WHALEFLUX_GROUP_SECRET", "test-secret")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    Group { procs, dir }
}

fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Waits until every worker of `g` is ready, showing their logs when one is not.
fn wait_group_ready(g: &Group, cfgs: &[WorkerConfig]) {
    for (i, c) in cfgs.iter().enumerate() {
        let port = c.ports.http as u16;
        let t = Instant::now();
        while http(port, "GET", "/readyz", "").map(|r| r.0) != Some(200) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "worker {i} (port {port}) not ready within 60 s; its log:\n{}",
                g.log(i)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn complete(port: u16, prompt: &str) -> String {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        .to_string();
    let (status, body) = http(port, "POST", "/v1/completions", &body).expect("answer");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Prompts with no near-tie on their greedy path (see tests/shard.rs for the tolerance).
const PROMPTS: [&str; 2] = ["The capital of France is", "Once upon a time"];

fn texts_of(tp: usize, pp: usize, tp_processes: bool) -> Vec<String> {
    let cfgs = configs(tp, pp, tp_processes, 20_000);
    let api = cfgs[0].ports.http as u16;
    let g = spawn(&cfgs, &format!("{tp}x{pp}{tp_processes}"));
    wait_group_ready(&g, &cfgs);
    let out = PROMPTS.iter().map(|p| complete(api, p)).collect();
    drop(g);
    out
}

#[test]
fn sharded_groups_of_processes_answer_like_one_process() {
    let want = texts_of(1, 1, false);
    assert!(want[0].contains("Paris"), "{want:?}");
    // Each stage a process with its TP ranks as threads (a pod), then every TP rank a process.
    assert_eq!(texts_of(3, 2, false), want, "TP=3 (threads) x PP=2");
    assert_eq!(texts_of(3, 2, true), want, "TP=3 (processes) x PP=2");
}

#[test]
fn a_dead_peer_makes_the_others_exit_naming_it() {
    let cfgs = configs(1, 3, false, 3_000);
    let mut g = spawn(&cfgs, "dead");
    wait_group_ready(&g, &cfgs);
    g.procs[2].kill().expect("kill stage 2");
    let t = Instant::now();
    for i in 0..2 {
        let p = &mut g.procs[i];
        let status = loop {
            if let Some(s) = p.try_wait().expect("wait") {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "stage {i} still runs 10 s after its peer died"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "stage {i} must exit non-zero");
        let err = g.log(i);
        // The failure line itself must name the stage that died, however this stage learnt
        // of it (its own link to stage 2, or stage 0's abort carrying stage 0's reason).
        let line = err
            .lines()
            .find(|l| l.starts_with("whaleflux-worker: the replica group failed: "))
            .unwrap_or_else(|| panic!("stage {i} printed no failure line:\n{err}"));
        assert!(
            line.contains("stage 2 TP rank 0"),
            "stage {i} must name the dead stage 2: {line}"
        );
    }
}
