//! WhaleFlux test equipment: an in-memory Kubernetes API server on loopback that real `kubectl`
//! and kube-rs talk to, so the operator can be tested end to end without a cluster.
//!
//! Start one with [`ApiServer::start`]; it serves plain HTTP on 127.0.0.1, writes a kubeconfig,
//! and hands back [`Faults`] (inject errors, delays, closed watches, expired versions) and the
//! [`Audit`] log (every request, as RBAC sees it). See `e2e/README.md` for what it implements
//! and where it differs from kube-apiserver.

pub mod dns;
pub mod error;
pub mod fake_nvml;
pub mod faults;
pub mod kubelet;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod store;
pub mod table;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, broadcast, oneshot};

pub use faults::{Audit, AuditEvent, FaultAction, Faults, RequestMatch};
pub use kubelet::{Kubelet, KubeletConfig, NodeSpec};
pub use store::{Key, Store};

use registry::Registry;
use server::AppState;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding the loopback port failed.
    #[error("binding 127.0.0.1:{port}: {source}")]
    Bind {
        /// Requested port (0 = any).
        port: u16,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Writing the kubeconfig failed.
    #[error("writing kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Where it was being written.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// The bearer token the generated kubeconfig uses.
pub const ADMIN_TOKEN: &str = "whaleflux-e2e-admin";
/// The user that token authenticates as.
pub const ADMIN_USER: &str = "admin";

/// Options for [`ApiServer`]; the defaults suit tests.
#[derive(Debug, Clone)]
pub struct Builder {
    port: u16,
    tokens: HashMap<String, String>,
    bookmark_interval: Duration,
    history: usize,
    kubeconfig: Option<PathBuf>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            port: 0,
            tokens: HashMap::from([(ADMIN_TOKEN.to_string(), ADMIN_USER.to_string())]),
            bookmark_interval: Duration::from_secs(1),
            history: 1000,
            kubeconfig: None,
        }
    }
}

impl Builder {
    /// Listen on this port (0 = any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Accept `token` as a bearer token for `user` (so tests can act as the operator's
    /// service account and check its requests in the audit log).
    pub fn token(mut self, token: &str, user: &str) -> Self {
        self.tokens.insert(token.into(), user.into());
        self
    }

    /// How often watches that allow bookmarks get one (kube-apiserver: about a minute).
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = every;
        self
    }

    /// How many events are kept for watches resuming from a resourceVersion.
    pub fn history(mut self, events: usize) -> Self {
        self.history = events;
        self
    }

    /// Write the kubeconfig here instead of a fresh temporary folder.
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// Bind, seed the standard namespaces, write the kubeconfig and serve in the background.
    pub async fn start(self) -> Result<ApiServer, StartError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|source| StartError::Bind {
                port: self.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            port: self.port,
            source,
        })?;
        let store = Arc::new(Store::new(self.history));
        let state = Arc::new(AppState {
            store: store.clone(),
            registry: Arc::new(Registry::with_builtins()),
            faults: Arc::new(Faults::new(store.clone())),
            audit: Arc::new(Audit::default()),
            tokens: self.tokens,
            bookmark_interval: self.bookmark_interval,
            gc: Notify::new(),
            address: addr.to_string(),
            log_roots: std::sync::Mutex::new(Vec::new()),
        });
        seed(&state);
        let temp = match &self.kubeconfig {
            Some(_) => None,
            None => Some(
                TempDir::new(addr.port()).map_err(|source| StartError::Kubeconfig {
                    path: std::env::temp_dir(),
                    source,
                })?,
            ),
        };
        let kubeconfig = match (&self.kubeconfig, &temp) {
            (Some(p), _) => p.clone(),
            (None, Some(t)) => t.0.join("kubeconfig"),
            (None, None) => std::env::temp_dir().join("kubeconfig"),
        };
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr)).map_err(|source| {
            StartError::Kubeconfig {
                path: kubeconfig.clone(),
                source,
            }
        })?;
        let (tx, rx) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(state.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = served.await {
                tracing::error!("e2e API server stopped: {e}");
            }
        });
        let gc_state = state.clone();
        let gc = tokio::spawn(async move {
            let mut events = gc_state.store.subscribe();
            // Batches of changes, looking only at what they touch (so the collector's work grows
            // with the changes, not the store); a full pass when it missed changes (lagged) and
            // every 30 s as a safety net.
            let mut full_pass = tokio::time::interval(Duration::from_secs(30));
            loop {
                let mut batch = Vec::new();
                let mut full = false;
                tokio::select! {
                    // Writes that may free something nudge the collector; their events say what.
                    _ = gc_state.gc.notified() => {}
                    _ = full_pass.tick() => full = true,
                    ev = events.recv() => match ev {
                        Ok(ev) => batch.push(ev),
                        Err(_) => {
                            full = true;
                            events = gc_state.store.subscribe();
                        }
                    },
                }
                loop {
                    match events.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => full = true,
                        Err(_) => break,
                    }
                }
                if full {
                    server::collect_garbage(&gc_state);
                } else {
                    server::collect_garbage_after(&gc_state, &batch);
                }
            }
        });
        tracing::info!(%addr, "e2e API server listening");
        Ok(ApiServer {
            addr,
            kubeconfig,
            state,
            shutdown: Some(tx),
            gc,
            _temp: temp,
        })
    }
}

