//! GPU health as a worker reports it, through the worker's ordinary NVML library option loading
//! the fake NVML from `e2e/` (two H100s described by a state file the test rewrites): the GPU
//! families carry each GPU's values, `/healthz` says what NVML found, and faults written into
//! the file reach the metrics within a sample (a hot GPU shows its throttling, XID 13 is the
//! program's and only counted); a fatal fault (XID 79, an uncorrected ECC error, a failed row
//! remapping) stops the
//! rank with exit status 4 and the fault, naming the GPU, in its termination message. Without NVML the worker serves and says
//! "no GPU". Needs `WHALEFLUX_TEST_MODEL` and a C compiler (`cc`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::procs::{WorkerProc, streamed_completion};
use whaleflux_e2e::fake_nvml::{self, FakeNode};

/// A worker sampling its GPUs every second through the NVML `library` reading `state`, and its
/// termination message file (created empty, as the kubelet does).
fn start(dir: &Path, library: &Path, state: &Path) -> (WorkerProc, PathBuf) {
    let termination_log = dir.join(format!("termination-{}.log", common::procs::free_port()));
    std::fs::write(&termination_log, "").expect("termination log");
    let w = WorkerProc::start(
        dir,
        &[
            "--gpu-sample-seconds".as_ref(),
            "1".as_ref(),
            "--termination-log".as_ref(),
            termination_log.as_os_str(),
            "--nvml-library".as_ref(),
            library.as_os_str(),
        ],
        &[(fake_nvml::STATE_ENV, state.to_str().expect("utf-8 path"))],
    );
    (w, termination_log)
}

/// `name{gpu="i",uuid=..,model=..,key="value"}` for GPU `i` of `node`, as the worker prints it.
fn series(name: &str, node: &FakeNode, i: usize, (key, value): (&str, &str)) -> String {
    let g = &node.gpus[i];
    format!(
        r#"{name}{{gpu="{i}",uuid="{}",model="{}",{key}="{value}"}}"#,
        g.uuid, g.name
    )
}

