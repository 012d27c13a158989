//! The process kubelet (plus the controllers it needs to be useful): registers fake GPU
//! Nodes, creates the Pods of StatefulSets and Deployments (`deployments.rs`), binds pending Pods to Nodes that fit, and runs each
//! container's command as a local process with the Pod's env, on its own loopback address.
//! It probes readiness and liveness over HTTP, restarts per `restartPolicy`, and writes Pod
//! phase, container statuses and conditions (readiness gates included).
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
}

impl NodeSpec {
    /// A node with `gpus` GPUs of `product` (e.g. `NVIDIA-H100-80GB-HBM3`).
    pub fn gpu(name: &str, product: &str, gpus: u32) -> Self {
        Self {
            name: name.into(),
            gpu_product: Some(product.into()),
            gpus,
            labels: BTreeMap::new(),
        }
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

/// One running (or waiting to restart) container process.
#[derive(Debug)]
struct Proc {
    /// Killed with its process group when the Proc is dropped.
    child: Option<Child>,
    restarts: u32,
    started: String,
    ready: bool,
    live_failures: u32,
    last_probe: Option<Instant>,
    restart_at: Option<Instant>,
    /// Exit code, reason, finish time.
    terminated: Option<(i32, String, String)>,
    waiting: Option<(String, String)>,
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
                crate::deployments::reconcile(&st);
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

pub(crate) fn template_hash(template: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

/// The StatefulSet controller: pods `<name>-<ordinal>` from the template (all at once, as
/// `podManagementPolicy: Parallel`), pods of an old template replaced, status counted.
fn reconcile_statefulsets(st: &AppState) {
    let (sets, _) = st.store.list("apps", "statefulsets", None);
    for (k, sts) in sets {
        if !sts["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let name = k.name.clone();
        let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1);
        let template = &sts["spec"]["template"];
        let revision = format!("{name}-{}", template_hash(template));
        let uid = sts["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let owned = owned_pods(st, &k.namespace, &uid);
        for ordinal in 0..replicas {
            let pod_name = format!("{name}-{ordinal}");
            let existing = owned
                .iter()
                .find(|p| p["metadata"]["name"] == json!(pod_name));
            if let Some(p) = existing {
                let stale = p["metadata"]["labels"]["controller-revision-hash"] != json!(revision);
                if stale && p["metadata"]["deletionTimestamp"].is_null() {
                    let _ = st.store.write(
                        &key("pods", &k.namespace, &pod_name),
                        |_, _| -> Result<Write, ApiError> { Ok(Write::Delete) },
                    );
                }
                continue;
            }
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
            let meta = &mut pod["metadata"];
            meta["name"] = json!(pod_name);
            meta["namespace"] = json!(k.namespace);
            meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
            meta["creationTimestamp"] = json!(now());
            meta["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            meta["labels"]["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
            meta["labels"]["controller-revision-hash"] = json!(revision);
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
            pod["spec"]["hostname"] = json!(pod_name);
            if let Some(svc) = sts["spec"]["serviceName"].as_str() {
                pod["spec"]["subdomain"] = json!(svc);
            }
            if pod["spec"]["restartPolicy"].is_null() {
                pod["spec"]["restartPolicy"] = json!("Always");
            }
            pod["status"] = json!({"phase": "Pending"});
            let _ = st.store.write(
                &key("pods", &k.namespace, &pod_name),
                |cur, _| -> Result<Write, ApiError> {
                    Ok(if cur.is_some() {
                        Write::Keep
                    } else {
                        Write::Put(pod)
                    })
                },
            );
        }
        for p in &owned {
            let ordinal = p["metadata"]["labels"]["apps.kubernetes.io/pod-index"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok());
            if ordinal.is_some_and(|o| o >= replicas) {
                let n = p["metadata"]["name"].as_str().unwrap_or_default();
                let _ = st.store.write(
                    &key("pods", &k.namespace, n),
                    |_, _| -> Result<Write, ApiError> { Ok(Write::Delete) },
                );
            }
        }
        let live: Vec<&Arc<Value>> = owned
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        let ready = live.iter().filter(|p| condition_true(p, "Ready")).count();
        let current = live
            .iter()
            .filter(|p| p["metadata"]["labels"]["controller-revision-hash"] == json!(revision))
            .count();
        let generation = sts["metadata"]["generation"].clone();
        let selector = LabelSelector::from_object(&sts["spec"]["selector"]).to_string_form();
        modify(st, &k, |s| {
            s["status"] = json!({"observedGeneration": generation, "replicas": live.len(), "readyReplicas": ready, "availableReplicas": ready,
                "currentReplicas": current, "updatedReplicas": current, "currentRevision": revision, "updateRevision": revision,
                "collisionCount": 0, "selector": selector});
        });
    }
}

/// The scheduler: bind each pending pod to the first Ready node whose labels satisfy its node
/// selector and required node affinity and that has the GPUs it asks for.
fn schedule(st: &AppState, inner: &Mutex<Inner>) {
    let not_ready = inner
        .lock()
        .map(|g| g.not_ready.clone())
        .unwrap_or_default();
    let (nodes, _) = st.store.list("", "nodes", None);
    let (pods, _) = st.store.list("", "pods", None);
    let mut used: HashMap<String, u32> = HashMap::new();
    for (_, p) in &pods {
        if let Some(n) = p["spec"]["nodeName"].as_str().filter(|_| !terminal(p)) {
            *used.entry(n.to_string()).or_default() += gpu_request(p);
        }
    }
    for (k, pod) in pods {
        if pod["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
            || !pod["metadata"]["deletionTimestamp"].is_null()
        {
            continue;
        }
        let want = gpu_request(&pod);
        let selector = pod["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let fit = nodes.iter().find(|(_, n)| {
            let name = n["metadata"]["name"].as_str().unwrap_or_default();
            let labels = &n["metadata"]["labels"];
            let free = quantity(&n["status"]["allocatable"]["nvidia.com/gpu"])
                .saturating_sub(used.get(name).copied().unwrap_or(0));
            condition_true(n, "Ready")
                && !not_ready.iter().any(|x| x == name)
                && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                && affinity_ok(&pod, n)
                && free >= want
        });
        match fit {
            Some((_, n)) => {
                let node = n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                *used.entry(node.clone()).or_default() += want;
                modify(st, &k, |p| {
                    p["spec"]["nodeName"] = json!(node);
                    set_condition(p, "PodScheduled", true, "", "");
                });
            }
            None => {
                let msg = format!(
                    "0/{} nodes are available: no node matches the pod's node selector, affinity and nvidia.com/gpu request ({want}).",
                    nodes.len()
                );
                modify(st, &k, |p| {
                    set_condition(p, "PodScheduled", false, "Unschedulable", &msg)
                });
            }
        }
    }
}

/// `$(VAR)` expansion of command and args, as the kubelet does.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

fn field_ref(pod: &Value, path: &str, ip: &str) -> Option<String> {
    let bracket = |prefix: &str, field: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .and_then(|k| pod["metadata"][field][k].as_str().map(String::from))
    };
    match path {
        "status.podIP" => Some(ip.to_string()),
        "status.hostIP" => Some("127.0.0.1".into()),
        "metadata.name" | "metadata.namespace" | "metadata.uid" => {
            pod["metadata"][&path[9..]].as_str().map(String::from)
        }
        "spec.nodeName" | "spec.serviceAccountName" => {
            pod["spec"][&path[5..]].as_str().map(String::from)
        }
        _ => bracket("metadata.labels['", "labels")
            .or_else(|| bracket("metadata.annotations['", "annotations")),
    }
}

/// The container's environment, or why it cannot start (`CreateContainerConfigError`).
fn container_env(
    st: &AppState,
    pod: &Value,
    c: &Value,
    ip: &str,
    dns: &str,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let mut env = vec![
        (
            "HOSTNAME".to_string(),
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "127.0.0.1".to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_string(),
            st.address
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        ("WHALEFLUX_DNS_SERVER".to_string(), dns.to_string()),
    ];
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let from = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            Some(expand(v, &env))
        } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            Some(field_ref(pod, path, ip).unwrap_or_default())
        } else if from["configMapKeyRef"].is_object() || from["secretKeyRef"].is_object() {
            let (res, r) = if from["configMapKeyRef"].is_object() {
                ("configmaps", &from["configMapKeyRef"])
            } else {
                ("secrets", &from["secretKeyRef"])
            };
            let obj_name = r["name"].as_str().unwrap_or_default();
            let k = r["key"].as_str().unwrap_or_default();
            let obj = st.store.get(&key(res, ns, obj_name));
            let v = obj.as_ref().and_then(|o| {
                if res == "secrets" {
                    o["data"][k]
                        .as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .and_then(|b| String::from_utf8(b).ok())
                } else {
                    o["data"][k].as_str().map(String::from)
                }
            });
            match (v, r["optional"] == json!(true)) {
                (Some(v), _) => Some(v),
                (None, true) => None,
                (None, false) => {
                    return Err(format!("couldn't find key {k} in {res} {ns}/{obj_name}"));
                }
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.push((name, v));
        }
    }
    Ok(env)
}

/// Materialise the container's volume mounts: ConfigMap, Secret and emptyDir volumes become
/// folders under the pod's directory, hostPath volumes are the host path itself. Returns
/// (mountPath, host folder) pairs, longest mount path first.
fn mounts(
    st: &AppState,
    pod: &Value,
    c: &Value,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let volumes = pod["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or_default();
        let mount_path = m["mountPath"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        let Some(v) = volumes.iter().find(|v| v["name"] == json!(vname)) else {
            return Err(format!("volume {vname:?} is mounted but not defined"));
        };
        let base = if let Some(path) = v["hostPath"]["path"].as_str() {
            PathBuf::from(path)
        } else {
            let folder = dir.join("volumes").join(vname);
            std::fs::create_dir_all(&folder)
                .map_err(|e| format!("creating {}: {e}", folder.display()))?;
            let (res, src) = if v["configMap"].is_object() {
                ("configmaps", &v["configMap"])
            } else if v["secret"].is_object() {
                ("secrets", &v["secret"])
            } else {
                ("", &Value::Null)
            };
            if !res.is_empty() {
                let obj_name = src["name"]
                    .as_str()
                    .or(src["secretName"].as_str())
                    .unwrap_or_default();
                match st.store.get(&key(res, ns, obj_name)) {
                    Some(obj) => {
                        let data = obj["data"].as_object().cloned().unwrap_or_default();
                        let items: Vec<(String, String)> = match src["items"].as_array() {
                            Some(items) => items
                                .iter()
                                .filter_map(|i| {
                                    Some((
                                        i["key"].as_str()?.to_string(),
                                        i["path"].as_str()?.to_string(),
                                    ))
                                })
                                .collect(),
                            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
                        };
                        for (k, path) in items {
                            let raw = data.get(&k).and_then(Value::as_str).unwrap_or_default();
                            let bytes = if res == "secrets" {
                                base64::engine::general_purpose::STANDARD
                                    .decode(raw)
                                    .unwrap_or_default()
                            } else {
                                raw.as_bytes().to_vec()
                            };
                            let file = folder.join(&path);
                            if let Some(parent) = file.parent() {
                                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                            }
                            std::fs::write(&file, bytes)
                                .map_err(|e| format!("writing {}: {e}", file.display()))?;
                        }
                    }
                    None if src["optional"] == json!(true) => {}
                    None => {
                        return Err(format!(
                            "{} \"{obj_name}\" not found",
                            &res[..res.len() - 1]
                        ));
                    }
                }
            }
            folder
        };
        let target = match m["subPath"].as_str().filter(|p| !p.is_empty()) {
            Some(sub) => base.join(sub),
            None => base,
        };
        out.push((mount_path, target));
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    Ok(out)
}

/// Point paths under a mount at the folder that backs it: `/etc/whaleflux/plan.json` →
/// `<pod dir>/volumes/config/plan.json`, wherever such a path appears in a string.
fn rewrite(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let path_char = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut out = String::new();
    let mut i = 0;
    'scan: while i < s.len() {
        let before = s[..i].chars().last();
        if before.is_none_or(|c| !(path_char(c) || c == '/')) {
            for (mount, target) in mounts.iter().filter(|(m, _)| !m.is_empty()) {
                let rest = &s[i..];
                if rest.starts_with(mount.as_str())
                    && rest[mount.len()..]
                        .chars()
                        .next()
                        .is_none_or(|c| !path_char(c))
                {
                    out.push_str(&target.display().to_string());
                    i += mount.len();
                    continue 'scan;
                }
            }
        }
        let Some(c) = s[i..].chars().next() else {
            break;
        };
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn spawn(
    st: &AppState,
    cfg: &KubeletConfig,
    pod: &Value,
    c: &Value,
    ip: &str,
    dns: &str,
) -> Result<Child, (String, String)> {
    let env = container_env(st, pod, c, ip, dns)
        .map_err(|m| ("CreateContainerConfigError".to_string(), m))?;
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .map(|s| expand(s, &env))
            .collect()
    };
    let mut argv = strs(&c["command"]);
    if argv.is_empty() {
        let image = c["image"].as_str().unwrap_or_default();
        let base = image
            .rsplit('/')
            .next()
            .unwrap_or(image)
            .split([':', '@'])
            .next()
            .unwrap_or_default();
        match cfg.images.get(base) {
            Some(p) => argv.push(p.display().to_string()),
            None => {
                return Err((
                    "ErrImageNeverPull".into(),
                    format!(
                        "the process kubelet has no program for image {image:?} and the container sets no command"
                    ),
                ));
            }
        }
    }
    argv.extend(strs(&c["args"]));
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let dir = pod_dir(&cfg.root, ns, name);
    let mounts = mounts(st, pod, c, &dir).map_err(|m| ("ContainerCreating".to_string(), m))?;
    let argv: Vec<String> = argv.iter().map(|a| rewrite(a, &mounts)).collect();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, rewrite(&v, &mounts)))
        .collect();
    let mut env = env;
    let log_path = dir.join(format!("{}.log", c["name"].as_str().unwrap_or("c")));
    let io = |e: std::io::Error| ("RunContainerError".to_string(), e.to_string());
    std::fs::create_dir_all(&dir).map_err(io)?;
    if !env.iter().any(|(k, _)| k == "KUBECONFIG")
        && let Some(path) = service_account_kubeconfig(st, pod, &dir).map_err(io)?
    {
        env.push(("KUBECONFIG".into(), path.display().to_string()));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io)?;
    let log2 = log.try_clone().map_err(io)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
        .envs(env)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| {
        (
            "RunContainerError".to_string(),
            format!("starting {:?}: {e}", argv[0]),
        )
    })
}

/// The pod's service-account credentials. A cluster mounts a token and CA under
/// `/var/run/secrets/kubernetes.io/serviceaccount` for in-cluster config; processes here cannot
/// see that path, so the kubelet writes a kubeconfig in the pod's folder instead (clients read
/// `KUBECONFIG` first) whose token names the service account. `None` when the pod opts out with
/// `automountServiceAccountToken: false`.
fn service_account_kubeconfig(
    st: &AppState,
    pod: &Value,
    dir: &Path,
) -> std::io::Result<Option<PathBuf>> {
    if pod["spec"]["automountServiceAccountToken"] == json!(false) {
        return Ok(None);
    }
    let Ok(addr) = st.address.parse::<std::net::SocketAddr>() else {
        return Ok(None);
    };
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let sa = pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    let user = format!("{}{ns}:{sa}", crate::server::SERVICE_ACCOUNT_PREFIX);
    let path = dir.join("serviceaccount.kubeconfig");
    let text = crate::kubeconfig_for(addr, &user, &user)
        .replace("namespace: default", &format!("namespace: {ns}"));
    std::fs::write(&path, text)?;
    Ok(Some(path))
}

fn resolve_port(c: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.parse().ok().or_else(|| {
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == json!(s))
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

/// One HTTP GET probe (2xx/3xx = success) or TCP connect probe.
async fn probe(c: &Value, probe: &Value, ip: &str) -> bool {
    let attempt = async {
        if let Some(port) = resolve_port(c, &probe["httpGet"]["port"]) {
            let path = probe["httpGet"]["path"].as_str().unwrap_or("/");
            let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.32\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(port) = resolve_port(c, &probe["tcpSocket"]["port"]) {
            Some(tokio::net::TcpStream::connect((ip, port)).await.is_ok())
        } else {
            Some(true)
        }
    };
    let secs = probe["timeoutSeconds"].as_u64().unwrap_or(1);
    tokio::time::timeout(Duration::from_secs(secs), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn due(p: &Proc, spec: &Value) -> bool {
    let period = Duration::from_secs(spec["periodSeconds"].as_u64().unwrap_or(10));
    p.last_probe.is_none_or(|t| t.elapsed() >= period)
}

/// A probe to run: pod uid, container name, container, probe spec, pod IP, is liveness.
type ProbeTask = (String, String, Value, Value, String, bool);

/// Start, probe, restart and report every pod bound to one of this kubelet's nodes.
async fn run_pods(st: &AppState, inner: &Mutex<Inner>, cfg: &KubeletConfig, dns: &str) {
    for (uid, cname, c, spec, ip, liveness) in step(st, inner, cfg, dns) {
        let ok = probe(&c, &spec, &ip).await;
        record_probe(inner, &uid, &cname, &spec, liveness, ok);
    }
}

fn record_probe(
    inner: &Mutex<Inner>,
    uid: &str,
    cname: &str,
    spec: &Value,
    liveness: bool,
    ok: bool,
) {
    let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = g
        .pods
        .get_mut(uid)
        .and_then(|(_, procs)| procs.get_mut(cname))
    else {
        return;
    };
    if liveness {
        p.live_failures = if ok { 0 } else { p.live_failures + 1 };
        if p.live_failures >= spec["failureThreshold"].as_u64().unwrap_or(3) as u32
            && let Some(child) = p.child.as_mut()
        {
            kill_group(child);
        }
    } else {
        p.ready = ok;
    }
}

/// Reap exits, (re)start processes and write pod status; returns the probes now due.
fn step(st: &AppState, inner: &Mutex<Inner>, cfg: &KubeletConfig, dns: &str) -> Vec<ProbeTask> {
    let ours: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    let (pods, _) = st.store.list("", "pods", None);
    let live_uids: Vec<String> = pods
        .iter()
        .filter_map(|(_, p)| p["metadata"]["uid"].as_str().map(String::from))
        .collect();
    let mut g = match inner.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    };
    // Pods that are gone: dropping their Procs kills their processes.
    g.pods.retain(|uid, _| live_uids.contains(uid));
    let not_ready = g.not_ready.clone();
    let mut work = Vec::new();
    for (k, pod) in pods {
        let Some(node) = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| ours.iter().any(|o| o == n))
            .map(String::from)
        else {
            continue;
        };
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            if let Some((_, procs)) = g.pods.remove(&uid) {
                drop(procs);
            }
            let finalizers_done = pod["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
            if finalizers_done {
                let _ = st
                    .store
                    .write(&k, |_, _| -> Result<Write, ApiError> { Ok(Write::Delete) });
            }
            continue;
        }
        if terminal(&pod) {
            continue;
        }
        if !g.pods.contains_key(&uid) {
            // 127.<port high>.<port low>.<n>: distinct per API server, so kubelets of tests
            // running side by side never hand out the same address.
            let port: u16 = st
                .address
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let n = g.next_ip;
            g.next_ip = if n >= 254 { 2 } else { n + 1 };
            let ip = format!("127.{}.{}.{n}", port >> 8, port & 255);
            g.pods.insert(uid.clone(), (ip, BTreeMap::new()));
        }
        work.push((k, pod, uid, node));
    }
    let mut probes: Vec<ProbeTask> = Vec::new();
    for (k, pod, uid, node) in work {
        let Some((ip, procs)) = g.pods.get_mut(&uid) else {
            continue;
        };
        let ip = ip.clone();
        let policy = pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
            .to_string();
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or_default().to_string();
            let p = procs.entry(cname.clone()).or_insert_with(|| Proc {
                child: None,
                restarts: 0,
                started: String::new(),
                ready: false,
                live_failures: 0,
                last_probe: None,
                restart_at: Some(Instant::now()),
                terminated: None,
                waiting: None,
            });
            let pid = p.child.as_ref().and_then(Child::id);
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                // The container ends with its main process: stop what it left behind.
                if let Some(pid) = pid {
                    kill_pgid(pid);
                }
                let code = status.code().unwrap_or(137);
                p.child = None;
                p.ready = false;
                p.terminated = Some((
                    code,
                    if code == 0 {
                        "Completed".into()
                    } else {
                        "Error".into()
                    },
                    now(),
                ));
                let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
                if restart {
                    let backoff = Duration::from_millis(200 * 2u64.pow(p.restarts.min(5)));
                    p.restart_at = Some(Instant::now() + backoff);
                }
            }
            if p.child.is_none() && p.restart_at.is_some_and(|t| Instant::now() >= t) {
                match spawn(st, cfg, &pod, c, &ip, dns) {
                    Ok(child) => {
                        if p.started.is_empty() {
                            p.started = now();
                        } else {
                            p.restarts += 1;
                            p.started = now();
                        }
                        p.child = Some(child);
                        p.restart_at = None;
                        p.waiting = None;
                        p.terminated = None;
                        p.live_failures = 0;
                        p.last_probe = None;
                        p.ready = c["readinessProbe"].is_null();
                    }
                    Err(w) => {
                        p.waiting = Some(w);
                        p.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            if p.child.is_some() {
                if c["readinessProbe"].is_object() && due(p, &c["readinessProbe"]) {
                    probes.push((
                        uid.clone(),
                        cname.clone(),
                        c.clone(),
                        c["readinessProbe"].clone(),
                        ip.clone(),
                        false,
                    ));
                }
                if c["livenessProbe"].is_object() && due(p, &c["livenessProbe"]) {
                    probes.push((
                        uid.clone(),
                        cname.clone(),
                        c.clone(),
                        c["livenessProbe"].clone(),
                        ip.clone(),
                        true,
                    ));
                }
                if probes.iter().any(|(u, n, ..)| *u == uid && *n == cname) {
                    p.last_probe = Some(Instant::now());
                }
            }
        }
        let node_ready = !not_ready.contains(&node);
        let statuses: Vec<Value> = pod["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| {
            let cname = c["name"].as_str().unwrap_or_default();
            let p = procs.get(cname)?;
            let state = if p.child.is_some() {
                json!({"running": {"startedAt": p.started}})
            } else if let Some((reason, message)) = &p.waiting {
                json!({"waiting": {"reason": reason, "message": message}})
            } else if let Some((code, reason, finished)) = &p.terminated {
                json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": p.started, "finishedAt": finished}})
            } else {
                json!({"waiting": {"reason": "ContainerCreating"}})
            };
            Some(json!({"name": cname, "image": c["image"], "imageID": "", "containerID": p.child.as_ref().and_then(Child::id).map(|id| format!("process://{id}")),
                "ready": p.ready && p.child.is_some(), "started": p.child.is_some(), "restartCount": p.restarts, "state": state}))
        }).collect();
        let all_running =
            !statuses.is_empty() && statuses.iter().all(|s| s["state"]["running"].is_object());
        let all_done = !statuses.is_empty()
            && statuses
                .iter()
                .all(|s| s["state"]["terminated"].is_object());
        let containers_ready = statuses.iter().all(|s| s["ready"] == json!(true)) && all_running;
        let failed = statuses.iter().any(|s| {
            s["state"]["terminated"]["exitCode"]
                .as_i64()
                .is_some_and(|c| c != 0)
        });
        let restarting = procs.values().any(|p| p.restart_at.is_some());
        let phase = if all_done && !restarting {
            if failed { "Failed" } else { "Succeeded" }
        } else if all_running || restarting {
            "Running"
        } else {
            "Pending"
        };
        let gates: Vec<String> = pod["spec"]["readinessGates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["conditionType"].as_str().map(String::from))
            .collect();
        let ip2 = ip.clone();
        modify(st, &k, |p| {
            let gates_ok = gates.iter().all(|g| condition_true(p, g));
            p["status"]["phase"] = json!(phase);
            p["status"]["podIP"] = json!(ip2);
            p["status"]["podIPs"] = json!([{"ip": ip2}]);
            p["status"]["hostIP"] = json!("127.0.0.1");
            p["status"]["containerStatuses"] = Value::Array(statuses.clone());
            if p["status"]["startTime"].is_null() {
                p["status"]["startTime"] = json!(now());
            }
            set_condition(p, "Initialized", true, "", "");
            set_condition(
                p,
                "ContainersReady",
                containers_ready,
                if containers_ready {
                    ""
                } else {
                    "ContainersNotReady"
                },
                "",
            );
            let ready = containers_ready && gates_ok && node_ready;
            let reason = if ready {
                ""
            } else if !containers_ready {
                "ContainersNotReady"
            } else if !gates_ok {
                "ReadinessGatesNotReady"
            } else {
                "NodeNotReady"
            };
            set_condition(p, "Ready", ready, reason, "");
        });
    }
    probes
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
