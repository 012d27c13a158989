//! A test cluster for the operator: the in-memory API server and process kubelet from `e2e/`,
//! the real `whaleflux operator` binary authenticated as its service account, and the real
//! `kubectl`.
#![allow(dead_code)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource, ResourceExt};
use whaleflux_e2e::fake_nvml::{self, FakeNode};
pub use whaleflux_e2e::http_get;
use whaleflux_e2e::{ApiServer, Kubelet, KubeletConfig, NodeSpec};

use crate::common::{free_port, model, worker_binary};

/// The operator's service account, as the API server sees it (the audit log's user).
pub const OPERATOR_USER: &str = "system:serviceaccount:whaleflux-system:whaleflux-operator";
const OPERATOR_TOKEN: &str = "whaleflux-operator-token";
/// A second operator replica's identity (leader-election tests tell the two apart by user).
pub const OPERATOR_B_USER: &str = "system:serviceaccount:whaleflux-system:whaleflux-operator-b";
const OPERATOR_B_TOKEN: &str = "whaleflux-operator-b-token";

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `test` under a time limit.
pub async fn bounded(limit: Duration, test: impl Future<Output = ()>) {
    tokio::time::timeout(limit, test)
        .await
        .expect("test timed out");
}

/// Polls `check` every 200 ms until it is true (true) or `limit` passes (false).
async fn poll<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Polls `check` until it is true or `limit` passes.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll(limit, check).await {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

/// API server, kubelet, and kubeconfigs for kubectl (admin) and the operator (its service
/// account).
pub struct Cluster {
    pub server: ApiServer,
    pub kubelet: Option<Kubelet>,
    pub operator_kubeconfig: PathBuf,
    pub operator_b_kubeconfig: PathBuf,
    dir: PathBuf,
}

/// RTX 4090 workstation nodes of the `rtx4090-pcie` example pool.
pub fn rtx_nodes(n: usize, gpus: u32) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| {
            NodeSpec::gpu(
                &format!("ws-{}", (b'a' + i as u8) as char),
                "NVIDIA-GeForce-RTX-4090",
                gpus,
            )
            .label("whaleflux.io/pool", "rtx4090")
        })
        .collect()
}

/// Each of `nodes` with its own fake NVML (one healthy H100), built into `dir`: the library
/// and a state file per node at [`nvml_state`], given to the node's containers as its runtime
/// would.
pub fn with_fake_nvml(dir: &Path, nodes: Vec<NodeSpec>) -> Vec<NodeSpec> {
    let lib = fake_nvml::build(dir).expect("the fake NVML builds");
    nodes
        .into_iter()
        .map(|n| {
            let state = nvml_state(dir, &n.name);
            FakeNode::h100s(1).write(&state).expect("fake NVML state");
            n.env("WHALEFLUX_NVML_LIBRARY", &lib.display().to_string())
                .env(fake_nvml::STATE_ENV, &state.display().to_string())
        })
        .collect()
}

/// Where [`with_fake_nvml`] keeps `node`'s fake NVML state (a test writes faults there).
pub fn nvml_state(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.nvml"))
}

impl Cluster {
    /// Starts the API server and, with `nodes`, a process kubelet running the worker binary.
    pub async fn start(nodes: Vec<NodeSpec>, run_pods: bool) -> Self {
        let server = ApiServer::builder()
            .token(OPERATOR_TOKEN, OPERATOR_USER)
            .token(OPERATOR_B_TOKEN, OPERATOR_B_USER)
            .start()
            .await
            .expect("API server starts");
        let dir = server
            .kubeconfig()
            .parent()
            .expect("kubeconfig folder")
            .to_path_buf();
        let kc = |token: &str, file: &str| {
            server
                .write_kubeconfig(token, file)
                .expect("operator kubeconfig")
        };
        let operator_kubeconfig = kc(OPERATOR_TOKEN, "operator-kubeconfig");
        let operator_b_kubeconfig = kc(OPERATOR_B_TOKEN, "operator-b-kubeconfig");
        let kubelet = if run_pods {
            Some(
                server
                    .kubelet(KubeletConfig {
                        nodes,
                        // The chart's images: the worker and the operator itself.
                        images: [
                            ("whaleflux-worker".to_string(), worker_binary()),
                            (
                                "whaleflux".to_string(),
                                PathBuf::from(env!("CARGO_BIN_EXE_whaleflux")),
                            ),
                        ]
                        .into(),
                        ..KubeletConfig::default()
                    })
                    .await
                    .expect("kubelet starts"),
            )
        } else {
            None
        };
        Self {
            server,
            kubelet,
            operator_kubeconfig,
            operator_b_kubeconfig,
            dir,
        }
    }

