//! The process kubelet: StatefulSet pods scheduled onto fake GPU nodes that fit, run as local
//! processes with the pod's env on their own loopback IPs, probed, restarted, and reported
//! through pod status, readiness gates included; a startup probe holds the other probes back
//! and restarts a container that never starts; deleted pods stop gracefully (preStop pause,
//! SIGTERM, SIGKILL at the end of the grace period; a force delete at once).

mod common;

use common::{bounded, client};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use whaleflux_e2e::{ApiServer, KubeletConfig, NodeSpec};

const LIMIT: Duration = Duration::from_secs(30);

const SERVER: &str = r#"
import http.server, os
print("GREETING=" + os.environ.get("GREETING", "") + " POD_NAME=" + os.environ.get("POD_NAME", "") + " DNS=" + os.environ.get("WHALEFLUX_DNS_SERVER", ""), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
"#;

/// Ask the kubelet's DNS server for A records: `None` for NXDOMAIN.
async fn lookup(dns: std::net::SocketAddr, name: &str) -> Option<Vec<std::net::Ipv4Addr>> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp socket");
    sock.send_to(&q, dns).await.expect("query sent");
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("DNS answers")
        .expect("recv");
    let r = &buf[..n];
    assert_eq!(&r[0..2], &[0x12, 0x34], "same query id");
    if r[3] & 0x0F == 3 {
        return None;
    }
    let answers = u16::from_be_bytes([r[6], r[7]]) as usize;
    let start = 12 + q.len() - 12;
    Some(
        (0..answers)
            .map(|i| {
                let at = start + i * 16 + 12;
                std::net::Ipv4Addr::new(r[at], r[at + 1], r[at + 2], r[at + 3])
            })
            .collect(),
    )
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn condition(p: &Pod, type_: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn container_spec() -> serde_json::Value {
    json!({
        "name": "worker", "image": "python:3",
        "command": ["python3", "-c", SERVER],
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}}
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
        "resources": {"limits": {"nvidia.com/gpu": 1}}
    })
}

