//! The process kubelet (plus the controllers it needs to be useful): registers fake GPU
//! Nodes, creates the Pods of StatefulSets and Deployments, binds pending Pods to Nodes that
//! fit, and runs each container's command as a local process with the Pod's env, on its own
//! loopback address. It probes over HTTP or TCP (a startup probe first, then readiness and
//! liveness, each on its own period), restarts per
//! `restartPolicy`, and writes Pod phase, container statuses and conditions (readiness gates
//! included). A deleted pod stops as on a real node: Terminating and not ready, each container's
//! `sleep` preStop pause, SIGTERM to its main process, SIGKILL to its process group when the
//! grace period runs out; the pod object goes once every container has stopped. One role per
//! file: this one holds the nodes, the shared object helpers and the
//! loop; `scheduler`, `statefulsets`, `deployments`, `container` (a process's env and volumes)
//! and `lifecycle` (probes, restarts, status) the rest.
//!
//! It writes to the store in-process, so its traffic never appears in the audit log: the log
//! shows only what real clients (kubectl, the operator) did.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::error::ApiError;
use crate::selectors::LabelSelector;
use crate::server::AppState;
use crate::store::{Key, Write};

mod container;
mod deployments;
mod lifecycle;
mod scheduler;
mod statefulsets;

use container::*;
use lifecycle::*;
use scheduler::schedule;
use statefulsets::reconcile_statefulsets;

/// A fake Node to register.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// `nvidia.com/gpu.product` label, when the node has GPU feature discovery.
    pub gpu_product: Option<String>,
    /// Allocatable `nvidia.com/gpu` (also the `nvidia.com/gpu.count` label).
    pub gpus: u32,
    /// Extra labels (e.g. a pool selector).
    pub labels: BTreeMap<String, String>,
    /// Environment the node's container runtime adds to every container on it (as NVIDIA's
    /// container toolkit injects the driver's NVML): e.g. the node's fake NVML library and state.
    pub env: BTreeMap<String, String>,
}

