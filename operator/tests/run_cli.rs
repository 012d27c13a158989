//! `whaleflux run` as a user runs it: the real binary starting real `whaleflux-worker`
//! processes on the real SmolLM2 file, answering HTTP completions, restarting the group when a
//! worker is killed, re-planning it onto the GPUs that remain when one fails (a fake NVML),
//! and stopping cleanly on SIGTERM; and its errors for bad input.
//!
//! Needs `WHALEFLUX_TEST_MODEL` (`scripts/fetch-model.sh` prints the path) and the worker binary
//! beside `whaleflux` (`cargo build -p whaleflux-worker`; `cargo nextest run --workspace` builds
//! it).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Run, free_port, model, output_within, whaleflux};

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/smollm2-local.yaml"
);

/// Live (not zombie) processes whose parent is `parent`, from /proc.
fn children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(-1);
        if ppid == parent && state != "Z" {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started (or its child); no memory is touched.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A greedy completion through the group's API; the generated text.
fn complete(port: u16, prompt: &str) -> String {
    common::complete(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), prompt, 6)
}

/// Serve, answer, lose a worker, restart, answer again, stop on SIGTERM: `args` pick the split.
fn serve_restart_stop(args: &[&str], workers: usize) {
    let model = model();
    let port = free_port();
    let port_s = port.to_string();
    let mut all = vec![
        "-f",
        EXAMPLE,
        "--devices",
        "cpu",
        "--port",
        &port_s,
        "--model",
        model.to_str().expect("UTF-8 path"),
    ];
    all.extend_from_slice(args);
    let mut run = Run::start(&all);
    let line = run.wait_for(&["Serving smollm2-135m at"], Duration::from_secs(300));
    assert!(
        line.contains(&format!("http://127.0.0.1:{port}/v1")),
        "{line}"
    );
    run.wait_for(&["curl http://127.0.0.1:"], Duration::from_secs(5));

    let text = complete(port, "The capital of France is");
    assert!(text.starts_with(" Paris"), "{text:?}");

    let before = children(run.pid());
    assert_eq!(before.len(), workers, "worker processes: {before:?}");
    let victim = *before.last().expect("a worker");
    signal(victim, libc::SIGKILL);
    let line = run.wait_for(&["restarting the group"], Duration::from_secs(30));
    assert!(line.contains(&format!("(pid {victim})")), "{line}");
    assert!(line.contains("SIGKILL"), "{line}");
    run.wait_for(&["serving again at"], Duration::from_secs(300));
    let after = children(run.pid());
    assert_eq!(
        after.len(),
        workers,
        "worker processes after restart: {after:?}"
    );
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    let text = complete(port, "The capital of France is");
    assert!(text.starts_with(" Paris"), "after restart: {text:?}");

    signal(run.pid(), libc::SIGTERM);
    let status = run.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "output:\n{}", run.seen.join("\n"));
    assert!(
        run.seen
            .iter()
            .any(|l| l.contains("all worker processes stopped")),
        "{}",
        run.seen.join("\n")
    );
    for pid in before.iter().chain(&after) {
        assert!(!alive(*pid), "worker {pid} outlived whaleflux run");
    }
}

