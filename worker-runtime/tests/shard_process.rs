//! Sharded groups as real `whaleflux-worker` processes, one per stage (TP ranks as threads) or
//! one per (stage, TP rank) over TCP, configured the way `whaleflux run` configures them: the
//! same greedy text as one process, and a dead peer takes the group down fast with its name.

mod common;

use std::time::{Duration, Instant};

use common::procs::{GROUP_SECRET, Group, configs, http};
use serde_json::{Value, json};
use whaleflux_worker::bringup::group_digest;
use whaleflux_worker::comm::tcp::{self, PeerEndpoint, TcpOptions};
use whaleflux_worker::comm::{Link, Msg, RankId};

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

/// A rank other than the API rank is Ready only once its whole group has formed: stage 1's
/// three TP processes load and connect to each other, but stay 503 (saying why) while stage
/// 0 is missing; once stage 0 starts, all six are Ready.
#[test]
fn a_rank_is_ready_only_once_its_whole_group_has_formed() {
    let cfgs = configs(3, 2, true, 60_000);
    // Stage-major: 0..3 are stage 0's TP ranks, 3..6 stage 1's.
    let mut g = Group::spawn_only(&cfgs, "formed", &[], &[3, 4, 5]);
    let t = Instant::now();
    while !g.log(4).contains("rank connected and loaded") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stage 1 TP rank 1 did not connect to its TP peers:\n{}",
            g.log(4)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr = format!("127.0.0.1:{}", cfgs[4].ports.http);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (code, _, body) = http(&addr, "GET", "/readyz", &[], "").expect("readyz");
        assert_eq!(code, 503, "Ready before stage 0 exists: {body}");
        assert!(
            body.contains("waiting for the whole group to form"),
            "{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stage 1's TP rank 0 has loaded but cannot reach stage 0: started (the startup probe
    // passes, so liveness may begin), not ready, and it says which.
    while !g.log(3).contains("shard loaded") {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", g.log(3));
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr = format!("127.0.0.1:{}", cfgs[3].ports.http);
    let (code, _, body) = http(&addr, "GET", "/startupz", &[], "").expect("startupz");
    assert!(
        code == 200 && body.starts_with("loaded: ") && body.contains(" bytes of weights in "),
        "{code} {body}"
    );
    let (code, _, body) = http(&addr, "GET", "/readyz", &[], "").expect("readyz");
    assert_eq!(
        (code, body.as_str()),
        (503, "loaded; connecting to its peers")
    );
    g.spawn_more(&cfgs, &[], &[0, 1, 2]);
    g.wait_ready(&cfgs);
}

/// A peer whose transport still heartbeats but whose engine never answers a step: the API
/// rank fails the group within the peer timeout, naming it, rather than holding the request.
/// The test plays stage 1 with the real transport (handshake, tagged frames, heartbeats) and
/// an engine that swallows every step.
#[test]
fn a_peer_that_heartbeats_but_never_answers_fails_the_group_within_the_timeout() {
    let mut cfgs = configs(1, 2, false, 2_000);
    for c in &mut cfgs {
        c.formation_timeout_ms = 60_000;
    }
    let mut g = Group::spawn_only(&cfgs, "stuck", &[], &[0]);
    let (c0, c1) = (&cfgs[0], &cfgs[1]);
    let opts = TcpOptions {
        group: c1.group,
        secret: GROUP_SECRET.as_bytes().to_vec(),
        timeout: Duration::from_millis(c1.peer_timeout_ms as u64),
        on_fail: None,
        connect_by: Some(Instant::now() + Duration::from_secs(60)),
        config_digest: group_digest(c1),
    };
    let stage0 = RankId {
        stage: 0,
        tp_rank: 0,
    };
    let listener = tcp::listen_on("127.0.0.1", c1.ports.peer as u16).expect("peer port");
    let endpoint = PeerEndpoint {
        id: stage0,
        host: "127.0.0.1".into(),
        port: c0.ports.peer as u16,
    };
    let me = RankId {
        stage: 1,
        tp_rank: 0,
    };
    let conns = tcp::connect(me, listener, &[endpoint], &opts).expect("joined stage 0");
    let link = conns[&stage0].clone();
    link.send(&Msg::Ready).expect("ready");
    let swallow = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Ok(m) = link.recv() {
            got.push(m.kind());
        }
        got
    });
    g.wait_ready(&cfgs[..1]);
    let t = Instant::now();
    let body = json!({"model": "smollm2", "prompt": "Hello", "max_tokens": 4}).to_string();
    let answer = http(
        &format!("127.0.0.1:{}", c0.ports.http),
        "POST",
        "/v1/completions",
        &[],
        &body,
    );
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the request was held {took:?} (peer timeout 2 s)"
    );
    assert!(
        answer.as_ref().is_none_or(|a| a.0 >= 500),
        "a stuck group answered {answer:?}"
    );
    let status = g.wait_exit(0, Duration::from_secs(10));
    assert!(!status.success(), "stage 0 must exit non-zero");
    let log = g.log(0);
    assert!(
        log.contains("stage 1 TP rank 0") && log.contains("answered nothing for 2000 ms"),
        "stage 0 must name the stuck peer:\n{log}"
    );
    let got = swallow.join().expect("stage 1");
    assert!(got.starts_with(&["formed", "step"]), "{got:?}");
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