    /// A kube client as admin.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client")
    }

    /// A kube client as admin that does not retry 429s (an eviction refused by a disruption
    /// budget is an answer, not a hint to try again).
    pub async fn client_without_retries(&self) -> Client {
        let mut config = self.config().await;
        config.default_retry = false;
        Client::try_from(config).expect("client")
    }

    async fn config(&self) -> kube::Config {
        let kc = Kubeconfig::read_from(self.server.kubeconfig()).expect("kubeconfig parses");
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config")
    }

    /// Runs kubectl (admin) with `args`, feeding `stdin`; fails the test after 5 minutes.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        whaleflux_e2e::output_within(
            Command::new("kubectl")
                .env("KUBECONFIG", self.server.kubeconfig())
                .args(args),
            stdin,
            Duration::from_secs(300),
        )
    }

    /// kubectl that must succeed; returns its standard output.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Installs the CRDs and the RTX 4090 example pool.
    pub fn install_crds_and_pool(&self) {
        let crds = root().join("crds/manifests");
        self.kubectl_ok(&["apply", "-f", &crds.display().to_string()], None);
        let pool = root().join("examples/gpupool-rtx4090.yaml");
        self.kubectl_ok(&["apply", "-f", &pool.display().to_string()], None);
    }

    /// The smollm2 example with its weights at `$WHALEFLUX_TEST_MODEL`.
    pub fn smollm2_manifest(&self) -> String {
        let text = std::fs::read_to_string(root().join("examples/smollm2-135m.yaml"))
            .expect("example readable");
        text.replace(
            "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            &model().display().to_string(),
        )
    }

    /// Starts `whaleflux operator` as the operator's service account.
    pub fn operator(&self, name: &str, lease_seconds: u64) -> Operator {
        self.spawn_operator(name, lease_seconds, &self.operator_kubeconfig, &[])
    }

    /// Starts `whaleflux operator` with more flags.
    pub fn operator_with(&self, name: &str, lease_seconds: u64, args: &[&str]) -> Operator {
        self.spawn_operator(name, lease_seconds, &self.operator_kubeconfig, args)
    }

    /// Starts a second operator replica as [`OPERATOR_B_USER`].
    pub fn operator_b(&self, name: &str, lease_seconds: u64) -> Operator {
        self.spawn_operator(name, lease_seconds, &self.operator_b_kubeconfig, &[])
    }

    fn spawn_operator(
        &self,
        name: &str,
        lease_seconds: u64,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Operator {
        let port = free_port();
        let log = self.dir.join(format!("operator-{name}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        // The cluster admin's settings: hostPath weights from the test model's directory.
        let settings = self.dir.join(format!("operator-{name}.yaml"));
        let model_dir = model()
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        std::fs::write(&settings, format!("allowedHostPaths: [{model_dir:?}]\n"))
            .expect("operator settings");
        let mut config = vec!["--config".to_string(), settings.display().to_string()];
        if extra.contains(&"--config") {
            config.clear();
        }
        // The renew deadline and retry period scaled to the short test Leases (client-go's
        // 15/10/2 s would be refused under a 3 s Lease), unless the test sets them.
        let mut timings = vec![
            "--lease-renew-deadline-seconds".to_string(),
            (lease_seconds * 2 / 3).max(2).to_string(),
            "--lease-retry-seconds".to_string(),
            "1".to_string(),
        ];
        if extra
            .iter()
            .any(|a| a.starts_with("--lease-renew-deadline") || a.starts_with("--lease-retry"))
        {
            timings.clear();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_whaleflux"))
            .args([
                "operator",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--identity",
                name,
                "--lease-namespace",
                "default",
                "--lease-duration-seconds",
                &lease_seconds.to_string(),
            ])
            .args(&config)
            .args(&timings)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,whaleflux_operator=debug")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("whaleflux operator starts");
        Operator {
            child: Some(child),
            port,
            log,
        }
    }
}

/// A running operator process, killed when dropped.
pub struct Operator {
    child: Option<Child>,
    /// Port of /metrics, /healthz, /readyz.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status (within 20 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("operator running");
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                panic!("the operator did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path on the metrics port; (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("127.0.0.1:{}", self.port), path)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    /// What a person would look at when something hangs: objects, pods, the operator's log.
    pub fn diagnose(&self, op: &Operator) -> String {
        let mut out = String::new();
        for args in [
            &["get", "llmd", "-o", "yaml"][..],
            &["get", "gpool", "-o", "yaml"][..],
            &["get", "sts,pods", "-o", "wide"][..],
        ] {
            let o = self.kubectl(args, None);
            out.push_str(&format!(
                "$ kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        if let Some(kubelet) = &self.kubelet {
            let pods = self.kubectl(&["get", "pods", "-o", "name"], None);
            for pod in String::from_utf8_lossy(&pods.stdout).lines() {
                let name = pod.trim_start_matches("pod/");
                let log = kubelet.logs("default", name, "worker");
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                out.push_str(&format!("pod {name} log (tail):\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        let log = op.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        out.push_str("operator log (tail):\n");
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// [`eventually`], with diagnostics when it times out.
    pub async fn eventually_or_diagnose<F, Fut>(
        &self,
        op: &Operator,
        what: &str,
        limit: Duration,
        check: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        if poll(limit, check).await {
            return;
        }
        panic!(
            "timed out after {limit:?} waiting for {what}\n{}",
            self.diagnose(op)
        );
    }

    /// kubectl that must succeed, with diagnostics on failure.
    pub fn kubectl_ok_or_diagnose(&self, args: &[&str], op: &Operator) -> String {
        let out = self.kubectl(args, None);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnose(op)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Every child of the `smollm2` deployment in `default`, as kind/name, sorted; those being
/// deleted only `with_terminating`.
pub async fn smollm2_children(client: &Client, with_terminating: bool) -> Vec<String> {
    let lp = ListParams::default().labels("app.kubernetes.io/instance=smollm2");
    let mut out = Vec::new();
    macro_rules! list {
        ($t:ty, $kind:expr) => {
            for o in Api::<$t>::namespaced(client.clone(), "default")
                .list(&lp)
                .await
                .expect("list")
                .items
            {
                if with_terminating || o.meta().deletion_timestamp.is_none() {
                    out.push(format!("{}/{}", $kind, o.name_any()));
                }
            }
        };
    }
    list!(StatefulSet, "statefulset");
    list!(Pod, "pod");
    list!(Service, "service");
    list!(ConfigMap, "configmap");
    list!(Secret, "secret");
    list!(PodDisruptionBudget, "pdb");
    out.sort();
    out
}

impl Cluster {
    /// `kubectl wait --for=FOR llmd/smollm2 --timeout=TIMEOUT`, with diagnostics on failure.
    pub fn wait_smollm2(&self, what: &str, timeout: &str, op: &Operator) {
        self.kubectl_ok_or_diagnose(
            &[
                "wait",
                &format!("--for={what}"),
                "llmd/smollm2",
                &format!("--timeout={timeout}"),
            ],
            op,
        );
    }

    /// Waits (kubectl, up to `timeout` such as "90s") for `llmd/smollm2` to be Ready; then its
    /// `kubectl get llmd` row: NAME MODEL TP PP REPLICAS READY PHASE AGE.
    pub fn wait_smollm2_ready(&self, timeout: &str, op: &Operator) -> Vec<String> {
        self.wait_smollm2("condition=Ready", timeout, op);
        let table = self.kubectl_ok(&["get", "llmd"], None);
        table
            .lines()
            .find(|l| l.starts_with("smollm2 "))
            .unwrap_or_else(|| panic!("no smollm2 row in\n{table}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    }
}

/// The A records of `name` from the DNS server at `server` (one UDP query, as a pod's resolver
/// would send it; the e2e cluster has no Service VIPs, its DNS answers with the ready pods).
pub fn dns_a(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let id: u16 = rand::random();
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("UDP socket");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    sock.send_to(&q, server).expect("DNS query sent");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("DNS answer");
    let r = &buf[..n];
    assert!(
        n >= 12 && r[..2] == id.to_be_bytes(),
        "bad DNS answer {r:?}"
    );
    if r[3] & 0x0f != 0 {
        return Vec::new(); // NXDOMAIN or another error: no address
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // Skip the header and the echoed question: the same bytes as the query.
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // A name (a compression pointer or labels), then type, class, TTL, length, data.
        if r[i] & 0xc0 == 0xc0 {
            i += 2;
        } else {
            while r[i] != 0 {
                i += 1 + r[i] as usize;
            }
            i += 1;
        }
        let rtype = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = u16::from_be_bytes([r[i + 8], r[i + 9]]) as usize;
        i += 10;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    out
}