#[tokio::test]
async fn statefulset_pods_fit_gpu_nodes_run_with_env_and_become_ready() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let kubelet = server.kubelet(KubeletConfig {
            nodes: vec![
                NodeSpec::gpu("gpu-a", "NVIDIA-H100-80GB-HBM3", 1).label("pool", "a"),
                NodeSpec::gpu("gpu-b", "NVIDIA-H100-80GB-HBM3", 1).label("pool", "a"),
                NodeSpec::gpu("gpu-c", "NVIDIA-GeForce-RTX-4090", 4).label("pool", "b"),
            ],
            ..KubeletConfig::default()
        }).await.expect("kubelet starts");
        let client = client(&server).await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("cfg".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "greeting".to_string(),
                "hello".to_string(),
            )])),
            ..ConfigMap::default()
        };
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("configmap");
        let sts: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "w", "namespace": "default"},
            "spec": {"replicas": 3, "serviceName": "w", "selector": {"matchLabels": {"app": "w"}},
                "template": {"metadata": {"labels": {"app": "w"}},
                    "spec": {"nodeSelector": {"pool": "a"}, "containers": [container_spec()]}}}
        }))
        .expect("statefulset");
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        sets.create(&PostParams::default(), &sts)
            .await
            .expect("statefulset created");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        eventually("two pods Ready on the pool-a nodes", || {
            let pods = pods.clone();
            async move {
                let mut ok = 0;
                for n in ["w-0", "w-1"] {
                    if let Ok(p) = pods.get(n).await
                        && condition(&p, "Ready").as_deref() == Some("True")
                    {
                        ok += 1;
                    }
                }
                ok == 2
            }
        })
        .await;
        let w0 = pods.get("w-0").await.expect("w-0");
        let w1 = pods.get("w-1").await.expect("w-1");
        let nodes: Vec<String> = [&w0, &w1]
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        assert!(
            nodes.contains(&"gpu-a".to_string()) && nodes.contains(&"gpu-b".to_string()),
            "one GPU each: {nodes:?}"
        );
        let ip0 = w0
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod IP");
        let ip1 = w1
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod IP");
        assert!(ip0.starts_with("127.") && ip0 != ip1, "{ip0} {ip1}");
        assert_eq!(
            w0.status.as_ref().and_then(|s| s.phase.clone()).as_deref(),
            Some("Running")
        );
        assert!(
            kubelet
                .logs("default", "w-0", "worker")
                .contains("GREETING=hello POD_NAME=w-0")
        );
        assert!(kubelet.logs("default", "w-0", "worker").contains(&format!("DNS={}", kubelet.dns_addr())));
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "w"}, "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": {"app": "w"}, "ports": [{"port": 8080}]}
        })).expect("service");
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default").create(&PostParams::default(), &svc).await.expect("service created");
        let dns = kubelet.dns_addr();
        assert_eq!(lookup(dns, "w-0.w.default.svc.cluster.local").await, Some(vec![ip0.parse().expect("ip")]));
        let mut both = lookup(dns, "w.default.svc.cluster.local").await.expect("service resolves");
        both.sort();
        let mut want: Vec<std::net::Ipv4Addr> = vec![ip0.parse().expect("ip"), ip1.parse().expect("ip")];
        want.sort();
        assert_eq!(both, want, "a headless service resolves to its pods (w-2 has no IP)");
        assert_eq!(lookup(dns, "nope.default.svc.cluster.local").await, None, "NXDOMAIN");
        let w2 = pods.get("w-2").await.expect("w-2 exists");
        eventually("w-2 to be unschedulable (no free GPU in pool a)", || {
            let pods = pods.clone();
            async move {
                pods.get("w-2")
                    .await
                    .is_ok_and(|p| condition(&p, "PodScheduled").as_deref() == Some("False"))
            }
        })
        .await;
        assert!(w2.spec.as_ref().and_then(|s| s.node_name.clone()).is_none());
        eventually("the StatefulSet status to count 2 ready", || {
            let sets = sets.clone();
            async move {
                sets.get("w").await.is_ok_and(|s| {
                    s.status
                        .is_some_and(|st| st.ready_replicas == Some(2) && st.replicas == 3)
                })
            }
        })
        .await;
        sets.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scale down");
        eventually("scale-down to remove w-1 and w-2", || {
            let pods = pods.clone();
            async move {
                pods.list(&Default::default()).await.is_ok_and(|l| {
                    l.items.iter().map(|p| p.name_any()).collect::<Vec<_>>() == ["w-0"]
                })
            }
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn restarts_readiness_gates_and_node_failure() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let kubelet = server.kubelet(KubeletConfig { nodes: vec![NodeSpec::gpu("n1", "NVIDIA-H100-80GB-HBM3", 8)], ..KubeletConfig::default() }).await.expect("kubelet starts");
        let client = client(&server).await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hi"}})).expect("cm");
        cms.create(&PostParams::default(), &cm).await.expect("configmap");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
            "spec": {"readinessGates": [{"conditionType": "whaleflux.io/group-ready"}], "containers": [container_spec()]}
        }))
        .expect("pod");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        pods.create(&PostParams::default(), &pod).await.expect("pod created");
        let cond = |type_: &'static str, want: &'static str| {
            let pods = pods.clone();
            move || {
                let pods = pods.clone();
                async move { pods.get("p").await.is_ok_and(|p| condition(&p, type_).as_deref() == Some(want)) }
            }
        };
        eventually("containers ready", cond("ContainersReady", "True")).await;
        let p = pods.get("p").await.expect("pod");
        assert_eq!(condition(&p, "Ready").as_deref(), Some("False"), "the readiness gate holds Ready back");
        let gate = json!({"status": {"conditions": [{"type": "whaleflux.io/group-ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        pods.patch_status("p", &PatchParams::default(), &Patch::Strategic(gate)).await.expect("gate set");
        eventually("Ready once the gate is True", cond("Ready", "True")).await;

        assert!(kubelet.kill("default", "p"), "the pod has a process");
        eventually("the container to restart", || {
            let pods = pods.clone();
            async move {
                pods.get("p").await.is_ok_and(|p| {
                    p.status.and_then(|s| s.container_statuses).is_some_and(|cs| cs.iter().any(|c| c.restart_count == 1 && c.ready))
                })
            }
        })
        .await;
        kubelet.set_node_ready("n1", false);
        eventually("Ready to drop when the node is NotReady", cond("Ready", "False")).await;
        kubelet.set_node_ready("n1", true);
        eventually("Ready to return with the node", cond("Ready", "True")).await;
        let deleting = pods.delete("p", &Default::default()).await.expect("delete accepted");
        let marked = deleting.left().expect("a running pod is deleted gracefully, not at once");
        assert!(marked.metadata.deletion_timestamp.is_some());
        eventually("the kubelet to stop the pod and remove it", || {
            let pods = pods.clone();
            async move { matches!(pods.get_opt("p").await, Ok(None)) }
        })
        .await;
        assert!(!kubelet.kill("default", "p"), "no process is left");
    })
    .await;
}

/// Serves `/startupz` 200 once the file `$STARTED` exists (503 before), every other path 200.
const STARTUP_SERVER: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path != "/startupz" or os.path.exists(os.environ["STARTED"])
        self.send_response(200 if ok else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
"#;

#[tokio::test]
async fn startup_probes_hold_the_other_probes_back_and_restart_a_container_that_never_starts() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let _kubelet = server.kubelet(KubeletConfig { nodes: vec![NodeSpec::gpu("n1", "NVIDIA-H100-80GB-HBM3", 1)], ..KubeletConfig::default() }).await.expect("kubelet starts");
        let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
        let dir = std::env::temp_dir().join(format!("wf-kubelet-startup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let pod = |name: &str, failures: u32| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{
                "name": "c", "image": "python:3", "command": ["python3", "-c", STARTUP_SERVER],
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "STARTED", "value": dir.join(name).to_str().expect("utf-8 path")}
                ],
                "startupProbe": {"httpGet": {"path": "/startupz", "port": "http"}, "periodSeconds": 1, "failureThreshold": failures},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}
            }]}}))
            .expect("pod")
        };
        let status = |pods: Api<Pod>, name: &'static str| async move {
            let s = pods.get(name).await.ok()?.status?.container_statuses?.into_iter().next()?;
            Some((s.started.unwrap_or(false), s.ready, s.restart_count, s.state?.running.is_some()))
        };
        // "slow" starts once the test says so: until then it runs, neither started nor ready,
        // and is not restarted (its threshold is 60 s).
        pods.create(&PostParams::default(), &pod("slow", 60)).await.expect("created");
        eventually("slow to run", || {
            let pods = pods.clone();
            async move { status(pods, "slow").await.is_some_and(|s| s.3) }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(status(pods.clone(), "slow").await, Some((false, false, 0, true)), "not started, not ready, not restarted");
        std::fs::write(dir.join("slow"), "").expect("marker");
        eventually("slow to be started and ready", || {
            let pods = pods.clone();
            async move { status(pods, "slow").await == Some((true, true, 0, true)) }
        })
        .await;
        // "stuck" never starts: killed after 2 failed startup probes, and restarted.
        pods.create(&PostParams::default(), &pod("stuck", 2)).await.expect("created");
        eventually("stuck to be restarted", || {
            let pods = pods.clone();
            async move { status(pods, "stuck").await.is_some_and(|s| s.2 >= 1 && !s.0 && !s.1) }
        })
        .await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn never_restart_pods_end_failed_and_missing_config_is_reported() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let _kubelet = server.kubelet(KubeletConfig { nodes: vec![NodeSpec::gpu("n1", "NVIDIA-H100-80GB-HBM3", 1)], ..KubeletConfig::default() }).await.expect("kubelet starts");
        let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
        let failing: Pod = serde_json::from_value(json!({"metadata": {"name": "f"}, "spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}]}}))
        .expect("pod");
        pods.create(&PostParams::default(), &failing).await.expect("created");
        let missing: Pod = serde_json::from_value(json!({"metadata": {"name": "m"}, "spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "sleep 30"],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]}]}}))
        .expect("pod");
        pods.create(&PostParams::default(), &missing).await.expect("created");
        eventually("f to fail with exit code 3", || {
            let pods = pods.clone();
            async move {
                pods.get("f").await.is_ok_and(|p| {
                    let s = p.status.unwrap_or_default();
                    s.phase.as_deref() == Some("Failed")
                        && s.container_statuses.unwrap_or_default().iter().any(|c| c.state.as_ref().and_then(|st| st.terminated.as_ref()).is_some_and(|t| t.exit_code == 3))
                })
            }
        })
        .await;
        let orphans: Pod = serde_json::from_value(json!({"metadata": {"name": "g"}, "spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "sleep 271828 & wait"]}]}}))
        .expect("pod");
        pods.create(&PostParams::default(), &orphans).await.expect("created");
        let running = || std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("271828"))
        });
        eventually("g's grandchild to run", || std::future::ready(running())).await;
        pods.delete("g", &Default::default()).await.expect("delete");
        eventually("deleting g to stop its whole process group", || std::future::ready(!running())).await;
        eventually("m to wait with CreateContainerConfigError", || {
            let pods = pods.clone();
            async move {
                pods.get("m").await.is_ok_and(|p| {
                    p.status.and_then(|s| s.container_statuses).unwrap_or_default().iter().any(|c| {
                        c.state.as_ref().and_then(|st| st.waiting.as_ref()).and_then(|w| w.reason.clone()).as_deref() == Some("CreateContainerConfigError")
                    })
                })
            }
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn configmap_and_host_path_volumes_map_to_folders() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let kubelet = server
            .kubelet(KubeletConfig { nodes: vec![NodeSpec::gpu("n1", "NVIDIA-H100-80GB-HBM3", 1)], ..KubeletConfig::default() })
            .await
            .expect("kubelet starts");
        let host = server.kubeconfig().with_file_name("host-models");
        std::fs::create_dir_all(&host).expect("host dir");
        std::fs::write(host.join("m.gguf"), "weights").expect("host file");
        let client = client(&server).await;
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "plan"}, "data": {"plan.json": "{\"tp\":1}"}})).expect("cm");
        Api::<ConfigMap>::namespaced(client.clone(), "default").create(&PostParams::default(), &cm).await.expect("configmap");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "v"}, "spec": {
            "containers": [{"name": "c", "image": "busybox",
                "command": ["sh", "-c", "cat /etc/whaleflux/plan.json; echo; cat $(MODEL); echo; sleep 300"],
                "env": [{"name": "MODEL", "value": "/models/m.gguf"}],
                "volumeMounts": [{"name": "plan", "mountPath": "/etc/whaleflux"}, {"name": "models", "mountPath": "/models", "readOnly": true}]}],
            "volumes": [{"name": "plan", "configMap": {"name": "plan"}}, {"name": "models", "hostPath": {"path": host.display().to_string()}}]
        }}))
        .expect("pod");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        pods.create(&PostParams::default(), &pod).await.expect("pod created");
        eventually("the process to read both volumes", || {
            std::future::ready(kubelet.logs("default", "v", "c") == "{\"tp\":1}\nweights\n")
        })
        .await;
        let missing: Pod = serde_json::from_value(json!({"metadata": {"name": "w"}, "spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "sleep 300"],
                "volumeMounts": [{"name": "plan", "mountPath": "/etc/whaleflux"}]}],
            "volumes": [{"name": "plan", "configMap": {"name": "absent"}}]
        }}))
        .expect("pod");
        pods.create(&PostParams::default(), &missing).await.expect("pod created");
        eventually("a missing ConfigMap to keep the container waiting", || {
            let pods = pods.clone();
            async move {
                pods.get("w").await.is_ok_and(|p| {
                    p.status.and_then(|s| s.container_statuses).unwrap_or_default().iter().any(|c| {
                        c.state.as_ref().and_then(|st| st.waiting.as_ref()).and_then(|w| w.message.clone()).is_some_and(|m| m.contains("configmap \"absent\" not found"))
                    })
                })
            }
        })
        .await;
    })
    .await;
}

