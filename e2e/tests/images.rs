//! The container images: `scripts/build-images.sh` builds the operator and worker images from
//! the debug binaries without a Docker daemon into OCI archives; each test unpacks its archive as
//! a container runtime would (digests checked, layers extracted in order, the config read) and
//! runs the image's entrypoint from the image's own root file system, as the image's non-root
//! user, as PID 1 of a new PID namespace, with the config's environment and working directory.
//! The worker answers /healthz and /readyz with the model bind-mounted read-only and generates
//! a completion; the operator prints its version, and serves against the in-memory API server
//! until SIGTERM to its PID 1 stops it; the CUDA worker variant asks the NVIDIA runtime for the
//! GPUs.
//!
//! Needs root (namespaces, chroot, bind mounts), `unshare` from util-linux, buildah or umoci
//! (the script installs one with apt-get when neither is there), the binaries `whaleflux` and
//! `whaleflux-worker` beside `whaleflux-e2e` (`cargo nextest run --workspace` builds them), and
//! `WHALEFLUX_TEST_MODEL` (`scripts/fetch-model.sh` prints the path).

use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use whaleflux_e2e::{http_get, output_within};

/// How long building one image may take (two cores; it takes seconds).
const BUILD_LIMIT: Duration = Duration::from_secs(180);
/// How long the worker may take to load the model and answer /healthz.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// How long PID 1 may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);

mod oci;

use oci::*;

#[test]
fn worker_image_serves_the_model_as_non_root_pid_1() {
    require_root();
    let model = whaleflux_e2e::test_model();
    let tmp = TempDir::new("worker");
    let archive = build_image(
        &tmp.0.join("out"),
        &["--only", "worker"],
        "whaleflux-worker.oci.tar",
    );
    eprintln!(
        "worker image: {:.1} MiB",
        fs::metadata(&archive).expect("archive").len() as f64 / 1048576.0
    );
    let image = Image::unpack(&archive, &tmp.0.join("worker"));
    assert_eq!(
        image.ref_name,
        format!("whaleflux-worker:{}", env!("CARGO_PKG_VERSION"))
    );
    image.check_common("whaleflux-worker");
    assert_eq!(
        image.strings("Entrypoint"),
        ["/usr/local/bin/whaleflux-worker"]
    );
    assert!(
        image.config["ExposedPorts"]["8000/tcp"].is_object(),
        "the worker exposes 8000/tcp: {}",
        image.config
    );
    assert_eq!(image.label("io.whaleflux.variant"), "cpu");
    let (uid, gid) = image.user();

    // The model as a read-only volume, as the operator mounts it (hostPath or PVC).
    let name = model
        .file_name()
        .expect("model file name")
        .to_string_lossy();
    let in_image = format!("/models/{name}");
    let port = free_port();
    let port_arg = port.to_string();
    let log = tmp.0.join("worker.log");
    let cmd = image.command(
        &[
            "serve",
            "--model",
            &in_image,
            "--host",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--threads",
            "2",
        ],
        &[(model.as_path(), in_image.as_str())],
        &[("RUST_LOG", "info")],
    );
    let mut worker = Container::start(cmd, &log);
    let addr = format!("127.0.0.1:{port}");
    let live = worker.wait_for_200(&addr, "/healthz", READY_LIMIT);
    eprintln!("worker answered /healthz after {:.1} s", live.as_secs_f64());
    // Ready once the model is loaded from the read-only mount; then it generates.
    let ready = worker.wait_for_200(&addr, "/readyz", READY_LIMIT);
    eprintln!("worker answered /readyz after {:.1} s", ready.as_secs_f64());
    let (code, models) = http_get(&addr, "/v1/models").expect("/v1/models answers");
    assert_eq!(code, 200, "/v1/models: {models}");
    let models: Value = serde_json::from_str(&models).expect("/v1/models is JSON");
    let served = models["data"][0]["id"].as_str().expect("a served model");
    let request = serde_json::json!({
        "model": served,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let (code, answer) = http_post(&addr, "/v1/chat/completions", &request.to_string());
    assert_eq!(code, 200, "chat completion: {answer}");
    let answer: Value = serde_json::from_str(&answer).expect("completion is JSON");
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "the worker generated tokens: {answer}"
    );
    let pid = worker.pid1("whaleflux-worker");
    worker.assert_pid1_as(pid, uid, gid);
    // The model is mounted read-only where the worker read it (mountinfo: the mount point is
    // field 5, relative to the process's root; the mount's options field 6).
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    assert!(
        mountinfo.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&in_image.as_str())
                && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))
        }),
        "{in_image} is a read-only mount in the container:\n{mountinfo}"
    );
    let (code, body) = http_get(&addr, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "/metrics: {body}");
    assert!(
        body.contains("whaleflux_worker_requests_total"),
        "worker metrics are exported:\n{body}"
    );

    worker.signal(pid, libc::SIGTERM);
    // A process that is PID 1 of its PID namespace gets only the signals it handles: the
    // worker must stop on the kubelet's SIGTERM by itself.
    let status = worker.wait_for_exit(STOP_LIMIT).unwrap_or_else(|| {
        panic!(
            "the worker, PID 1 of its container, did not exit within {STOP_LIMIT:?} of \
             SIGTERM:\n{}",
            worker.log()
        )
    });
    eprintln!("worker exited on SIGTERM: {status}");
    assert!(
        status.success(),
        "the worker exits 0 on SIGTERM, not {status}:\n{}",
        worker.log()
    );
}

