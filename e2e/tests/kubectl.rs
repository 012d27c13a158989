//! The real `kubectl` (v1.32) against the in-memory API server: apply (client- and
//! server-side), get (table, YAML, watch), describe, explain, scale, patch, delete with
//! finalizers, wait, and kube-apiserver-shaped errors for the committed invalid manifests.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use whaleflux_e2e::ApiServer;

const STEP: Duration = Duration::from_secs(60);

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
        .display()
        .to_string()
}

/// Runs kubectl with the server's kubeconfig and a private discovery cache.
struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(server: &ApiServer) -> Self {
        let cache = server.kubeconfig().with_file_name("kubectl-cache");
        Self {
            kubeconfig: server.kubeconfig().to_path_buf(),
            cache,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args);
        c.env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Out {
        let child = self
            .command(args)
            .spawn()
            .expect("kubectl is installed on these machines (see DESIGN.md)");
        let out = tokio::time::timeout(STEP, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in {STEP:?}"))
            .expect("kubectl ran");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run and require success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Run and require failure; returns stderr.
    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            !out.ok,
            "kubectl {args:?} should have failed:\n{}",
            out.stdout
        );
        out.stderr
    }
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(180), test)
        .await
        .expect("test timed out");
}

async fn with_examples() -> (ApiServer, Kubectl) {
    let server = ApiServer::start().await.expect("server starts");
    let k = Kubectl::new(&server);
    let out = k.ok(&["apply", "-f", &repo("crds/manifests")]).await;
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/llmdeployments.whaleflux.io created"
        ),
        "{out}"
    );
    let out = k.ok(&["apply", "-f", &repo("examples")]).await;
    assert!(
        out.contains("llmdeployment.whaleflux.io/smollm2 created"),
        "{out}"
    );
    assert!(
        out.contains("gpupool.whaleflux.io/rtx4090-pcie created"),
        "{out}"
    );
    (server, k)
}

fn write(server: &ApiServer, name: &str, text: &str) -> String {
    let path = server.kubeconfig().with_file_name(name);
    std::fs::write(&path, text).expect("writing manifest");
    path.display().to_string()
}

#[tokio::test]
async fn apply_client_side_then_get_table_yaml_and_reapply() {
    bounded(async {
        let (server, k) = with_examples().await;
        let table = k.ok(&["get", "llmd"]).await;
        let header = table.lines().next().unwrap_or_default();
        for col in [
            "NAME", "MODEL", "TP", "PP", "REPLICAS", "READY", "PHASE", "AGE",
        ] {
            assert!(
                header.split_whitespace().any(|h| h == col),
                "column {col} in {header:?}"
            );
        }
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("smollm2") && l.contains("smollm2-135m")),
            "{table}"
        );
        let pools = k.ok(&["get", "gpool", "-o", "name"]).await;
        assert_eq!(
            pools.lines().collect::<Vec<_>>(),
            [
                "gpupool.whaleflux.io/h100-nvlink",
                "gpupool.whaleflux.io/rtx4090-pcie"
            ]
        );
        let yaml = k.ok(&["get", "llmd", "smollm2", "-o", "yaml"]).await;
        assert!(
            yaml.contains("restartBudget: 5"),
            "schema defaults are applied:\n{yaml}"
        );
        assert!(yaml.contains("generation: 1"), "{yaml}");
        let again = k
            .ok(&["apply", "-f", &repo("examples/smollm2-135m.yaml")])
            .await;
        assert!(again.contains("unchanged"), "{again}");
        let text = std::fs::read_to_string(repo("examples/smollm2-135m.yaml")).expect("example");
        let changed = write(
            &server,
            "smollm2-3.yaml",
            &text.replace("replicas: 1", "replicas: 3"),
        );
        let out = k.ok(&["apply", "-f", &changed]).await;
        assert!(
            out.contains("llmdeployment.whaleflux.io/smollm2 configured"),
            "{out}"
        );
        let got = k
            .ok(&[
                "get",
                "llmd",
                "smollm2",
                "-o",
                "jsonpath={.spec.replicas} {.metadata.generation}",
            ])
            .await;
        assert_eq!(got, "3 2");
        let crds = k.ok(&["get", "crd"]).await;
        assert!(
            crds.contains("llmdeployments.whaleflux.io") && crds.contains("CREATED AT"),
            "{crds}"
        );
    })
    .await;
}

