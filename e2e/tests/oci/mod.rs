//! What the image tests share: building an image with `scripts/build-images.sh`, unpacking an
//! OCI archive as a runtime would (digests checked, layers in order, the config read), and
//! running its entrypoint as a container (PID 1, the image's user, its root file system).

use super::*;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// The directory of the binaries under test: the one `whaleflux-e2e` was built into.
pub(crate) fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_whaleflux-e2e"))
        .parent()
        .expect("binary directory")
        .to_path_buf();
    for bin in ["whaleflux", "whaleflux-worker"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build it with `cargo build -p whaleflux-operator -p whaleflux-worker` \
             (cargo builds only the binaries of the package under test; `cargo nextest run \
             --workspace` builds them too)",
            dir.join(bin).display()
        );
    }
    dir
}

pub(crate) fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the image tests need root (user namespaces are not enough for chroot, bind mounts \
         and files owned by 65532); run them as root, as CI does"
    );
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A directory removed when dropped (after the processes in it are gone).
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "whaleflux-images-{what}-{}-{nanos}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `scripts/build-images.sh` on the debug binaries into `out` with `args`; returns the path
/// of the archive named `archive`.
pub(crate) fn build_image(out: &Path, args: &[&str], archive: &str) -> PathBuf {
    let started = Instant::now();
    let run = output_within(
        Command::new(repo_root().join("scripts/build-images.sh"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(out)
            .args(args),
        None,
        BUILD_LIMIT,
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "scripts/build-images.sh {args:?} failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    eprintln!(
        "scripts/build-images.sh {args:?}: {:.1} s\n{stdout}{stderr}",
        started.elapsed().as_secs_f64()
    );
    let path = out.join(archive);
    assert!(path.is_file(), "{} was not written", path.display());
    path
}

pub(crate) fn sha256(path: &Path) -> String {
    let out = output_within(
        Command::new("sha256sum").arg(path),
        None,
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints the digest")
        .to_string()
}

pub(crate) fn read_json(path: &Path) -> Value {
    let text = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// An image unpacked as a runtime would: its root file system and its config.
pub(crate) struct Image {
    pub(crate) rootfs: PathBuf,
    /// The index's `org.opencontainers.image.ref.name`.
    pub(crate) ref_name: String,
    /// The image config's `config` object (Entrypoint, Cmd, User, Env, ...).
    pub(crate) config: Value,
}

impl Image {
    /// Unpacks the OCI archive into `dir`: checks the layout and every blob's digest, and
    /// extracts the layers in order into `dir/rootfs`.
    pub(crate) fn unpack(archive: &Path, dir: &Path) -> Self {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&layout).expect("layout dir");
        fs::create_dir_all(&rootfs).expect("rootfs dir");
        untar(archive, &layout, false);
        let oci_layout = read_json(&layout.join("oci-layout"));
        assert_eq!(oci_layout["imageLayoutVersion"], "1.0.0", "oci-layout");
        let index = read_json(&layout.join("index.json"));
        let manifests = index["manifests"].as_array().expect("index.manifests");
        assert_eq!(manifests.len(), 1, "one image in {}", archive.display());
        let ref_name = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .expect("the image's ref name")
            .to_string();
        let blob = |desc: &Value| -> PathBuf {
            let digest = desc["digest"].as_str().expect("descriptor digest");
            let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
            let path = layout.join("blobs/sha256").join(hex);
            assert_eq!(sha256(&path), hex, "blob {digest} matches its digest");
            assert_eq!(
                fs::metadata(&path).expect("blob").len(),
                desc["size"].as_u64().expect("descriptor size"),
                "blob {digest} has its descriptor's size"
            );
            path
        };
        assert_eq!(
            manifests[0]["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let manifest = read_json(&blob(&manifests[0]));
        let image_config = read_json(&blob(&manifest["config"]));
        assert_eq!(image_config["os"], "linux");
        let layers = manifest["layers"].as_array().expect("manifest.layers");
        let diff_ids = image_config["rootfs"]["diff_ids"]
            .as_array()
            .expect("rootfs.diff_ids");
        assert!(!layers.is_empty(), "the image has layers");
        assert_eq!(layers.len(), diff_ids.len(), "one diff_id a layer");
        for layer in layers {
            let media = layer["mediaType"].as_str().expect("layer media type");
            let gzip = match media {
                "application/vnd.oci.image.layer.v1.tar" => false,
                "application/vnd.oci.image.layer.v1.tar+gzip" => true,
                other => panic!("unexpected layer media type {other}"),
            };
            // Single-layer images from scratch: no whiteouts to apply.
            untar(&blob(layer), &rootfs, gzip);
        }
        Self {
            rootfs,
            ref_name,
            config: image_config["config"].clone(),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Vec<String> {
        self.config[key]
            .as_array()
            .unwrap_or_else(|| panic!("config.{key} is a list: {}", self.config))
            .iter()
            .map(|v| v.as_str().expect("string").to_string())
            .collect()
    }

    /// config.User as numbers; it must not be root.
    pub(crate) fn user(&self) -> (u32, u32) {
        let user = self.config["User"].as_str().expect("config.User is set");
        let (uid, gid) = user
            .split_once(':')
            .unwrap_or_else(|| panic!("config.User {user:?} is uid:gid"));
        let uid: u32 = uid.parse().expect("numeric uid");
        let gid: u32 = gid.parse().expect("numeric gid");
        assert_ne!(uid, 0, "the image runs as root");
        assert_ne!(gid, 0, "the image runs in group root");
        (uid, gid)
    }

    pub(crate) fn label(&self, name: &str) -> &str {
        self.config["Labels"][name]
            .as_str()
            .unwrap_or_else(|| panic!("label {name} is set: {}", self.config["Labels"]))
    }

    /// The checks both images pass: a non-root numeric user the image's own /etc/passwd
    /// names, an entrypoint that is an executable in the image, a working directory the user
    /// owns, /tmp writable by all, and the OCI labels.
    pub(crate) fn check_common(&self, title: &str) {
        let (uid, gid) = self.user();
        let passwd = fs::read_to_string(self.rootfs.join("etc/passwd")).expect("etc/passwd");
        assert!(
            passwd
                .lines()
                .any(|l| l.split(':').nth(2) == Some(&uid.to_string())),
            "/etc/passwd names uid {uid}:\n{passwd}"
        );
        let group = fs::read_to_string(self.rootfs.join("etc/group")).expect("etc/group");
        assert!(
            group
                .lines()
                .any(|l| l.split(':').nth(2) == Some(&gid.to_string())),
            "/etc/group names gid {gid}:\n{group}"
        );
        let entrypoint = self.strings("Entrypoint");
        assert_eq!(entrypoint.len(), 1, "exec form, no shell: {entrypoint:?}");
        let exe = self.in_rootfs(&entrypoint[0]);
        let mode = fs::metadata(&exe)
            .unwrap_or_else(|e| panic!("entrypoint {}: {e}", entrypoint[0]))
            .permissions();
        assert_eq!(mode.mode() & 0o111, 0o111, "entrypoint is executable");
        let wd = self.config["WorkingDir"].as_str().expect("WorkingDir");
        let wd_meta = fs::metadata(self.in_rootfs(wd)).expect("working directory exists");
        assert_eq!((wd_meta.uid(), wd_meta.gid()), (uid, gid), "{wd} owner");
        let tmp = fs::metadata(self.rootfs.join("tmp")).expect("/tmp");
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp mode");
        assert!(
            !self.rootfs.join("bin/sh").exists(),
            "no shell in a minimal image"
        );
        assert_eq!(self.label("org.opencontainers.image.title"), title);
        assert_eq!(
            self.label("org.opencontainers.image.version"),
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            self.label("org.opencontainers.image.licenses"),
            env!("CARGO_PKG_LICENSE")
        );
        for label in [
            "org.opencontainers.image.revision",
            "org.opencontainers.image.source",
            "org.opencontainers.image.created",
        ] {
            assert!(!self.label(label).is_empty(), "{label} is set");
        }
        assert_eq!(self.config["StopSignal"], "SIGTERM");
    }

    pub(crate) fn in_rootfs(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        self.strings("Env")
            .into_iter()
            .map(|e| {
                let (k, v) = e.split_once('=').expect("Env entries are KEY=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// The entrypoint with `args`, as a runtime starts it: in new mount and PID namespaces
    /// (the entrypoint is PID 1), `binds` (host path, path in the image) bind-mounted read-only,
    /// /proc mounted, the root changed to the image's root file system, the config's working
    /// directory, user and environment (plus `env`).
    pub(crate) fn command(
        &self,
        args: &[&str],
        binds: &[(&Path, &str)],
        env: &[(&str, &str)],
    ) -> Command {
        let (uid, gid) = self.user();
        let wd = self.config["WorkingDir"].as_str().expect("WorkingDir");
        // The runtime's part runs on the host (util-linux's unshare, mount); only the
        // entrypoint runs from the image.
        let script = r#"set -e
root=$1; wd=$2; uid=$3; gid=$4; n=$5; shift 5
while [ "$n" -gt 0 ]; do
  mount --bind -o ro "$1" "$root$2"
  shift 2; n=$((n - 1))
done
exec unshare --root "$root" --wd "$wd" --mount-proc=/proc --setgid "$gid" --setuid "$uid" -- "$@"
"#;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--fork", "--kill-child", "--"])
            .args(["sh", "-c", script, "sh"])
            .arg(&self.rootfs)
            .arg(wd)
            .arg(uid.to_string())
            .arg(gid.to_string())
            .arg(binds.len().to_string());
        for (host, in_image) in binds {
            let target = self.in_rootfs(in_image);
            fs::create_dir_all(target.parent().expect("mount point's directory")).expect("mkdir");
            if host.is_dir() {
                fs::create_dir_all(&target).expect("mount point");
            } else {
                fs::write(&target, b"").expect("mount point");
            }
            cmd.arg(host).arg(in_image);
        }
        cmd.args(self.strings("Entrypoint")).args(args);
        // The image's environment only, as in a container; its PATH also finds the host's
        // unshare, sh and mount that set the container up.
        cmd.env_clear();
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// A minimal blocking HTTP/1.1 POST of a JSON `body`; (status, response body).
pub(crate) fn http_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request sent");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("response read");
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {buf}"));
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

/// Extracts `archive` into `dir` as root keeping owners and modes (GNU tar).
pub(crate) fn untar(archive: &Path, dir: &Path, gzip: bool) {
    let mut cmd = Command::new("tar");
    cmd.args(["--extract", "--numeric-owner", "--same-permissions"]);
    if gzip {
        cmd.arg("--gzip");
    }
    cmd.arg("--file").arg(archive).arg("--directory").arg(dir);
    let out = output_within(&mut cmd, None, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "tar -x {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A container started by [`Image::command`]; SIGKILLed (with all its PID namespace) when
/// dropped.
pub(crate) struct Container {
    /// The `unshare --fork` on the host; its child is the container's PID 1.
    pub(crate) runtime: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Container {
    /// Starts `cmd` with its output in `log`.
    pub(crate) fn start(mut cmd: Command, log: &Path) -> Self {
        let file = fs::File::create(log).expect("log file");
        let runtime = cmd
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
        Self {
            runtime: Some(runtime),
            log: log.to_path_buf(),
        }
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, once the container has exited.
    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        self.runtime
            .as_mut()
            .expect("container")
            .try_wait()
            .expect("wait")
    }

    /// The container's PID 1 as seen from the host: the child of `unshare --fork` that runs
    /// `exe_name` (once the exec chain has reached it).
    pub(crate) fn pid1(&mut self, exe_name: &str) -> i32 {
        let parent = self.runtime.as_ref().expect("container").id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_wait() {
                panic!("the container exited ({status}):\n{}", self.log());
            }
            for entry in fs::read_dir("/proc").expect("/proc").flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                // pid (comm) state ppid ...: comm may hold spaces; split after the last ')'.
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    continue;
                };
                let ppid = rest.split_whitespace().nth(1);
                if ppid != Some(&parent.to_string()) {
                    continue;
                }
                let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if exe.file_name().is_some_and(|n| n == exe_name) {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {exe_name} process under the container's runtime:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks from the host that `pid` is PID 1 of its namespace and runs as `uid`:`gid`
    /// with no supplementary groups.
    pub(crate) fn assert_pid1_as(&self, pid: i32, uid: u32, gid: u32) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| -> Vec<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            field("NSpid").last().map(String::as_str),
            Some("1"),
            "the entrypoint is PID 1 in its namespace:\n{status}"
        );
        assert!(
            field("Uid").iter().all(|u| *u == uid.to_string()),
            "runs as uid {uid}:\n{status}"
        );
        assert!(
            field("Gid").iter().all(|g| *g == gid.to_string()),
            "runs as gid {gid}:\n{status}"
        );
        assert!(field("Groups").is_empty(), "no supplementary groups");
    }

    /// Sends `signal` to `pid` (the container's PID 1, from the host, as a runtime does).
    pub(crate) fn signal(&self, pid: i32, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a process of this container, still running (its
        // parent, our child, has not exited: the runtime reaps it only after it exits).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits up to `limit` for the container to exit.
    pub(crate) fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `GET path` on `addr` until it answers 200, failing if the container exits or
    /// `limit` passes.
    pub(crate) fn wait_for_200(&mut self, addr: &str, path: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some((200, _)) = http_get(addr, path) {
                return started.elapsed();
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "the container exited ({status}) before {path} answered:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < limit,
                "{path} on {addr} did not answer 200 within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut runtime) = self.runtime.take() {
            // unshare --kill-child: its death SIGKILLs PID 1, and with it the namespace.
            let _ = runtime.kill();
            let _ = runtime.wait();
        }
    }
}
