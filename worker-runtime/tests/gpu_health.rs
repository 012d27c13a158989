//! GPU health as a worker reports it, through the worker's ordinary NVML library option loading
//! the fake NVML from `e2e/` (two H100s described by a state file the test rewrites): the GPU
//! families carry each GPU's values, `/healthz` says what NVML found, and faults written into
//! the file reach the metrics within a sample (an uncorrected ECC error and XID 79 are fatal
//! and latch; XID 13 is the program's and only counted; a hot GPU shows its throttling). Without NVML the worker serves and says
//! "no GPU". Needs `WHALEFLUX_TEST_MODEL` and a C compiler (`cc`).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use whaleflux_e2e::fake_nvml::{self, FakeNode};
use whaleflux_e2e::http_get;

/// A worker process on loopback, killed when dropped.
struct Worker {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Worker {
    fn start(dir: &std::path::Path, nvml: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let log = dir.join(format!("worker-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whaleflux-worker"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--threads",
                "1",
                "--ctx",
                "256",
                "--gpu-sample-seconds",
                "1",
            ])
            .arg("--model")
            .arg(common::model_path())
            .env_remove("WHALEFLUX_NVML_LIBRARY")
            .env_remove(fake_nvml::STATE_ENV)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        if let Some((library, state)) = nvml {
            cmd.arg("--nvml-library")
                .arg(library)
                .env(fake_nvml::STATE_ENV, state);
        }
        let w = Self {
            child: cmd.spawn().expect("whaleflux-worker starts"),
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        w.wait_for("/healthz answers", |w| w.get("/healthz").is_some());
        w
    }

    fn get(&self, path: &str) -> Option<String> {
        http_get(&self.addr, path)
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body)
    }

    fn metrics(&self) -> String {
        self.get("/metrics").unwrap_or_default()
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; /metrics:\n{}\nlog:\n{}",
                self.metrics(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let w = Worker::start(&dir, Some((&library, &state)));

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
    let cap = format!(
        r#"whaleflux_gpu_throttled{{gpu="1",uuid="{}",model="{}",reason="sw_power_cap"}}"#,
        node.gpus[1].uuid, node.gpus[1].name
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
    assert_eq!(faults.len(), 6, "three reasons per GPU:\n{m}");
    assert!(faults.iter().all(|l| l.ends_with(" 0")), "{m}");

    // Faults: GPU 1 reports two uncorrected ECC errors, GPU 0 runs hot with its NVLink
    // erroring; then GPU 0 falls off the bus.
    node.gpus[1].ecc_uncorrected_volatile = 2;
    node.gpus[0].temperature_c = node.gpus[0].slowdown_c + 1;
    node.gpus[0].throttle_reasons = 0x40;
    node.gpus[0].nvlinks[0].replay_errors = 7;
    node.write(&state).expect("state written");
    let fatal1 = format!(
        r#"whaleflux_gpu_fatal_fault{{gpu="1",uuid="{}",model="{}",reason="ecc_uncorrected"}}"#,
        node.gpus[1].uuid, node.gpus[1].name
    );
    w.wait_for("the ECC fault", |w| {
        value(&w.metrics(), &fatal1) == Some(1.0)
    });
    let m = w.metrics();
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_healthy{gpu1}")),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            &format!("whaleflux_gpu_ecc_uncorrected_errors_total{gpu1}")
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_healthy{gpu0}")),
        Some(1.0),
        "a hot GPU is degraded, not dead:\n{m}"
    );
    let hot = format!(
        r#"whaleflux_gpu_throttled{{gpu="0",uuid="{}",model="{}",reason="hw_thermal"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    assert_eq!(value(&m, &hot), Some(1.0), "{m}");
    let link0 = format!(
        r#"whaleflux_gpu_nvlink_errors_total{{gpu="0",uuid="{}",model="{}",link="0"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    assert_eq!(value(&m, &link0), Some(7.0), "{m}");

    // XIDs from the driver: 13 is the program's fault (counted, GPU healthy), 79 is fatal.
    node.xids.push((0, 13));
    node.write(&state).expect("state written");
    let xid13 = format!(
        r#"whaleflux_gpu_xid_errors_total{{gpu="0",uuid="{}",model="{}",xid="13"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    w.wait_for("XID 13 counted", |w| {
        value(&w.metrics(), &xid13) == Some(1.0)
    });
    assert_eq!(
        value(&w.metrics(), &format!("whaleflux_gpu_healthy{gpu0}")),
        Some(1.0),
        "an application XID leaves the GPU healthy"
    );
    node.xids.push((0, 79));
    node.write(&state).expect("state written");
    let xid79 = format!(
        r#"whaleflux_gpu_fatal_fault{{gpu="0",uuid="{}",model="{}",reason="xid_79"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    w.wait_for("XID 79 fatal", |w| value(&w.metrics(), &xid79) == Some(1.0));
    let m = w.metrics();
    assert_eq!(
        value(&m, &format!("whaleflux_gpu_healthy{gpu0}")),
        Some(0.0),
        "{m}"
    );
    assert_eq!(value(&m, &xid13), Some(1.0), "each XID counted once:\n{m}");

    node.gpus[0].lost = true;
    node.gpus[1].ecc_uncorrected_volatile = 0; // a driver reload would reset it; the fault stays
    node.write(&state).expect("state written");
    // GPU 0 now answers GPU_IS_LOST: its first fault (XID 79) stays its reason, and GPU 1's
    // ECC fault stays although NVML's count went back to 0.
    let lost0 = format!(
        r#"whaleflux_gpu_fatal_fault{{gpu="0",uuid="{}",model="{}",reason="gpu_lost"}}"#,
        node.gpus[0].uuid, node.gpus[0].name
    );
    let before = w.get("/metrics").unwrap_or_default();
    assert!(before.contains(&lost0), "{before}");
    std::thread::sleep(Duration::from_millis(2500));
    let m = w.metrics();
    assert_eq!(
        value(&m, &lost0),
        Some(0.0),
        "the first fault is the reason:\n{m}"
    );
    assert_eq!(value(&m, &xid79), Some(1.0), "{m}");
    assert_eq!(value(&m, &fatal1), Some(1.0), "faults latch:\n{m}");
    // The worker itself keeps answering (stopping the rank is the failover work's).
    assert!(w.get("/healthz").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_nvml_the_worker_serves_and_says_no_gpu() {
    let dir = scratch().join("none");
    std::fs::create_dir_all(&dir).expect("dir");
    let w = Worker::start(
        &dir,
        Some((
            &dir.join("libnvidia-ml-missing.so"),
            &dir.join("none.state"),
        )),
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