/// What a test saw of one pod's deletion.
struct Stop {
    /// From the DELETE call until the pod object was gone.
    gone_after: Duration,
    /// From the DELETE call until the container's log first showed `got TERM`.
    term_after: Option<Duration>,
    /// Whether the pod was seen Terminating and not Ready before its process got SIGTERM.
    unready_before_term: bool,
    /// The container's exit code in the pod's last state (the DELETED event's object).
    exit_code: Option<i32>,
}

/// Deletes pod `name` with `dp` and follows it (a watch from the delete's resource version, and
/// the container's log) until its object is gone.
async fn delete_and_follow(
    pods: &Api<Pod>,
    kubelet: &whaleflux_e2e::Kubelet,
    name: &str,
    dp: &kube::api::DeleteParams,
) -> Stop {
    use futures_util::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let before = pods.get(name).await.expect("the pod exists");
    let rv = before.resource_version().expect("resource version");
    let mut events = pods
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .expect("watch")
        .boxed();
    let t0 = tokio::time::Instant::now();
    pods.delete(name, dp).await.expect("delete accepted");
    let mut stop = Stop {
        gone_after: Duration::ZERO,
        term_after: None,
        unready_before_term: false,
        exit_code: None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        if stop.term_after.is_none() && kubelet.logs("default", name, "c").contains("got TERM") {
            stop.term_after = Some(t0.elapsed());
        }
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = tick.tick() => continue,
        };
        let p = match ev {
            Some(Ok(WatchEvent::Modified(p))) if p.name_any() == name => p,
            Some(Ok(WatchEvent::Deleted(p))) if p.name_any() == name => {
                stop.gone_after = t0.elapsed();
                stop.exit_code = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .and_then(|cs| cs.into_iter().next())
                    .and_then(|c| c.state)
                    .and_then(|s| s.terminated)
                    .map(|t| t.exit_code);
                return stop;
            }
            Some(Ok(_)) => continue,
            other => panic!("the watch ended before {name} was deleted: {other:?}"),
        };
        if p.metadata.deletion_timestamp.is_some()
            && stop.term_after.is_none()
            && condition(&p, "Ready").as_deref() == Some("False")
        {
            stop.unready_before_term = true;
        }
    }
}

