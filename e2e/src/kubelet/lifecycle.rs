//! A pod's life on its node: start its containers, probe them, restart them per
//! `restartPolicy`, write phase, container statuses and conditions, and stop them gracefully
//! when the pod is deleted.

use std::os::unix::process::ExitStatusExt;

use super::*;

/// The shortest time a container gets between its SIGTERM and its SIGKILL, even when its preStop
/// hook used up the grace period (the kubelet's `minimumGracePeriodInSeconds`).
const MIN_STOP_WINDOW: Duration = Duration::from_secs(2);

/// A deleted pod's grace period: `metadata.deletionGracePeriodSeconds` (what the delete asked
/// for; a later delete may shorten it), else `spec.terminationGracePeriodSeconds`, else 30 s.
fn grace_period(pod: &Value) -> Duration {
    let secs = pod["metadata"]["deletionGracePeriodSeconds"]
        .as_i64()
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// How long a container's preStop hook pauses before its SIGTERM: a `sleep` action's seconds.
/// An `exec` or `httpGet` preStop hook is not run (the process kubelet has no container to exec
/// in; it says so in its log) and pauses nothing.
fn pre_stop_pause(c: &Value, pod: &str) -> Duration {
    let hook = &c["lifecycle"]["preStop"];
    if let Some(secs) = hook["sleep"]["seconds"].as_u64() {
        return Duration::from_secs(secs);
    }
    if hook["exec"].is_object() || hook["httpGet"].is_object() {
        tracing::info!(
            pod,
            container = c["name"].as_str().unwrap_or_default(),
            "the process kubelet runs only `sleep` preStop hooks; skipping this one"
        );
    }
    Duration::ZERO
}

/// Advances the stop of one container of a deleted pod, as the kubelet kills a container: its
/// preStop pause (cut to the grace period), SIGTERM to its main process, then, when it has not
/// exited by the end of the grace period (counted from the stop's start, so the pause is inside
/// it; at least [`MIN_STOP_WINDOW`] after the SIGTERM), SIGKILL to its process group. A grace
/// period of 0 kills at once. Never blocks: each step moves it on. True once nothing runs.
fn stop(p: &mut Proc, c: &Value, grace: Duration, pod: &str) -> bool {
    p.restart_at = None;
    let Some(child) = p.child.as_mut() else {
        return true;
    };
    let now = Instant::now();
    let container = c["name"].as_str().unwrap_or_default();
    let s = p.stopping.get_or_insert_with(|| {
        let pause = if grace.is_zero() {
            Duration::ZERO
        } else {
            pre_stop_pause(c, pod).min(grace)
        };
        tracing::debug!(
            pod,
            container,
            grace_s = grace.as_secs(),
            pause_s = pause.as_secs(),
            "stopping"
        );
        Stopping {
            began: now,
            sigterm_at: now + pause,
            signalled: false,
            killed: false,
        }
    });
    if s.killed {
        return false;
    }
    if grace.is_zero() {
        s.killed = kill_group(child);
        return false;
    }
    if !s.signalled && now >= s.sigterm_at {
        s.signalled = true;
        if !terminate(child) {
            // Gone already (reaped on the next step), or not ours to signal: kill it.
            s.killed = kill_group(child);
            return false;
        }
        tracing::debug!(pod, container, "SIGTERM sent");
    }
    let deadline = (s.began + grace).max(s.sigterm_at + MIN_STOP_WINDOW);
    if s.signalled && now >= deadline {
        tracing::info!(
            pod,
            container,
            grace_s = grace.as_secs(),
            "the grace period ran out; killing the container"
        );
        s.killed = kill_group(child);
    }
    false
}

/// Removes a deleted pod whose containers have all stopped from the store, once its finalizers
/// are done (the kubelet's confirmation; until then it stays Terminating).
fn confirm_deletion(st: &AppState, k: &Key) {
    let _ = st.store.write(k, |cur, _| -> Result<Write, ApiError> {
        let done = cur.is_some_and(|p| {
            !p["metadata"]["deletionTimestamp"].is_null()
                && p["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
        });
        Ok(if done { Write::Delete } else { Write::Keep })
    });
}

pub(super) fn resolve_port(c: &Value, port: &Value) -> Option<u16> {
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
pub(super) async fn probe(c: &Value, probe: &Value, ip: &str) -> bool {
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

/// Each probe keeps its own period.
pub(super) fn due(p: &Proc, kind: ProbeKind, spec: &Value) -> bool {
    let period = Duration::from_secs(spec["periodSeconds"].as_u64().unwrap_or(10));
    p.last_probe[kind as usize].is_none_or(|t| t.elapsed() >= period)
}

/// Which of a container's probes: a startup probe holds the other two back until it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// A probe to run: pod uid, container name, container, probe spec, pod IP, which probe.
pub(super) type ProbeTask = (String, String, Value, Value, String, ProbeKind);

/// Start, probe, restart and report every pod bound to one of this kubelet's nodes.
pub(super) async fn run_pods(st: &AppState, inner: &Mutex<Inner>, cfg: &KubeletConfig, dns: &str) {
    for (uid, cname, c, spec, ip, kind) in step(st, inner, cfg, dns) {
        let ok = probe(&c, &spec, &ip).await;
        record_probe(inner, &uid, &cname, &spec, kind, ok);
    }
}

pub(super) fn record_probe(
    inner: &Mutex<Inner>,
    uid: &str,
    cname: &str,
    spec: &Value,
    kind: ProbeKind,
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
    // A failed startup or liveness probe past its threshold kills the container, which then
    // restarts (or not) by the pod's restart policy, as the kubelet does.
    let threshold = spec["failureThreshold"].as_u64().unwrap_or(3) as u32;
    let failures = match kind {
        ProbeKind::Readiness => {
            p.ready = ok;
            return;
        }
        ProbeKind::Startup if ok => {
            p.started_ok = true;
            // Readiness and liveness start now, not a period later.
            p.last_probe = [None; 3];
            return;
        }
        ProbeKind::Startup => &mut p.startup_failures,
        ProbeKind::Liveness => &mut p.live_failures,
    };
    *failures = if ok { 0 } else { *failures + 1 };
    if *failures >= threshold
        && let Some(child) = p.child.as_mut()
    {
        kill_group(child);
    }
}

/// Reap exits, (re)start processes and write pod status; returns the probes now due.
pub(super) fn step(
    st: &AppState,
    inner: &Mutex<Inner>,
    cfg: &KubeletConfig,
    dns: &str,
) -> Vec<ProbeTask> {
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
    let powered_off = g.powered_off.clone();
    let mut work = Vec::new();
    for (k, pod) in pods {
        let Some(node) = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| ours.iter().any(|o| o == n) && !powered_off.iter().any(|o| o == n))
            .map(String::from)
        else {
            continue;
        };
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        if deleting && !g.pods.contains_key(&uid) {
            // Nothing of it runs here (never started, or stopped already).
            confirm_deletion(st, &k);
            continue;
        }
        if terminal(&pod) && !deleting {
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
        work.push((k, pod, uid, node, deleting));
    }
    let mut probes: Vec<ProbeTask> = Vec::new();
    let mut stopped: Vec<(String, Key)> = Vec::new();
    for (k, pod, uid, node, deleting) in work {
        let Some((ip, procs)) = g.pods.get_mut(&uid) else {
            continue;
        };
        let ip = ip.clone();
        let policy = pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
            .to_string();
        let grace = grace_period(&pod);
        let mut all_stopped = true;
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or_default().to_string();
            if deleting && !procs.contains_key(&cname) {
                continue;
            }
            let p = procs.entry(cname.clone()).or_insert_with(|| Proc {
                child: None,
                restarts: 0,
                started: String::new(),
                ready: false,
                live_failures: 0,
                started_ok: false,
                startup_failures: 0,
                last_probe: [None; 3],
                restart_at: Some(Instant::now()),
                terminated: None,
                ended: false,
                waiting: None,
                stopping: None,
            });
            let pid = p.child.as_ref().and_then(Child::id);
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                // The container ends with its main process: stop what it left behind.
                if let Some(pid) = pid {
                    kill_pgid(pid);
                }
                // Killed by a signal: 128 + its number, as a shell and container runtimes say.
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(137);
                p.child = None;
                p.ready = false;
                let dir = pod_dir(&cfg.root, &k.namespace, &k.name);
                p.terminated = Some(json!({"exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "message": termination_message(&dir, c, code),
                    "startedAt": p.started, "finishedAt": now()}));
                p.ended = true;
                if p.stopping.is_some() {
                    tracing::debug!(pod = %k.name, container = %cname, code, "stopped");
                }
                let restart =
                    !deleting && (policy == "Always" || (policy == "OnFailure" && code != 0));
                if restart {
                    let backoff = Duration::from_millis(200 * 2u64.pow(p.restarts.min(5)));
                    p.restart_at = Some(Instant::now() + backoff);
                }
            }
            if deleting {
                all_stopped &= stop(p, c, grace, &k.name);
                continue;
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
                        p.ended = false;
                        p.live_failures = 0;
                        p.started_ok = c["startupProbe"].is_null();
                        p.startup_failures = 0;
                        p.last_probe = [None; 3];
                        p.ready = c["readinessProbe"].is_null();
                    }
                    Err(w) => {
                        p.waiting = Some(w);
                        p.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            if p.child.is_some() {
                // Until its startup probe passes, a container gets no other probe.
                let kinds: &[(ProbeKind, &str)] = if p.started_ok {
                    &[
                        (ProbeKind::Readiness, "readinessProbe"),
                        (ProbeKind::Liveness, "livenessProbe"),
                    ]
                } else {
                    &[(ProbeKind::Startup, "startupProbe")]
                };
                for &(kind, key) in kinds {
                    if c[key].is_object() && due(p, kind, &c[key]) {
                        p.last_probe[kind as usize] = Some(Instant::now());
                        probes.push((
                            uid.clone(),
                            cname.clone(),
                            c.clone(),
                            c[key].clone(),
                            ip.clone(),
                            kind,
                        ));
                    }
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
            } else if let Some(t) = p.terminated.as_ref().filter(|_| p.ended) {
                json!({"terminated": t})
            } else {
                json!({"waiting": {"reason": "ContainerCreating"}})
            };
            let last = match &p.terminated {
                Some(t) if !p.ended => json!({"terminated": t}),
                _ => json!({}),
            };
            // A stopping container is not ready: the endpoints (here, DNS) drop its pod at once.
            // Nor is one whose startup probe has not passed yet.
            let ready = p.ready && p.started_ok && p.child.is_some() && !deleting;
            Some(json!({"name": cname, "image": c["image"], "imageID": "", "containerID": p.child.as_ref().and_then(Child::id).map(|id| format!("process://{id}")),
                "ready": ready, "started": p.child.is_some() && p.started_ok, "restartCount": p.restarts, "state": state, "lastState": last}))
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
        if deleting && all_stopped {
            stopped.push((uid, k));
        }
    }
    // Every container of these deleted pods has stopped: forget them and confirm.
    for (uid, k) in stopped {
        g.pods.remove(&uid);
        confirm_deletion(st, &k);
    }
    probes
}