/// The value of the first sample line starting with `series` (name and labels as printed).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wf-gpu-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn a_worker_reports_its_gpus_and_their_faults() {
    let dir = scratch();
    let library = fake_nvml::build(&dir).expect("the fake NVML builds");
    let state = dir.join("node.state");
    let mut node = FakeNode::h100s(2);
    node.gpus[1].throttle_reasons = 0x4; // a software power cap: normal operation
    node.write(&state).expect("state written");
    let (mut w, termination_log) = start(&dir, &library, &state);

    w.wait_for("both GPUs sampled", |w| {
        w.get("/healthz").is_some_and(|b| b == "ok: 2 GPU(s)")
    });
    let m = w.metrics();
    let gpu0 = format!(
        r#"{{gpu="0",uuid="{}",model="{}"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    let gpu1 = format!(
        r#"{{gpu="1",uuid="{}",model="{}"}}"#,
        node.gpus[1].uuid, node.gpus[1].name
    );
    let expect = [
        (
            "whaleflux_gpu_temperature_celsius",
            &gpu0,
            node.gpus[0].temperature_c as f64,
        ),
        (
            "whaleflux_gpu_slowdown_temperature_celsius",
            &gpu0,
            node.gpus[0].slowdown_c as f64,
        ),
        (
            "whaleflux_gpu_power_watts",
            &gpu0,
            node.gpus[0].power_mw as f64 / 1000.0,
        ),
        (
            "whaleflux_gpu_power_limit_watts",
            &gpu0,
            node.gpus[0].power_limit_mw as f64 / 1000.0,
        ),
        (
            "whaleflux_gpu_memory_used_bytes",
            &gpu0,
            node.gpus[0].memory_used as f64,
        ),
        (
            "whaleflux_gpu_memory_total_bytes",
            &gpu0,
            node.gpus[0].memory_total as f64,
        ),
        (
            "whaleflux_gpu_utilization_ratio",
            &gpu0,
            node.gpus[0].util_gpu as f64 / 100.0,
        ),
        ("whaleflux_gpu_healthy", &gpu0, 1.0),
        ("whaleflux_gpu_healthy", &gpu1, 1.0),
        ("whaleflux_gpu_ecc_uncorrected_errors_total", &gpu1, 0.0),
    ];
    for (name, labels, want) in expect {
        let series = format!("{name}{labels}");
        assert_eq!(value(&m, &series), Some(want), "{series} in\n{m}");
    }
    let cap = series(
        "whaleflux_gpu_throttled",
        &node,
        1,
        ("reason", "sw_power_cap"),
    );
    assert_eq!(value(&m, &cap), Some(1.0), "{m}");
    let links = m
        .lines()
        .filter(|l| l.starts_with("whaleflux_gpu_nvlink_errors_total{gpu=\"0\""))
        .count();
    assert_eq!(
        links,
        node.gpus[0].nvlinks.len(),
        "one series per link:\n{m}"
    );
    let faults: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("whaleflux_gpu_fatal_fault{"))
        .collect();
    assert_eq!(faults.len(), 8, "four reasons per GPU:\n{m}");
    assert!(faults.iter().all(|l| l.ends_with(" 0")), "{m}");

    // Degrading, not fatal: GPU 0 runs hot with its NVLink erroring, and reports XID 13 (the
    // program's fault). The rank keeps serving.
    node.gpus[0].temperature_c = node.gpus[0].slowdown_c + 1;
    node.gpus[0].throttle_reasons = 0x40;
    node.gpus[0].nvlinks[0].replay_errors = 7;
    node.gpus[0].pcie_replays = 3;
    node.gpus[0].retired_pages_pending = true;
    node.gpus[0].remapped_rows_correctable = 2;
    node.gpus[0].row_remap_pending = true;
    node.xids.push((0, 13));
    node.write(&state).expect("state written");
    let xid13 = series("whaleflux_gpu_xid_errors_total", &node, 0, ("xid", "13"));
    let link0 = series("whaleflux_gpu_nvlink_errors_total", &node, 0, ("link", "0"));
    w.wait_for("XID 13 and the link errors", |w| {
        let m = w.metrics();
        value(&m, &xid13) == Some(1.0) && value(&m, &link0) == Some(7.0)
    });
    let m = w.metrics();
    let hot = series(
        "whaleflux_gpu_throttled",
        &node,
        0,
        ("reason", "hw_thermal"),
    );
    assert_eq!(value(&m, &hot), Some(1.0), "{m}");
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_pcie_replays_total{gpu0}")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_retired_pages_pending{gpu0}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_row_remap_pending{gpu0}")),
        Some(1.0),
        "{m}"
    );
    let remapped = series(
        "whaleflux_gpu_remapped_rows",
        &node,
        0,
        ("cause", "correctable"),
    );
    assert_eq!(value(&m, &remapped), Some(2.0), "{m}");
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_row_remap_failure{gpu0}")),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_healthy{gpu0}")),
        Some(1.0),
        "a hot GPU, a remapping pending and an application XID are not fatal:\n{m}"
    );
    assert!(w.get("/readyz").is_some(), "still ready");

    // XID 79 (fell off the bus) is fatal: the rank stops, exit status 4, the reason naming
    // the GPU in the termination message; a streamed answer in flight ends with an error event
    // naming it, never a clean end.
    let (started, answer) = streamed_completion(&w.addr, 200, &[]);
    if started.recv_timeout(Duration::from_secs(120)).is_err() {
        let (body, _) = answer.join().expect("request thread");
        panic!("no streamed token before the fault: {body}");
    }
    node.xids.push((0, 79));
    node.write(&state).expect("state written");
    let fault_at = Instant::now();
    let (body, ended) = answer.join().expect("request thread");
    eprintln!(
        "the request in flight ended {:?} after the XID was written",
        ended.saturating_duration_since(fault_at)
    );
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let last = events.last().copied().unwrap_or_default();
    assert!(
        last.contains("\"error\"")
            && last.contains("fatal GPU fault on GPU 0")
            && last.contains("xid_79")
            && last.contains("replica_failed"),
        "the last event must be the error: {body}"
    );
    assert!(!body.contains("[DONE]"), "{body}");
    let status = w.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(4), "{}", w.log_text());
    let message = std::fs::read_to_string(&termination_log).unwrap_or_default();
    assert!(
        message.contains("GPU 0")
            && message.contains(&node.gpus[0].uuid)
            && message.contains("xid_79"),
        "termination message: {message:?}"
    );

    // Faults a sample shows, each on a fresh worker: an uncorrected ECC error on GPU 1, a
    // failed row remapping on GPU 0. The same stop, each with its own reason.
    type Fault = (usize, &'static str, fn(&mut FakeNode));
    let faults: [Fault; 2] = [
        (1, "ecc_uncorrected", |n| {
            n.gpus[1].ecc_uncorrected_volatile = 2
        }),
        (0, "row_remap_failure", |n| {
            n.gpus[0].remapped_rows_uncorrectable = 1;
            n.gpus[0].row_remap_failure = true;
        }),
    ];
    for (gpu, reason, fault) in faults {
        let mut node = FakeNode::h100s(2);
        node.write(&state).expect("state written");
        let (mut w, termination_log) = start(&dir, &library, &state);
        w.wait_for("both GPUs sampled", |w| {
            w.get("/healthz").is_some_and(|b| b == "ok: 2 GPU(s)")
        });
        fault(&mut node);
        node.write(&state).expect("state written");
        let status = w.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(4), "{reason}: {}", w.log_text());
        let message = std::fs::read_to_string(&termination_log).unwrap_or_default();
        assert!(
            message.contains(&format!("GPU {gpu}")) && message.contains(reason),
            "termination message: {message:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_nvml_the_worker_serves_and_says_no_gpu() {
    let dir = scratch().join("none");
    std::fs::create_dir_all(&dir).expect("dir");
    let (w, _) = start(
        &dir,
        &dir.join("libnvidia-ml-missing.so"),
        &dir.join("none.state"),
    );
    w.wait_for("the sampler's answer", |w| {
        w.get("/healthz")
            .is_some_and(|b| b.starts_with("ok: no GPU (NVML"))
    });
    w.wait_for("ready", |w| w.get("/readyz").is_some());
    let m = w.metrics();
    assert!(!m.contains("whaleflux_gpu_temperature_celsius{"), "{m}");
    assert!(m.contains("whaleflux_worker_requests"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}