/// The args of a one-process run of the example on `port`.
fn one_rank(model: &str, port: &str) -> Vec<String> {
    [
        "-f",
        EXAMPLE,
        "--devices",
        "cpu",
        "--port",
        port,
        "--model",
        model,
        "--tensor-parallel",
        "1",
        "--pipeline-parallel",
        "1",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until none of `pids` is alive, failing after `limit`.
fn all_gone(pids: &[i32], limit: Duration, what: &str) {
    let t = std::time::Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            t.elapsed() < limit,
            "{what}: {pids:?} still alive after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A second Ctrl-C exits at once (code 130) even while the workers take their time to stop, and
/// the workers die with `whaleflux run`.
#[test]
fn a_second_ctrl_c_exits_at_once_and_the_workers_go_with_it() {
    let model = model();
    let port = free_port().to_string();
    // A worker that ignores SIGTERM (the disposition survives exec), so the first Ctrl-C's
    // stop waits out the grace period instead of finishing at once.
    let dir = std::env::temp_dir().join(format!("wf-run-ctrlc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let wrapper = dir.join("slow-to-stop-worker");
    let real = common::worker_binary();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ntrap '' TERM\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .expect("wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let args = one_rank(model.to_str().expect("UTF-8 path"), &port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut run = Run::start_with(
        &args,
        &std::env::temp_dir(),
        &[("WHALEFLUX_WORKER_BIN", wrapper.to_str().expect("path"))],
    );
    run.wait_for(&["Serving smollm2-135m at"], Duration::from_secs(300));
    let workers = children(run.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    signal(run.pid(), libc::SIGINT);
    // The first Ctrl-C starts the stop: SIGTERM to the workers, which ignore it, so it waits.
    run.wait_for(
        &["shutting down: stopping 1 worker"],
        Duration::from_secs(10),
    );
    assert!(alive(run.pid()), "the first Ctrl-C waits for the workers");
    let t = std::time::Instant::now();
    signal(run.pid(), libc::SIGINT);
    let status = run.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(130), "{}", run.seen.join("\n"));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the second Ctrl-C exits at once"
    );
    all_gone(
        &workers,
        Duration::from_secs(5),
        "workers after the second Ctrl-C",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGKILL gives `whaleflux run` no chance to clean up: its workers die anyway (the kernel kills
/// them with their parent).
#[test]
fn workers_die_when_whaleflux_run_is_sigkilled() {
    let model = model();
    let port = free_port().to_string();
    let args = one_rank(model.to_str().expect("UTF-8 path"), &port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut run = Run::start(&args);
    run.wait_for(&["Serving smollm2-135m at"], Duration::from_secs(300));
    let workers = children(run.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    signal(run.pid(), libc::SIGKILL);
    let _ = run.wait_exit(Duration::from_secs(5));
    all_gone(&workers, Duration::from_secs(5), "workers after SIGKILL");
}

#[test]
fn single_rank_serves_restarts_a_killed_worker_and_stops_on_sigterm() {
    serve_restart_stop(
        &[
            "--tensor-parallel",
            "1",
            "--pipeline-parallel",
            "1",
            "--threads",
            "2",
        ],
        1,
    );
}

/// The example's sharded plan, tensor parallel 3 x pipeline parallel 2: one process per stage
/// with its TP ranks as threads.
#[test]
fn sharded_tp3_pp2_with_tp_threads_serves_restarts_and_stops() {
    serve_restart_stop(&["--tp-mode", "threads"], 2);
}

/// The same plan with every TP rank its own process (all-reduce over loopback TCP).
#[test]
fn sharded_tp3_pp2_with_tp_processes_serves_restarts_and_stops() {
    serve_restart_stop(&["--tp-mode", "processes"], 6);
}

#[test]
fn spent_restart_budget_gives_up_with_an_error() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("wf-run-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let manifest = dir.join("budget0.yaml");
    let text = std::fs::read_to_string(EXAMPLE)
        .expect("example")
        .replace("restartBudget: 3", "restartBudget: 0");
    assert!(text.contains("restartBudget: 0"));
    std::fs::write(&manifest, text).expect("write");
    let port = free_port().to_string();
    let mut run = Run::start_in(
        &[
            "-f",
            manifest.to_str().expect("UTF-8"),
            "--devices",
            "cpu",
            "--tensor-parallel",
            "1",
            "--pipeline-parallel",
            "1",
            "--port",
            &port,
            "--model",
            model.to_str().expect("UTF-8"),
        ],
        &dir,
    );
    run.wait_for(&["Serving smollm2-135m"], Duration::from_secs(300));
    let workers = children(run.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    signal(workers[0], libc::SIGKILL);
    let status = run.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", run.seen.join("\n"));
    let all = run.seen.join("\n");
    assert!(
        all.contains(
            "restart budget of 0 group restart(s) per hour (spec.failover.restartBudget) is spent"
        ),
        "{all}"
    );
    assert!(!alive(workers[0]));
    // The worker logs are kept for a look, in the run folder under TMPDIR.
    let kept = format!(
        "worker logs kept in {}",
        dir.join("whaleflux-run-").display()
    );
    assert!(all.contains(&kept), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// On GPUs (three fake H100s through the fake NVML, loaded by `whaleflux run` and its workers
/// through the ordinary library option): each rank watches only the GPUs it was given; an XID
/// 79 on a GPU of the group stops its rank, and the group is planned again on the GPUs that
/// remain and answers again; once too few remain for the fixed split, `whaleflux run` says
/// which GPUs failed and exits 1.
#[test]
fn a_gpu_fault_replans_the_group_onto_the_gpus_that_remain() {
    use whaleflux_e2e::fake_nvml::{self, FakeNode, STATE_ENV};

    let model = model();
    let dir = std::env::temp_dir().join(format!("wf-run-gpu-fault-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let library = fake_nvml::build(&dir).expect("the fake NVML builds");
    let state = dir.join("node.state");
    let mut node = FakeNode::h100s(3);
    node.write(&state).expect("state");
    let uuid = |i: usize| node.gpus[i].uuid.clone();
    let (gpu0, gpu1, gpu2) = (uuid(0), uuid(1), uuid(2));
    let port = free_port();
    let port_s = port.to_string();
    let mut run = Run::start_with(
        &[
            "-f",
            EXAMPLE,
            "--devices",
            "gpu",
            "--tensor-parallel",
            "1",
            "--pipeline-parallel",
            "2",
            "--port",
            &port_s,
            "--model",
            model.to_str().expect("UTF-8"),
        ],
        &dir,
        &[
            ("WHALEFLUX_NVML_LIBRARY", library.to_str().expect("UTF-8")),
            (STATE_ENV, state.to_str().expect("UTF-8")),
        ],
    );
    run.wait_for(&["Serving smollm2-135m"], Duration::from_secs(300));
    let all = run.seen.join("\n");
    assert!(
        all.contains(&format!("stage 0 on {gpu0}")) && all.contains(&format!("stage 1 on {gpu1}")),
        "the stages take the first two GPUs:\n{all}"
    );
    assert!(complete(port, "The capital of France is").starts_with(" Paris"));

    // GPU 0 falls off the bus: stage 0 stops, the group moves to GPUs 1 and 2.
    node.xids.push((0, 79));
    node.write(&state).expect("state");
    let line = run.wait_for(
        &["planning the group again without that GPU"],
        Duration::from_secs(30),
    );
    assert!(
        line.contains("stage 0") && line.contains(&gpu0) && line.contains("xid_79"),
        "{line}"
    );
    let line = run.wait_for(&["stage 0 on "], Duration::from_secs(30));
    assert!(line.ends_with(&gpu1), "{line}");
    let line = run.wait_for(&["stage 1 on "], Duration::from_secs(5));
    assert!(line.ends_with(&gpu2), "{line}");
    run.wait_for(&["serving again at"], Duration::from_secs(300));
    assert!(
        complete(port, "The capital of France is").starts_with(" Paris"),
        "after the re-plan"
    );

    // A fault on GPU 0 again is no longer the group's business; one on GPU 2 leaves a single
    // GPU for a fixed two-stage split.
    node.xids.push((0, 79));
    node.xids.push((2, 48));
    node.write(&state).expect("state");
    let status = run.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", run.seen.join("\n"));
    let all = run.seen.join("\n");
    assert!(
        all.contains(&format!(
            "GPU(s) {gpu0}, {gpu2} failed, and no plan fits the 1 GPU(s) that remain"
        )),
        "{all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_that_fails_to_start_is_reported_with_its_log() {
    let dir = std::env::temp_dir().join(format!("wf-run-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("not-a-model.gguf");
    std::fs::write(&bad, b"this is not a GGUF file").expect("write");
    let out = output_within(
        whaleflux()
            .args(["run", "-f", EXAMPLE, "--devices", "cpu"])
            .args(["--tensor-parallel", "1", "--pipeline-parallel", "1"])
            .args(["--port", &free_port().to_string(), "--model"])
            .arg(&bad)
            .env("TMPDIR", &dir),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stage 0 (pid") && stderr.contains("while the group was starting"),
        "{stderr}"
    );
    // The worker's own complaint is quoted from its log.
    assert!(stderr.contains("    | "), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_model_file_names_the_fetch_script() {
    let out = output_within(
        whaleflux()
            .args(["run", "-f", EXAMPLE, "--devices", "cpu"])
            .args(["--model", "/nonexistent/SmolLM2.gguf"]),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("model file /nonexistent/SmolLM2.gguf (from --model) does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("scripts/fetch-model.sh"), "{stderr}");

    // Without --model or WHALEFLUX_MODEL the manifest's placeholder path is named.
    let out = output_within(
        whaleflux().args(["run", "-f", EXAMPLE, "--devices", "cpu"]),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "/models/SmolLM2-135M-Instruct.Q4_1.gguf (from spec.model.weights.source.path"
        ),
        "{stderr}"
    );
}

#[test]
fn illegal_tensor_parallel_is_the_planners_error_with_exit_2() {
    let out = output_within(
        whaleflux()
            .args(["run", "-f", EXAMPLE, "--devices", "cpu"])
            .args(["--tensor-parallel", "2"]),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: smollm2-135m: tensor parallel 2 does not divide the 9 attention heads; legal: 1, 3"
        ),
        "{stderr}"
    );
    // The CPU fallback is said in a log line before planning.
    assert!(
        stderr.contains("no GPU found") || stderr.contains("--devices cpu; planning on"),
        "{stderr}"
    );
    assert!(stderr.contains("CPU slots of"), "{stderr}");
    let out = output_within(
        whaleflux().args(["run", "-f", EXAMPLE, "--pipeline-parallel", "31"]),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("smollm2-135m: pipeline parallel 31 is not between 1 and the 30 layers"),
        "{stderr}"
    );
}

#[test]
fn missing_worker_binary_says_how_to_get_it() {
    let model = model();
    let out = output_within(
        whaleflux()
            .args(["run", "-f", EXAMPLE, "--devices", "cpu", "--model"])
            .arg(&model)
            .env("WHALEFLUX_WORKER_BIN", "/nonexistent/whaleflux-worker"),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("WHALEFLUX_WORKER_BIN is /nonexistent/whaleflux-worker"),
        "{stderr}"
    );
}