impl NodeSpec {
    /// A node with `gpus` GPUs of `product` (e.g. `NVIDIA-H100-80GB-HBM3`).
    pub fn gpu(name: &str, product: &str, gpus: u32) -> Self {
        Self {
            name: name.into(),
            gpu_product: Some(product.into()),
            gpus,
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    /// Add an environment variable every container on the node gets.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Add a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// What the kubelet runs and where.
#[derive(Debug, Clone, Default)]
pub struct KubeletConfig {
    /// Nodes to register.
    pub nodes: Vec<NodeSpec>,
    /// Image name (without tag) → program to run when a container has no `command`
    /// (the image's entrypoint), e.g. `whaleflux-worker` → the built worker binary.
    pub images: HashMap<String, PathBuf>,
    /// Folder for per-pod working directories and logs.
    pub root: PathBuf,
}

/// SIGKILL a container's whole process group (its shell and everything it started), as a
/// container runtime ends every process in the container.
fn kill_group(child: &mut Child) -> bool {
    if let Some(pid) = child.id() {
        kill_pgid(pid);
    }
    child.start_kill().is_ok()
}

fn kill_pgid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for this
        // container (process_group(0) at spawn); it touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// SIGTERM a container's main process only, as a container runtime signals the container's
/// PID 1 (what it started is the main process's to stop).
fn terminate(child: &Child) -> bool {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return false;
    };
    // SAFETY: kill(2) on the pid of a child we started and have not reaped (`id()` is None once
    // it has been); it touches no memory.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

/// A container being stopped because its pod is being deleted (see `lifecycle::stop`).
#[derive(Debug, Clone, Copy)]
struct Stopping {
    /// When the kubelet began stopping it: the grace period counts from here.
    began: Instant,
    /// When its main process gets SIGTERM: after its preStop pause.
    sigterm_at: Instant,
    /// Whether SIGTERM has been sent.
    signalled: bool,
    /// Whether the grace period ran out and the process group was killed.
    killed: bool,
}

/// One running (or waiting to restart) container process.
#[derive(Debug)]
struct Proc {
    /// Killed with its process group when the Proc is dropped.
    child: Option<Child>,
    restarts: u32,
    started: String,
    ready: bool,
    live_failures: u32,
    /// The startup probe passed (or there is none): readiness and liveness probes run.
    started_ok: bool,
    startup_failures: u32,
    /// When each probe ([`lifecycle::ProbeKind`] as index) last ran.
    last_probe: [Option<Instant>; 3],
    restart_at: Option<Instant>,
    /// How the process last ended: `{exitCode, reason, message, startedAt, finishedAt}` (the
    /// state while it stays ended, `lastState` once it runs again).
    terminated: Option<Value>,
    /// Whether `terminated` is the current state (not restarted since).
    ended: bool,
    waiting: Option<(String, String)>,
    /// Set once its pod is being deleted: the container stops and is not restarted.
    stopping: Option<Stopping>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill_group(c);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Pod uid → (pod IP, container name → process).
    pods: HashMap<String, (String, BTreeMap<String, Proc>)>,
    next_ip: u32,
    not_ready: Vec<String>,
    /// Nodes without power: their processes are gone and nothing reports for them.
    powered_off: Vec<String>,
}

/// A running process kubelet; dropping it kills every process it started.
#[derive(Debug)]
pub struct Kubelet {
    inner: Arc<Mutex<Inner>>,
    state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
    dns_task: tokio::task::JoinHandle<()>,
    dns: std::net::SocketAddr,
    root: PathBuf,
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(crate) fn key(resource: &str, ns: &str, name: &str) -> Key {
    let group = if matches!(resource, "statefulsets" | "deployments") {
        "apps"
    } else {
        ""
    };
    Key {
        group: group.into(),
        resource: resource.into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

/// Read-modify-write an object in place; no write when `f` changes nothing.
pub(crate) fn modify(st: &AppState, k: &Key, f: impl FnOnce(&mut Value)) {
    let _ = st.store.write(k, |cur, _| -> Result<Write, ApiError> {
        let Some(cur) = cur else {
            return Ok(Write::Keep);
        };
        let mut new = Value::clone(cur);
        f(&mut new);
        Ok(if new == **cur {
            Write::Keep
        } else {
            Write::Put(new)
        })
    });
}

pub(crate) fn set_condition(
    obj: &mut Value,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" };
    let conds = obj["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut found = false;
    for mut c in conds {
        if c["type"] == json!(type_) {
            found = true;
            if c["status"] != json!(status) {
                c["lastTransitionTime"] = json!(now());
            }
            c["status"] = json!(status);
            c["reason"] = json!(reason);
            c["message"] = json!(message);
        }
        out.push(c);
    }
    if !found {
        out.push(json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": now(), "lastProbeTime": null}));
    }
    obj["status"]["conditions"] = Value::Array(out);
}

pub(crate) fn condition_true(obj: &Value, type_: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == json!(type_) && c["status"] == json!("True"))
}

fn quantity(v: &Value) -> u32 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0) as u32,
        _ => 0,
    }
}

fn gpu_request(pod: &Value) -> u32 {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let r = &c["resources"];
            quantity(if r["limits"]["nvidia.com/gpu"].is_null() {
                &r["requests"]["nvidia.com/gpu"]
            } else {
                &r["limits"]["nvidia.com/gpu"]
            })
        })
        .sum()
}

fn terminal(pod: &Value) -> bool {
    matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

fn affinity_ok(pod: &Value, node: &Value) -> bool {
    let labels = &node["metadata"]["labels"];
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    let Some(terms) = terms.as_array() else {
        return true;
    };
    terms.iter().any(|t| {
        t["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| {
                let got = labels[e["key"].as_str().unwrap_or_default()].as_str();
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                match e["operator"].as_str() {
                    Some("In") => got.is_some_and(|g| values.contains(&g)),
                    Some("NotIn") => got.is_none_or(|g| !values.contains(&g)),
                    Some("Exists") => got.is_some(),
                    Some("DoesNotExist") => got.is_none(),
                    _ => false,
                }
            })
    })
}

impl Kubelet {
    pub(crate) async fn start(
        state: Arc<AppState>,
        config: KubeletConfig,
    ) -> std::io::Result<Self> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let dns = socket.local_addr()?;
        let dns_task = tokio::spawn(crate::dns::serve(socket, state.clone()));
        let dns_server = dns.to_string();
        if let Ok(mut roots) = state.log_roots.lock() {
            roots.push(config.root.clone());
        }
        let inner = Arc::new(Mutex::new(Inner {
            next_ip: 2,
            ..Inner::default()
        }));
        for n in &config.nodes {
            register_node(&state, n);
        }
        let (st, inn) = (state.clone(), inner.clone());
        let cfg = Arc::new(config.clone());
        let task = tokio::spawn(async move {
            loop {
                reconcile_statefulsets(&st);
                deployments::reconcile(&st);
                schedule(&st, &inn);
                run_pods(&st, &inn, &cfg, &dns_server).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Self {
            inner,
            state,
            task,
            dns_task,
            dns,
            root: config.root,
        })
    }

    /// The cluster DNS server the pods' processes are told about (`WHALEFLUX_DNS_SERVER`).
    pub fn dns_addr(&self) -> std::net::SocketAddr {
        self.dns
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILL every process of a pod (it restarts per its `restartPolicy`). False when the
    /// pod runs nothing here.
    pub fn kill(&self, namespace: &str, pod: &str) -> bool {
        let Some(uid) = self
            .state
            .store
            .get(&key("pods", namespace, pod))
            .and_then(|p| p["metadata"]["uid"].as_str().map(String::from))
        else {
            return false;
        };
        let mut g = self.lock();
        let Some((_, procs)) = g.pods.get_mut(&uid) else {
            return false;
        };
        let mut any = false;
        for p in procs.values_mut() {
            if let Some(c) = p.child.as_mut() {
                any |= kill_group(c);
            }
        }
        any
    }

    /// Mark a node Ready or NotReady (its pods lose readiness; processes keep running).
    pub fn set_node_ready(&self, node: &str, ready: bool) {
        {
            let mut g = self.lock();
            g.not_ready.retain(|n| n != node);
            if !ready {
                g.not_ready.push(node.to_string());
            }
        }
        modify(&self.state, &key("nodes", "", node), |n| {
            let (reason, msg) = if ready {
                ("KubeletReady", "kubelet is posting ready status")
            } else {
                ("NodeStatusUnknown", "Kubelet stopped posting node status.")
            };
            set_condition(n, "Ready", ready, reason, msg);
        });
    }

    /// Cut a node's power: every process of its pods dies at once, its Ready condition goes
    /// Unknown, and nothing reports for its pods any more (deleted ones stay Terminating, as
    /// on a real node that never confirms). [`Kubelet::power_on`] brings it back.
    pub fn power_off(&self, node: &str) {
        let uids: Vec<String> = {
            let (pods, _) = self.state.store.list("", "pods", None);
            pods.iter()
                .filter(|(_, p)| p["spec"]["nodeName"] == json!(node))
                .filter_map(|(_, p)| p["metadata"]["uid"].as_str().map(String::from))
                .collect()
        };
        {
            let mut g = self.lock();
            g.powered_off.retain(|n| n != node);
            g.powered_off.push(node.to_string());
            g.not_ready.retain(|n| n != node);
            g.not_ready.push(node.to_string());
            // Dropping each Proc kills its process group.
            g.pods.retain(|uid, _| !uids.contains(uid));
        }
        modify(&self.state, &key("nodes", "", node), |n| {
            set_condition(
                n,
                "Ready",
                false,
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
            );
            if let Some(c) = n["status"]["conditions"]
                .as_array_mut()
                .and_then(|cs| cs.iter_mut().find(|c| c["type"] == json!("Ready")))
            {
                c["status"] = json!("Unknown");
            }
        });
    }

    /// Restore a node's power: it reports Ready again and runs its pods.
    pub fn power_on(&self, node: &str) {
        self.lock().powered_off.retain(|n| n != node);
        self.set_node_ready(node, true);
    }

    /// A container's combined stdout and stderr so far.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            pod_dir(&self.root, namespace, pod).join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        self.dns_task.abort();
        let mut g = self.lock();
        // Dropping each Proc kills its process group.
        g.pods.clear();
    }
}

fn pod_dir(root: &Path, ns: &str, pod: &str) -> PathBuf {
    root.join(ns).join(pod)
}

fn register_node(st: &AppState, n: &NodeSpec) {
    let mut labels = n.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), n.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    if let Some(p) = &n.gpu_product {
        labels.insert("nvidia.com/gpu.product".into(), p.clone());
        labels.insert("nvidia.com/gpu.count".into(), n.gpus.to_string());
    }
    let resources = json!({"cpu": "16", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": n.gpus.to_string()});
    let t = now();
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.name, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": t, "labels": labels},
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                "lastHeartbeatTime": t, "lastTransitionTime": t}],
            "nodeInfo": {"kubeletVersion": "v1.32.0-whaleflux-e2e", "operatingSystem": "linux", "architecture": "amd64", "containerRuntimeVersion": "process://"}},
    });
    let _ = st.store.write(
        &key("nodes", "", &n.name),
        |_, _| -> Result<Write, ApiError> { Ok(Write::Put(node)) },
    );
}

