//! Real `whaleflux-worker` processes on loopback for the tests that drive the binary from
//! outside: one whole-model worker, or a sharded group configured as `whaleflux run` does it;
//! and a plain HTTP/1.1 client over a raw socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use whaleflux_crds::{PeerAddress, WorkerConfig, WorkerModel, WorkerPorts, WorkerServing};
use whaleflux_worker::shard::fixed_plan;

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One HTTP/1.1 exchange on a fresh connection: status, head (lowercased) and body; `None`
/// when nothing listens or the answer is cut. Waits at most 120 s.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String, String)> {
    whaleflux_e2e::http_request(addr, method, path, headers, body, Duration::from_secs(120))
}

/// Starts a streamed completion of `max_tokens` on `addr` in a thread: the receiver hears when
/// the first token arrived; the thread returns the whole raw response and when it ended.
pub fn streamed_completion(
    addr: &str,
    max_tokens: usize,
    headers: &[(&str, &str)],
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<(String, Instant)>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = addr.to_string();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let handle = std::thread::spawn(move || {
        let body = format!(
            r#"{{"model": "smollm2", "prompt": "Once upon a time", "max_tokens": {max_tokens}, "temperature": 0, "stream": true}}"#
        );
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("request");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&out).contains("\"text\"") {
                told = true;
                let _ = tx.send(());
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), Instant::now())
    });
    (rx, handle)
}

/// Send `sig` to a process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Waits up to `within` for `child` to exit by itself; `log` is shown when it does not.
pub fn wait_exit(child: &mut Child, within: Duration, log: impl Fn() -> String) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("worker status") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not stop in {within:?}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A whole-model worker process on loopback (SmolLM2 served as `smollm2`), killed when dropped.
pub struct WorkerProc {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT` of its HTTP server.
    pub addr: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl WorkerProc {
    /// Starts `whaleflux-worker serve --model` with `args` added (1 thread, context 256) and
    /// `env` set, logging to a file in `dir`; returns once `/healthz` answers.
    pub fn start(dir: &Path, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = dir.join(format!("worker-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whaleflux-worker"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--threads", "1", "--ctx", "256", "--model-name", "smollm2"])
            .arg("--model")
            .arg(super::model_path())
            .args(args)
            .env_remove("WHALEFLUX_NVML_LIBRARY")
            .env_remove("WHALEFLUX_API_KEY")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let w = Self {
            child: cmd.spawn().expect("whaleflux-worker starts"),
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        w.wait_for("/healthz answers", |w| w.get("/healthz").is_some());
        w
    }

    /// The body of a 200 answer to GET `path`.
    pub fn get(&self, path: &str) -> Option<String> {
        http(&self.addr, "GET", path, &[], "")
            .filter(|(code, _, _)| *code == 200)
            .map(|(_, _, body)| body)
    }

    /// What the worker has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to `within`) for the worker to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let log = self.log.clone();
        wait_exit(&mut self.child, within, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }

    /// Its `/metrics`.
    pub fn metrics(&self) -> String {
        self.get("/metrics").unwrap_or_default()
    }

    /// Waits up to 60 s for `ok`.
    pub fn wait_for(&self, what: &str, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; /metrics:\n{}\nlog:\n{}",
                self.metrics(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process's config of a `tp` x `pp` group: stage-major, one per TP rank when
/// `tp_processes`, else one per stage (as `local_ranks` + `for_local_process` lay them out).
pub fn configs(tp: usize, pp: usize, tp_processes: bool, timeout_ms: i64) -> Vec<WorkerConfig> {
    let plan = fixed_plan("smollm2-135m", 30, tp, pp);
    let ranks: Vec<(i32, Option<i32>)> = (0..pp as i32)
        .flat_map(|s| {
            let rs: Vec<Option<i32>> = if tp_processes {
                (0..tp as i32).map(Some).collect()
            } else {
                vec![None]
            };
            rs.into_iter().map(move |r| (s, r))
        })
        .collect();
    let peers: Vec<PeerAddress> = ranks
        .iter()
        .map(|&(stage, tp_rank)| PeerAddress {
            stage,
            tp_rank,
            host: "127.0.0.1".into(),
            port: i32::from(free_port()),
        })
        .collect();
    ranks
        .iter()
        .zip(&peers)
        .map(|(&(stage, tp_rank), p)| WorkerConfig {
            deployment: "smollm2".into(),
            model: WorkerModel {
                path: super::model_path().display().to_string(),
                served_name: "smollm2".into(),
                sha256: None,
            },
            plan: plan.clone(),
            group: 0,
            stage: Some(stage),
            tp_rank,
            peers: peers.clone(),
            ports: WorkerPorts {
                http: i32::from(free_port()),
                peer: p.port,
            },
            serving: WorkerServing {
                max_context_length: 512,
                max_concurrent_sequences: 4,
                max_queue: 16,
            },
            threads: 1,
            peer_timeout_ms: timeout_ms,
            formation_timeout_ms: timeout_ms,
        })
        .collect()
}

/// The group secret every spawned worker gets.
pub const GROUP_SECRET: &str = "test-secret";

/// The processes of one group, killed when dropped.
pub struct Group {
    /// One per config, in order.
    pub procs: Vec<Child>,
    dir: PathBuf,
}

impl Group {
    /// What worker `i` has logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("worker-{i}.log"))).unwrap_or_default()
    }

    /// Waits (up to `within`) for worker `i` to exit by itself.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let log = self.dir.join(format!("worker-{i}.log"));
        wait_exit(&mut self.procs[i], within, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    }

    /// Starts a process per config (`args` added to each).
    pub fn spawn(cfgs: &[WorkerConfig], name: &str, args: &[&str]) -> Group {
        let which: Vec<usize> = (0..cfgs.len()).collect();
        Self::spawn_only(cfgs, name, args, &which)
    }

    /// Starts the processes of the configs at `which` only (`procs` in that order).
    pub fn spawn_only(cfgs: &[WorkerConfig], name: &str, args: &[&str], which: &[usize]) -> Group {
        let dir = std::env::temp_dir().join(format!("wf-group-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut g = Group {
            procs: Vec::new(),
            dir,
        };
        g.spawn_more(cfgs, args, which);
        g
    }

    /// Starts the processes of the configs at `which` too (appended to `procs`).
    pub fn spawn_more(&mut self, cfgs: &[WorkerConfig], args: &[&str], which: &[usize]) {
        for &i in which {
            let f = self.dir.join(format!("worker-{i}.json"));
            std::fs::write(&f, serde_json::to_vec(&cfgs[i]).expect("json")).expect("write");
            // Logs go to a file: a pipe nobody reads while the worker runs would fill and
            // block it.
            let log = std::fs::File::create(self.dir.join(format!("worker-{i}.log"))).expect("log");
            let child = Command::new(env!("CARGO_BIN_EXE_whaleflux-worker"))
                .args(["serve", "--host", "127.0.0.1", "--config"])
                .arg(&f)
                .args(args)
                .env("WHALEFLUX_GROUP_SECRET", GROUP_SECRET)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn worker");
            self.procs.push(child);
        }
    }

    /// Waits until every worker is ready, showing their logs when one is not.
    pub fn wait_ready(&self, cfgs: &[WorkerConfig]) {
        for (i, c) in cfgs.iter().enumerate() {
            let addr = format!("127.0.0.1:{}", c.ports.http);
            let t = Instant::now();
            while http(&addr, "GET", "/readyz", &[], "").map(|r| r.0) != Some(200) {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "worker {i} ({addr}) not ready within 60 s; its log:\n{}",
                    self.log(i)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