/// Whether a process whose command line contains `marker` runs.
fn running(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
}

#[tokio::test]
async fn deleted_pods_stop_gracefully_prestop_sigterm_then_sigkill() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let kubelet = server
            .kubelet(KubeletConfig { nodes: vec![NodeSpec::gpu("n1", "NVIDIA-H100-80GB-HBM3", 1)], ..KubeletConfig::default() })
            .await
            .expect("kubelet starts");
        let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
        // $0 of each shell is a marker naming its pod, so the test can tell whether it still runs.
        let pod = |name: &str, script: &str, grace: i64, pre_stop: Option<i64>| -> Pod {
            let mut c = json!({"name": "c", "image": "busybox", "command": ["sh", "-c", script, format!("wf-{name}-{}", std::process::id())]});
            if let Some(s) = pre_stop {
                c["lifecycle"] = json!({"preStop": {"sleep": {"seconds": s}}});
            }
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"terminationGracePeriodSeconds": grace, "containers": [c]}})).expect("pod")
        };
        let marker = |name: &str| format!("wf-{name}-{}", std::process::id());
        let graceful = pod("graceful", r#"trap 'echo got TERM; sleep 1; exit 0' TERM; echo started; while true; do sleep 0.1; done"#, 10, Some(1));
        let stubborn = pod("stubborn", r#"trap '' TERM; echo started; while true; do sleep 0.1; done"#, 2, None);
        let forced = pod("forced", r#"trap '' TERM; echo started; while true; do sleep 0.1; done"#, 30, Some(5));
        let hurried = pod("hurried", r#"trap '' TERM; echo started; while true; do sleep 0.1; done"#, 30, None);
        for p in [&graceful, &stubborn, &forced, &hurried] {
            pods.create(&PostParams::default(), p).await.expect("pod created");
        }
        for name in ["graceful", "stubborn", "forced", "hurried"] {
            eventually("the pod to run and be Ready", || {
                let pods = pods.clone();
                let started = kubelet.logs("default", name, "c").contains("started");
                async move { started && pods.get(name).await.is_ok_and(|p| condition(&p, "Ready").as_deref() == Some("True")) }
            })
            .await;
        }

        // preStop sleep 1 s, then SIGTERM: the trap runs, the process exits 0 and the pod goes,
        // long before its 10 s grace period. Until then it is Terminating and not Ready.
        let stop = delete_and_follow(&pods, &kubelet, "graceful", &Default::default()).await;
        let term = stop.term_after.expect("the container's log shows the SIGTERM");
        assert!(term >= Duration::from_secs(1), "SIGTERM came after the 1 s preStop pause, not {term:?}");
        assert!(stop.gone_after >= term + Duration::from_millis(900), "the pod stayed Terminating while its trap ran: gone {:?}, TERM {term:?}", stop.gone_after);
        assert!(stop.gone_after < Duration::from_secs(8), "it went when its process exited, not at the grace period: {:?}", stop.gone_after);
        assert!(stop.unready_before_term, "a Terminating pod is not Ready");
        assert_eq!(stop.exit_code, Some(0), "the trap's exit code");
        assert!(!running(&marker("graceful")));

        // SIGTERM ignored: SIGKILL of its process group when the 2 s grace period runs out.
        let stop = delete_and_follow(&pods, &kubelet, "stubborn", &Default::default()).await;
        assert!(
            (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&stop.gone_after),
            "killed at the end of its 2 s grace period, not after {:?}",
            stop.gone_after
        );
        assert_eq!(stop.exit_code, Some(137), "SIGKILL");
        assert!(!running(&marker("stubborn")));

        // A force delete (grace 0) removes the object at once and kills the processes at once,
        // preStop and grace period notwithstanding.
        let t0 = tokio::time::Instant::now();
        let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
        pods.delete("forced", &dp).await.expect("force delete");
        assert!(pods.get_opt("forced").await.expect("get").is_none(), "a force delete removes the pod at once");
        eventually("the forced pod's processes to be killed", || std::future::ready(!running(&marker("forced")))).await;
        assert!(t0.elapsed() < Duration::from_secs(2), "killed at once, not after {:?}", t0.elapsed());

        // A second delete shortens the grace period of a Terminating pod (never lengthens it):
        // 30 s becomes 1 s, and the kubelet kills it 2 s after its SIGTERM (the shortest window).
        let t0 = tokio::time::Instant::now();
        pods.delete("hurried", &Default::default()).await.expect("delete");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = pods.get("hurried").await.expect("still Terminating");
        assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
        let dp = kube::api::DeleteParams { grace_period_seconds: Some(1), ..Default::default() };
        let p = pods.delete("hurried", &dp).await.expect("delete again").left().expect("still there");
        assert_eq!(p.metadata.deletion_grace_period_seconds, Some(1));
        let dp = kube::api::DeleteParams { grace_period_seconds: Some(20), ..Default::default() };
        let p = pods.delete("hurried", &dp).await.expect("delete again").left().expect("still there");
        assert_eq!(p.metadata.deletion_grace_period_seconds, Some(1), "never lengthened");
        eventually("the hurried pod to go", || {
            let pods = pods.clone();
            async move { matches!(pods.get_opt("hurried").await, Ok(None)) }
        })
        .await;
        assert!(
            (Duration::from_millis(1500)..Duration::from_secs(6)).contains(&t0.elapsed()),
            "killed 2 s after the shortened delete's start, not after {:?}",
            t0.elapsed()
        );
        assert!(!running(&marker("hurried")));
    })
    .await;
}