/// The pods in `ns` whose owner references name `uid`.
pub(crate) fn owned_pods(st: &AppState, ns: &str, uid: &str) -> Vec<Arc<Value>> {
    let (pods, _) = st.store.list("", "pods", Some(ns));
    pods.into_iter()
        .map(|(_, p)| p)
        .filter(|p| {
            p["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|r| r.iter().any(|o| o["uid"] == json!(uid)))
        })
        .collect()
}

/// Deletes a pod as a controller does (DeleteOptions without a grace period, like the
/// StatefulSet and ReplicaSet controllers): a pod bound to a node and not yet finished is
/// deleted gracefully with its own `terminationGracePeriodSeconds` (30 when unset): it gets a
/// deletionTimestamp and its kubelet stops it (preStop, SIGTERM, SIGKILL when the grace period
/// runs out) and then removes it, so on a dead node it stays Terminating. Any other pod goes
/// at once, unless finalizers hold it.
pub(crate) fn delete_pod(st: &AppState, ns: &str, name: &str) {
    let _ = st.store.write(
        &key("pods", ns, name),
        |cur, _| -> Result<Write, ApiError> {
            let Some(cur) = cur else {
                return Ok(Write::Keep);
            };
            if !cur["metadata"]["deletionTimestamp"].is_null() {
                return Ok(Write::Keep);
            }
            let grace = cur["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(30);
            let graceful = cur["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
                && grace > 0
                && !terminal(cur);
            let held = cur["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            if !graceful && !held {
                return Ok(Write::Delete);
            }
            let mut p = cur.as_ref().clone();
            p["metadata"]["deletionTimestamp"] = json!(now());
            p["metadata"]["deletionGracePeriodSeconds"] = json!(if graceful { grace } else { 0 });
            Ok(Write::Put(p))
        },
    );
}

pub(crate) fn template_hash(template: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_rewritten_to_their_folders() {
        let mounts = vec![
            (
                "/etc/whaleflux".to_string(),
                PathBuf::from("/k/p/volumes/config"),
            ),
            ("/models".to_string(), PathBuf::from("/models")),
            ("/tmp".to_string(), PathBuf::from("/k/tmp")),
        ];
        assert_eq!(
            rewrite("--plan=/etc/whaleflux/plan.json", &mounts),
            "--plan=/k/p/volumes/config/plan.json"
        );
        assert_eq!(rewrite("/etc/whaleflux", &mounts), "/k/p/volumes/config");
        assert_eq!(
            rewrite("/etc/whalefluxes/x /models2 a/tmp", &mounts),
            "/etc/whalefluxes/x /models2 a/tmp"
        );
        assert_eq!(
            rewrite("/tmp/x:/models/m.gguf", &mounts),
            "/k/tmp/x:/models/m.gguf"
        );
    }
}