fn seed(st: &AppState) {
    let Some(info) = st.registry.get("", "v1", "namespaces") else {
        return;
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let key = Key {
            group: String::new(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: ns.into(),
        };
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let _ = st
            .store
            .write(&key, |_, _| -> Result<store::Write, error::ApiError> {
                Ok(store::Write::Put(obj))
            });
    }
    let _ = info;
}

/// Runs `cmd` to completion like `Command::output`, feeding it `stdin`, and panics (after
/// killing it) when it runs longer than `limit`: a hung child fails the test instead of hanging
/// the suite. Output is drained while it runs, so a chatty child never blocks on a full pipe.
pub fn output_within(
    cmd: &mut std::process::Command,
    stdin: Option<&str>,
    limit: Duration,
) -> std::process::Output {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    if let (Some(input), Some(mut s)) = (stdin, child.stdin.take()) {
        let input = input.to_string();
        std::thread::spawn(move || {
            let _ = s.write_all(input.as_bytes());
        });
    }
    fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    }
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} ran longer than {limit:?}");
            }
        }
    };
    let joined = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    std::process::Output {
        status,
        stdout: joined(out),
        stderr: joined(err),
    }
}

/// GET `path` from `addr` over plain HTTP/1.1: the status and body, `None` when nothing
/// answers within 10 s.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], "", Duration::from_secs(10)).map(|(c, _, b)| (c, b))
}

/// One HTTP/1.1 exchange on a fresh connection (a JSON body, `headers` added): the status, the
/// head lowercased and the body; `None` when nothing listens or no full answer comes within
/// `wait`.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    wait: Duration,
) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    Some((code, head.to_ascii_lowercase(), body.to_string()))
}

/// A kubeconfig for the server at `addr`, authenticating as [`ADMIN_USER`].
pub fn kubeconfig_yaml(addr: SocketAddr) -> String {
    kubeconfig_for(addr, ADMIN_USER, ADMIN_TOKEN)
}

/// A kubeconfig for the server at `addr`, authenticating as `user` with bearer `token` (register
/// the token with [`Builder::token`]).
pub fn kubeconfig_for(addr: SocketAddr, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: whaleflux-e2e\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: whaleflux-e2e\n  context:\n    cluster: whaleflux-e2e\n    user: {user}\n    namespace: default\n\
         current-context: whaleflux-e2e\n"
    )
}

#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(port: u16) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("whaleflux-e2e-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running in-memory API server. Dropping it stops serving.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    gc: tokio::task::JoinHandle<()>,
    _temp: Option<TempDir>,
}

impl ApiServer {
    /// Start with defaults on a free port.
    pub async fn start() -> Result<Self, StartError> {
        Builder::default().start().await
    }

    /// Options.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The kubeconfig written for this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig next to [`ApiServer::kubeconfig`] that authenticates with `token`
    /// (registered with [`Builder::token`]) and returns its path.
    pub fn write_kubeconfig(&self, token: &str, file: &str) -> std::io::Result<PathBuf> {
        let user = self
            .state
            .tokens
            .get(token)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        let path = self.kubeconfig.with_file_name(file);
        std::fs::write(&path, kubeconfig_for(self.addr, &user, token))?;
        Ok(path)
    }

    /// Fault injection.
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Fault injection, for a task that outlives this borrow (e.g. one injecting faults on a
    /// timer).
    pub fn faults_handle(&self) -> Arc<Faults> {
        self.state.faults.clone()
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.state.audit
    }

    /// Start a process kubelet: register `config.nodes`, run the StatefulSet controller and
    /// the scheduler, and run bound pods as local processes (under `config.root`, or a folder
    /// next to the kubeconfig when empty).
    pub async fn kubelet(&self, mut config: KubeletConfig) -> std::io::Result<Kubelet> {
        if config.root.as_os_str().is_empty() {
            config.root = self.kubeconfig.with_file_name("kubelet");
        }
        Kubelet::start(self.state.clone(), config).await
    }

    /// Direct access to stored objects (reads in tests).
    pub fn store(&self) -> &Store {
        &self.state.store
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.gc.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.state.faults.close_watches();
    }
}

/// The SmolLM2 GGUF tests load, from `$WHALEFLUX_TEST_MODEL`; a test without it fails saying
/// how to get it.
pub fn test_model() -> PathBuf {
    let path = std::env::var_os("WHALEFLUX_TEST_MODEL").unwrap_or_else(|| {
        panic!(
            "WHALEFLUX_TEST_MODEL is not set: export WHALEFLUX_TEST_MODEL=$(scripts/fetch-model.sh)"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "WHALEFLUX_TEST_MODEL={} is not a file; run scripts/fetch-model.sh",
        path.display()
    );
    path
}
