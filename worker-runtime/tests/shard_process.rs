//! Sharded groups as real `whaleflux-worker` processes, one per stage (TP ranks as threads) or
//! one per (stage, TP rank) over TCP, configured the way `whaleflux run` configures them: the
//! same greedy text as one process, and a dead peer takes the group down fast with its name.

mod common;

use std::time::{Duration, Instant};

use common::procs::{Group, configs, http};
use serde_json::{Value, json};

fn complete(port: u16, prompt: &str) -> String {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0})
        .to_string();
    let (status, _, body) = http(
        &format!("127.0.0.1:{port}"),
        "POST",
        "/v1/completions",
        &[],
        &body,
    )
    .expect("answer");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Prompts with no near-tie on their greedy path (see tests/shard.rs for the tolerance).
const PROMPTS: [&str; 2] = ["The capital of France is", "Once upon a time"];

fn texts_of(tp: usize, pp: usize, tp_processes: bool) -> Vec<String> {
    let cfgs = configs(tp, pp, tp_processes, 20_000);
    let api = cfgs[0].ports.http as u16;
    let g = Group::spawn(&cfgs, &format!("{tp}x{pp}{tp_processes}"), &[]);
    g.wait_ready(&cfgs);
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
    let mut g = Group::spawn(&cfgs, "dead", &[]);
    g.wait_ready(&cfgs);
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

/// A deployment that names its weights by digest (`spec.model.weights.source.sha256`): the
/// worker checks the file before loading; another file is refused with both digests named.
#[test]
fn the_weight_file_is_checked_against_its_digest() {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(common::model_path()).expect("model");
    let right: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let wrong = "ab".repeat(32);
    let mut cfgs = configs(1, 1, false, 20_000);
    cfgs[0].model.sha256 = Some(wrong.clone());
    let mut g = Group::spawn(&cfgs, "digest-wrong", &[]);
    let status = g.wait_exit(0, Duration::from_secs(60));
    assert!(!status.success(), "{}", g.log(0));
    let log = g.log(0);
    assert!(
        log.contains(&right) && log.contains(&wrong) && log.contains("sha256"),
        "the refusal names both digests:\n{log}"
    );
    drop(g);
    cfgs[0].model.sha256 = Some(right.to_uppercase());
    let g = Group::spawn(&cfgs, "digest-right", &[]);
    g.wait_ready(&cfgs);
    assert!(g.log(0).contains("SHA-256 matches"), "{}", g.log(0));
}