#[test]
fn operator_image_runs_as_non_root_pid_1_and_stops_on_sigterm() {
    require_root();
    let tmp = TempDir::new("operator");
    let archive = build_image(
        &tmp.0.join("out"),
        &["--only", "operator"],
        "whaleflux-operator.oci.tar",
    );
    eprintln!(
        "operator image: {:.1} MiB",
        fs::metadata(&archive).expect("archive").len() as f64 / 1048576.0
    );
    let image = Image::unpack(&archive, &tmp.0.join("operator"));
    assert_eq!(
        image.ref_name,
        format!("whaleflux-operator:{}", env!("CARGO_PKG_VERSION"))
    );
    image.check_common("whaleflux-operator");
    assert_eq!(image.strings("Entrypoint"), ["/usr/local/bin/whaleflux"]);
    assert_eq!(image.strings("Cmd"), ["operator"]);
    assert!(
        image.config["ExposedPorts"]["8080/tcp"].is_object(),
        "the operator exposes its metrics port 8080/tcp: {}",
        image.config
    );
    assert!(
        image
            .rootfs
            .join("etc/ssl/certs/ca-certificates.crt")
            .is_file()
            || !Path::new("/etc/ssl/certs/ca-certificates.crt").is_file(),
        "the host's CA certificates are in the image"
    );
    let (uid, gid) = image.user();

    // `whaleflux --version` from the image's root file system, as its user.
    let out = output_within(
        &mut image.command(&["--version"], &[], &[]),
        None,
        Duration::from_secs(60),
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "whaleflux --version in the image failed ({}):\n{printed}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        printed.trim(),
        format!("whaleflux {}", env!("CARGO_PKG_VERSION")),
        "whaleflux --version"
    );

    // The operator against the in-memory API server (its kubeconfig mounted read-only, as a
    // service account token would be): serving /healthz, then SIGTERM to PID 1 stops it.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let server = rt
        .block_on(whaleflux_e2e::ApiServer::start())
        .expect("API server starts");
    let kubeconfig = tmp.0.join("kubeconfig");
    fs::write(&kubeconfig, whaleflux_e2e::kubeconfig_yaml(server.addr())).expect("kubeconfig");
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let log = tmp.0.join("operator.log");
    let cmd = image.command(
        &[
            "operator",
            "--metrics-addr",
            &metrics_addr,
            "--lease-namespace",
            "default",
        ],
        &[(kubeconfig.as_path(), "/var/run/whaleflux/kubeconfig")],
        &[
            ("KUBECONFIG", "/var/run/whaleflux/kubeconfig"),
            ("RUST_LOG", "info"),
        ],
    );
    let mut operator = Container::start(cmd, &log);
    let ready = operator.wait_for_200(&metrics_addr, "/healthz", READY_LIMIT);
    eprintln!(
        "operator answered /healthz after {:.1} s",
        ready.as_secs_f64()
    );
    let pid = operator.pid1("whaleflux");
    operator.assert_pid1_as(pid, uid, gid);
    operator.signal(pid, libc::SIGTERM);
    let status = operator.wait_for_exit(STOP_LIMIT).unwrap_or_else(|| {
        panic!(
            "the operator, PID 1 of its container, did not exit within {STOP_LIMIT:?} of \
             SIGTERM:\n{}",
            operator.log()
        )
    });
    assert!(
        status.success(),
        "the operator exits 0 on SIGTERM, not {status}:\n{}",
        operator.log()
    );
    drop(server);
}

#[test]
fn cuda_worker_variant_asks_the_nvidia_runtime_for_the_gpus() {
    require_root();
    let tmp = TempDir::new("cuda");
    let archive = build_image(
        &tmp.0.join("out"),
        &["--only", "worker", "--variant", "cuda"],
        "whaleflux-worker-cuda.oci.tar",
    );
    let image = Image::unpack(&archive, &tmp.0.join("worker-cuda"));
    assert_eq!(
        image.ref_name,
        format!("whaleflux-worker:{}-cuda", env!("CARGO_PKG_VERSION"))
    );
    image.check_common("whaleflux-worker");
    assert_eq!(image.label("io.whaleflux.variant"), "cuda");
    let env = image.env();
    for (key, value) in [
        ("NVIDIA_VISIBLE_DEVICES", "all"),
        ("NVIDIA_DRIVER_CAPABILITIES", "compute,utility"),
    ] {
        assert!(
            env.iter().any(|(k, v)| k == key && v == value),
            "{key}={value} in the CUDA image's Env: {env:?}"
        );
    }
}