#[tokio::test]
async fn apply_server_side_with_conflicts_and_force() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let k = Kubectl::new(&server);
        let out = k
            .ok(&["apply", "--server-side", "-f", &repo("crds/manifests")])
            .await;
        assert!(out.contains("serverside-applied"), "{out}");
        let out = k
            .ok(&["apply", "--server-side", "-f", &repo("examples")])
            .await;
        assert!(
            out.contains("llmdeployment.whaleflux.io/smollm2 serverside-applied"),
            "{out}"
        );
        k.ok(&[
            "patch",
            "llmd",
            "smollm2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":4}}"#,
        ])
        .await;
        let err = k
            .fails(&[
                "apply",
                "--server-side",
                "-f",
                &repo("examples/smollm2-135m.yaml"),
            ])
            .await;
        assert!(
            err.contains("Apply failed with 1 conflict")
                && err.contains("kubectl-patch: .spec.replicas"),
            "{err}"
        );
        k.ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &repo("examples/smollm2-135m.yaml"),
        ])
        .await;
        let got = k
            .ok(&["get", "llmd", "smollm2", "-o", "jsonpath={.spec.replicas}"])
            .await;
        assert_eq!(got, "1");
        let managed = k
            .ok(&[
                "get",
                "llmd",
                "smollm2",
                "--show-managed-fields",
                "-o",
                "jsonpath={.metadata.managedFields[*].manager}",
            ])
            .await;
        assert!(
            managed.split_whitespace().any(|m| m == "kubectl"),
            "{managed}"
        );
    })
    .await;
}

#[tokio::test]
async fn explain_reads_the_crd_schema_from_openapi_v3() {
    bounded(async {
        let (_server, k) = with_examples().await;
        let out = k.ok(&["explain", "llmd.spec.replicas"]).await;
        assert!(
            out.contains("KIND:       LlmDeployment") && out.contains("<integer>"),
            "{out}"
        );
        assert!(out.contains("replica groups"), "{out}");
        let top = k.ok(&["explain", "gpool"]).await;
        assert!(top.contains("GpuPool") && top.contains("spec"), "{top}");
    })
    .await;
}

