//! Starting a container as a local process: its environment (values, downward API, ConfigMap
//! and Secret keys), its volumes as folders with mount paths rewritten to them, and its
//! service-account kubeconfig.

use super::*;

/// `$(VAR)` expansion of command and args, as the kubelet does.
pub(super) fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

pub(super) fn field_ref(pod: &Value, path: &str, ip: &str) -> Option<String> {
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
pub(super) fn container_env(
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
pub(super) fn mounts(
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
pub(super) fn rewrite(s: &str, mounts: &[(String, PathBuf)]) -> String {
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

pub(super) fn spawn(
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
    // The program an image maps to lives on this machine, not in the container's file system:
    // the mounts do not apply to it (a worker built under /tmp must not become the pod's /tmp).
    let mut program = None;
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
            Some(p) => program = Some(p.display().to_string()),
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
    let mut mounts = mounts(st, pod, c, &dir).map_err(|m| ("ContainerCreating".to_string(), m))?;
    // The termination message file, empty at each start, where the container expects it.
    let message = termination_log(&dir, c);
    let io = |e: std::io::Error| ("RunContainerError".to_string(), e.to_string());
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::write(&message, "").map_err(io)?;
    mounts.push((termination_message_path(c).to_string(), message));
    let argv: Vec<String> = program
        .into_iter()
        .chain(argv.iter().map(|a| rewrite(a, &mounts)))
        .collect();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, rewrite(&v, &mounts)))
        .collect();
    let mut env = env;
    // What the node's runtime adds (its NVML), unless the pod sets it.
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    for (k, v) in cfg
        .nodes
        .iter()
        .filter(|n| n.name == node)
        .flat_map(|n| &n.env)
    {
        if !env.iter().any(|(e, _)| e == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    let log_path = container_log(&dir, c);
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

/// Where the container writes its termination message (`terminationMessagePath`, by default
/// `/dev/termination-log`).
pub(super) fn termination_message_path(c: &Value) -> &str {
    c["terminationMessagePath"]
        .as_str()
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH)
}

/// Kubernetes' default `terminationMessagePath`.
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// A container's combined stdout and stderr.
pub(super) fn container_log(dir: &Path, c: &Value) -> PathBuf {
    dir.join(format!("{}.log", c["name"].as_str().unwrap_or("c")))
}

/// The file standing for a container's termination message path.
pub(super) fn termination_log(dir: &Path, c: &Value) -> PathBuf {
    dir.join(format!(
        "{}.termination-log",
        c["name"].as_str().unwrap_or("c")
    ))
}

/// A container's termination message after it exited with `code`: what it wrote to its
/// termination message file (at most 4 KiB), or with `FallbackToLogsOnError` and a failure,
/// the end of its log (the last 80 lines, at most 2 KiB), as the kubelet does.
pub(super) fn termination_message(dir: &Path, c: &Value, code: i32) -> String {
    let written = std::fs::read(termination_log(dir, c)).unwrap_or_default();
    if !written.is_empty() {
        let n = written.len().min(4096);
        return String::from_utf8_lossy(&written[..n]).into_owned();
    }
    if code == 0 || c["terminationMessagePolicy"] != json!("FallbackToLogsOnError") {
        return String::new();
    }
    let log = std::fs::read(container_log(dir, c)).unwrap_or_default();
    let text = String::from_utf8_lossy(&log[log.len().saturating_sub(2048)..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// The pod's service-account credentials. A cluster mounts a token and CA under
/// `/var/run/secrets/kubernetes.io/serviceaccount` for in-cluster config; processes here cannot
/// see that path, so the kubelet writes a kubeconfig in the pod's folder instead (clients read
/// `KUBECONFIG` first) whose token names the service account. `None` when the pod opts out with
/// `automountServiceAccountToken: false`.
pub(super) fn service_account_kubeconfig(
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