#[tokio::test]
async fn scale_and_patch_merge_and_json() {
    bounded(async {
        let (_server, k) = with_examples().await;
        let out = k.ok(&["scale", "llmd", "smollm2", "--replicas=3"]).await;
        assert!(out.contains("scaled"), "{out}");
        let replicas = || k.ok(&["get", "llmd", "smollm2", "-o", "jsonpath={.spec.replicas}"]);
        assert_eq!(replicas().await, "3");
        k.ok(&["patch", "llmd", "smollm2", "--type", "merge", "-p", r#"{"spec":{"replicas":4}}"#]).await;
        assert_eq!(replicas().await, "4");
        let test_fails = r#"[{"op":"test","path":"/spec/replicas","value":9},{"op":"replace","path":"/spec/replicas","value":5}]"#;
        let err = k.fails(&["patch", "llmd", "smollm2", "--type", "json", "-p", test_fails]).await;
        assert!(err.contains("value did not match"), "{err}");
        assert_eq!(replicas().await, "4", "a failed test op changes nothing");
        let test_passes = r#"[{"op":"test","path":"/spec/replicas","value":4},{"op":"replace","path":"/spec/replicas","value":5}]"#;
        k.ok(&["patch", "llmd", "smollm2", "--type", "json", "-p", test_passes]).await;
        assert_eq!(replicas().await, "5");
        let err = k.fails(&["patch", "llmd", "smollm2", "--type", "merge", "-p", r#"{"spec":{"replicas":-1}}"#]).await;
        assert!(err.contains("spec.replicas must be 0 or more"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn describe_shows_spec_and_events() {
    bounded(async {
        let (server, k) = with_examples().await;
        let uid = k.ok(&["get", "llmd", "smollm2", "-o", "jsonpath={.metadata.uid}"]).await;
        let event = format!(
            "apiVersion: v1\nkind: Event\nmetadata:\n  name: smollm2.planned\n  namespace: default\n\
             involvedObject:\n  apiVersion: whaleflux.io/v1alpha1\n  kind: LlmDeployment\n  name: smollm2\n  namespace: default\n  uid: {uid}\n\
             reason: Planned\nmessage: chose TP=1 PP=1\ntype: Normal\ncount: 1\nfirstTimestamp: \"2026-01-01T00:00:00Z\"\nlastTimestamp: \"2026-01-01T00:00:00Z\"\n\
             source:\n  component: whaleflux-operator\n"
        );
        let path = write(&server, "event.yaml", &event);
        k.ok(&["create", "-f", &path]).await;
        let out = k.ok(&["describe", "llmd", "smollm2"]).await;
        assert!(out.contains("Gpu Pool:") && out.contains("rtx4090-pcie"), "{out}");
        assert!(out.contains("Planned") && out.contains("chose TP=1 PP=1"), "events are listed:\n{out}");
    })
    .await;
}

#[tokio::test]
async fn delete_waits_for_finalizers() {
    bounded(async {
        let (_server, k) = with_examples().await;
        k.ok(&[
            "patch",
            "llmd",
            "smollm2",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"finalizers":["whaleflux.io/cleanup"]}}"#,
        ])
        .await;
        let out = k.ok(&["delete", "llmd", "smollm2", "--wait=false"]).await;
        assert!(out.contains("deleted"), "{out}");
        let ts = k
            .ok(&[
                "get",
                "llmd",
                "smollm2",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ])
            .await;
        assert!(!ts.is_empty(), "the object stays, marked for deletion");
        k.ok(&[
            "patch",
            "llmd",
            "smollm2",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .await;
        let err = k.fails(&["get", "llmd", "smollm2"]).await;
        assert!(
            err.contains(
                r#"Error from server (NotFound): llmdeployments.whaleflux.io "smollm2" not found"#
            ),
            "{err}"
        );
        let out = k
            .ok(&["delete", "-f", &repo("examples/gpupool-h100.yaml")])
            .await;
        assert!(out.contains("deleted"), "{out}");
    })
    .await;
}

#[tokio::test]
async fn wait_for_condition_ready_set_through_the_status_subresource() {
    bounded(async {
        let (server, k) = with_examples().await;
        let waiter = k.command(&["wait", "--for=condition=Ready", "llmd/smollm2", "--timeout=40s"]).spawn().expect("kubectl wait");
        // Patch only once kubectl is watching (its watch is in the audit log), so the test
        // covers a condition arriving through the watch, not only the initial read.
        let deadline = tokio::time::Instant::now() + STEP;
        while !server.audit().events().iter().any(|e| e.verb == "watch" && e.resource == "llmdeployments") {
            assert!(tokio::time::Instant::now() < deadline, "kubectl wait never watched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = r#"{"status":{"phase":"Ready","conditions":[{"type":"Ready","status":"True","reason":"AllGroupsReady","message":"1/1 groups ready","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
        k.ok(&["patch", "llmd", "smollm2", "--subresource=status", "--type", "merge", "-p", status]).await;
        let out = tokio::time::timeout(STEP, waiter.wait_with_output()).await.expect("wait finished").expect("wait ran");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("llmdeployment.whaleflux.io/smollm2 condition met"), "{stdout}");
        let generation = k.ok(&["get", "llmd", "smollm2", "-o", "jsonpath={.metadata.generation}"]).await;
        assert_eq!(generation, "1", "status writes do not bump generation");
    })
    .await;
}

#[tokio::test]
async fn get_watch_streams_changes() {
    bounded(async {
        let (_server, k) = with_examples().await;
        let mut child = k
            .command(&["get", "llmd", "-w"])
            .spawn()
            .expect("kubectl get -w");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let mut patched = false;
        let deadline = tokio::time::Instant::now() + STEP;
        while !seen.contains("Degraded") && tokio::time::Instant::now() < deadline {
            if !patched && seen.contains("smollm2") {
                k.ok(&[
                    "patch",
                    "llmd",
                    "smollm2",
                    "--subresource=status",
                    "--type",
                    "merge",
                    "-p",
                    r#"{"status":{"phase":"Degraded"}}"#,
                ])
                .await;
                patched = true;
            }
            match tokio::time::timeout(Duration::from_secs(5), stdout.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Ok(Err(e)) => panic!("reading kubectl output: {e}"),
                Err(_) => {}
            }
        }
        let _ = child.kill().await;
        assert!(
            seen.lines().next().is_some_and(|h| h.contains("PHASE")),
            "{seen}"
        );
        assert!(
            seen.lines()
                .any(|l| l.starts_with("smollm2") && l.contains("Degraded")),
            "the change streams in:\n{seen}"
        );
    })
    .await;
}

#[tokio::test]
async fn invalid_manifests_fail_like_kube_apiserver() {
    bounded(async {
        let (_server, k) = with_examples().await;
        let dir = repo("crds/tests/invalid");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("invalid dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(files.len() >= 10, "expected the invalid manifests in {dir}");
        // The crds tests word schema errors as the jsonschema crate does; the apiserver words
        // them its own way, and so does this server.
        let apiserver_words = [
            ("missing-gpu-pool.yaml", "spec.gpuPool: Required value"),
            (
                "pool-unknown-network.yaml",
                r#"spec.interconnect.interNode: Unsupported value: "Myrinet""#,
            ),
            (
                "replicas-wrong-type.yaml",
                "spec.replicas in body must be of type integer",
            ),
            (
                "unknown-dtype.yaml",
                r#"spec.model.weights.dtype: Unsupported value: "int3""#,
            ),
            (
                "unknown-field.yaml",
                r#"strict decoding error: unknown field "spec.replica""#,
            ),
        ];
        for file in files {
            let text = std::fs::read_to_string(&file).expect("manifest");
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let expect = apiserver_words
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, e)| e.to_string())
                .or_else(|| {
                    text.lines()
                        .next()
                        .and_then(|l| l.strip_prefix("# expect: "))
                        .map(String::from)
                })
                .unwrap_or_else(|| panic!("{name} starts with # expect:"));
            let err = k.fails(&["apply", "-f", &file.display().to_string()]).await;
            assert!(
                err.contains(&expect),
                "{name}: expected {expect:?} in:\n{err}"
            );
            assert!(
                err.starts_with("Error from server") || err.contains("is invalid"),
                "{name}: {err}"
            );
        }
        let err = k
            .fails(&["create", "-f", &repo("examples/smollm2-135m.yaml")])
            .await;
        assert!(
            err.contains(r#"Error from server (AlreadyExists): error when creating"#)
                && err.contains(r#"llmdeployments.whaleflux.io "smollm2" already exists"#),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn built_in_kinds_apply_scale_and_delete() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let k = Kubectl::new(&server);
        let manifests = r#"apiVersion: v1
kind: Namespace
metadata:
  name: llm
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: workers
  namespace: llm
spec:
  replicas: 2
  serviceName: workers
  selector:
    matchLabels: {app: workers}
  template:
    metadata:
      labels: {app: workers}
    spec:
      containers:
      - name: worker
        image: whaleflux-worker:dev
        env:
        - {name: A, value: "1"}
---
apiVersion: v1
kind: Service
metadata:
  name: workers
  namespace: llm
spec:
  clusterIP: None
  selector: {app: workers}
  ports:
  - {name: http, port: 8000}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: workers
  namespace: llm
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {app: workers}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: whaleflux-operator
  namespace: llm
spec:
  holderIdentity: a
"#;
        let path = write(&server, "builtins.yaml", manifests);
        let out = k.ok(&["apply", "-f", &path]).await;
        for line in [
            "namespace/llm created",
            "statefulset.apps/workers created",
            "service/workers created",
            "poddisruptionbudget.policy/workers created",
            "lease.coordination.k8s.io/whaleflux-operator created",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
        // Re-apply with a changed container env: kubectl sends a strategic merge patch.
        let path2 = write(
            &server,
            "builtins2.yaml",
            &manifests.replace(r#"{name: A, value: "1"}"#, r#"{name: A, value: "2"}"#),
        );
        let out = k.ok(&["apply", "-f", &path2]).await;
        assert!(out.contains("statefulset.apps/workers configured"), "{out}");
        let env = k
            .ok(&[
                "get",
                "sts",
                "workers",
                "-n",
                "llm",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].env[0].value} {.metadata.generation}",
            ])
            .await;
        assert_eq!(env, "2 2");
        // Server-side apply of the same objects: containers and env merge by name.
        let path3 = write(
            &server,
            "builtins3.yaml",
            &manifests.replace(r#"{name: A, value: "1"}"#, r#"{name: A, value: "3"}"#),
        );
        let out = k
            .ok(&["apply", "--server-side", "--force-conflicts", "-f", &path3])
            .await;
        assert!(
            out.contains("statefulset.apps/workers serverside-applied"),
            "{out}"
        );
        let env = k
            .ok(&[
                "get",
                "sts",
                "workers",
                "-n",
                "llm",
                "-o",
                "jsonpath={.spec.template.spec.containers[*].env[*].value}",
            ])
            .await;
        assert_eq!(env, "3");
        k.ok(&["scale", "sts", "workers", "-n", "llm", "--replicas=3"])
            .await;
        let table = k.ok(&["get", "sts", "-n", "llm"]).await;
        assert!(
            table.contains("READY")
                && table
                    .lines()
                    .any(|l| l.starts_with("workers") && l.contains("0/3")),
            "{table}"
        );
        let all = k
            .ok(&["get", "sts,svc,pdb,lease", "-n", "llm", "-o", "name"])
            .await;
        assert_eq!(all.lines().count(), 4, "{all}");
        let out = k.ok(&["delete", "ns", "llm"]).await;
        assert!(out.contains("namespace \"llm\" deleted"), "{out}");
        let left = k.ok(&["get", "sts", "-A", "-o", "name"]).await;
        assert!(
            left.trim().is_empty(),
            "namespace deletion removes its objects: {left}"
        );
    })
    .await;
}

#[tokio::test]
async fn pods_run_by_the_process_kubelet_show_in_get_logs_and_delete() {
    bounded(async {
        let server = ApiServer::start().await.expect("server starts");
        let _kubelet = server
            .kubelet(whaleflux_e2e::KubeletConfig {
                nodes: vec![whaleflux_e2e::NodeSpec::gpu("gpu-a", "NVIDIA-H100-80GB-HBM3", 8)],
                ..whaleflux_e2e::KubeletConfig::default()
            })
            .await
            .expect("kubelet starts");
        let k = Kubectl::new(&server);
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  containers:\n  - name: c\n    image: busybox\n    command: [sh, -c, 'echo hello from $(POD_NAME); sleep 300']\n    env:\n    - name: POD_NAME\n      valueFrom: {fieldRef: {fieldPath: metadata.name}}\n";
        let path = write(&server, "pod.yaml", pod);
        k.ok(&["apply", "-f", &path]).await;
        let out = k.ok(&["wait", "--for=condition=Ready", "pod/hello", "--timeout=30s"]).await;
        assert!(out.contains("condition met"), "{out}");
        let wide = k.ok(&["get", "pods", "-o", "wide"]).await;
        assert!(wide.lines().any(|l| l.starts_with("hello") && l.contains("1/1") && l.contains("Running") && l.contains("gpu-a") && l.contains(" 127.")), "{wide}");
        let nodes = k.ok(&["get", "nodes"]).await;
        assert!(nodes.lines().any(|l| l.starts_with("gpu-a") && l.contains("Ready")), "{nodes}");
        let mut logs = String::new();
        for _ in 0..50 {
            logs = k.ok(&["logs", "hello"]).await;
            if !logs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(logs, "hello from hello\n");
        let out = k.ok(&["delete", "pod", "hello", "--timeout=30s"]).await;
        assert!(out.contains("pod \"hello\" deleted"), "{out}");
        let err = k.fails(&["get", "pod", "hello"]).await;
        assert!(err.contains("NotFound"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn the_apiserver_binary_serves_and_writes_a_kubeconfig() {
    bounded(async {
        let dir = std::env::temp_dir().join(format!("whaleflux-e2e-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let kubeconfig = dir.join("kubeconfig");
        let _ = std::fs::remove_file(&kubeconfig);
        let mut child = Command::new(env!("CARGO_BIN_EXE_whaleflux-e2e"))
            .args(["apiserver", "--port", "0", "--kubeconfig"])
            .arg(&kubeconfig)
            .args([
                "--gpu-node",
                "gpu-a:NVIDIA-H100-80GB-HBM3:8:whaleflux.io/pool=h100",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let deadline = tokio::time::Instant::now() + STEP;
        while !kubeconfig.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let k = Kubectl {
            kubeconfig: kubeconfig.clone(),
            cache: dir.join("cache"),
        };
        let nodes = k
            .ok(&["get", "nodes", "-l", "whaleflux.io/pool=h100", "-o", "name"])
            .await;
        assert_eq!(nodes.trim(), "node/gpu-a");
        let ns = k
            .ok(&["get", "ns", "default", "-o", "jsonpath={.status.phase}"])
            .await;
        assert_eq!(ns, "Active");
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
