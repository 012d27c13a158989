//! `helm install` of the chart as a platform team runs it, with Helm's own engine (helm-python-sdk,
//! Helm v4's Go SDK) against the in-memory API server: the release installs (Helm's typed
//! clients send the release Secret and the namespace as protobuf), the operator Deployment's pods
//! run the real `whaleflux` binary through the process kubelet as the chart's service account,
//! an example LlmDeployment reaches Ready on real worker processes, `helm upgrade` of a cluster
//! setting rolls the operator and reaches the worker pods, and `helm uninstall` removes every
//! object of the release but the CRDs.
//!
//! Needs `WHALEFLUX_PYTHON` (helm-python-sdk), `WHALEFLUX_TEST_MODEL`, `kubectl`.

mod cluster;
mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use cluster::{Cluster, bounded, eventually, root, rtx_nodes};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

const NS: &str = "whaleflux-system";
const WAIT: Duration = Duration::from_secs(120);
/// The operator's service account as the chart names it (release `whaleflux`).
const OPERATOR_SA: &str = "system:serviceaccount:whaleflux-system:whaleflux";

fn python() -> String {
    std::env::var("WHALEFLUX_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WHALEFLUX_PYTHON is not set: point it at a Python with helm-python-sdk==0.2.2 \
             (scripts/test.sh creates one in ~/.cache/whaleflux/venv)"
        )
    })
}

/// Runs `charts/tests/helm_release.py` against the cluster; returns its JSON summary.
fn helm(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let script = root().join("charts/tests/helm_release.py");
    let out = whaleflux_e2e::output_within(
        Command::new(python())
            .arg(&script)
            .arg("--kubeconfig")
            .arg(c.server.kubeconfig())
            .args(["--namespace", NS])
            .args(args),
        None,
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm {} failed: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Asserts no object of `kinds` (in `ns`, or cluster-wide) carries the release's instance label.
fn assert_release_gone(c: &Cluster, kinds: &[&str], ns: Option<&str>) {
    for kind in kinds {
        let mut args = vec!["get", kind, "-l", "app.kubernetes.io/instance=whaleflux"];
        args.extend(["-o", "name"]);
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let left = c.kubectl_ok(&args, None);
        assert!(
            left.trim().is_empty(),
            "{kind} left after uninstall: {left}"
        );
    }
}

/// Names of the operator's pods that are not being deleted.
async fn operator_pods(pods: &Api<Pod>) -> BTreeSet<String> {
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=whaleflux"))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect()
        })
        .unwrap_or_default()
}

/// The kubelet's log of every operator pod, for failure messages.
fn operator_logs(c: &Cluster, names: &BTreeSet<String>) -> String {
    let kubelet = c.kubelet.as_ref().expect("kubelet");
    names
        .iter()
        .map(|n| format!("--- {n}\n{}", kubelet.logs(NS, n, "operator")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_upgrade_uninstall() {
    common::model();
    let c = Cluster::start(rtx_nodes(2, 4), true).await;
    bounded(Duration::from_secs(420), async {
        let client = c.client().await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

        // The test model's directory is where hostPath weights may come from.
        let model = common::model();
        let model_dir = model.parent().expect("model directory");
        // Install: two operator replicas (one leads), a short lease so the rollout's handover
        // is quick. The image repository's last part names the program the kubelet runs.
        let installed = helm(
            &c,
            &[
                "install",
                "--create-namespace",
                "--set",
                "image.repository=registry.example/whaleflux",
                "--set",
                "operator.leaseDurationSeconds=4",
                "--set",
                "operator.leaseRenewDeadlineSeconds=3",
                "--set",
                "operator.leaseRetryPeriodSeconds=1",
                "--set",
                "operator.logLevel=info\\,whaleflux_operator=debug",
                "--set",
                &format!("allowedHostPaths[0]={}", model_dir.display()),
            ],
        );
        assert_eq!(installed["revision"], 1, "{installed}");
        assert_eq!(installed["status"], "deployed", "{installed}");
        let objects: Vec<String> = serde_json::from_value(installed["objects"].clone()).unwrap();
        for want in [
            "Deployment/whaleflux",
            "ServiceAccount/whaleflux",
            "ClusterRole/whaleflux",
            "ClusterRoleBinding/whaleflux",
            "ConfigMap/whaleflux-config",
        ] {
            assert!(objects.iter().any(|o| o == want), "{want} in {objects:?}");
        }
        c.kubectl_ok(
            &[
                "rollout",
                "status",
                "deployment/whaleflux",
                "-n",
                NS,
                "--timeout=120s",
            ],
            None,
        );
        let first = operator_pods(&pods).await;
        assert_eq!(first.len(), 2, "{first:?}");

        // A user's example reaches Ready through the chart's operator.
        let pool = root().join("examples/gpupool-rtx4090.yaml");
        c.kubectl_ok(&["apply", "-f", &pool.display().to_string()], None);
        c.kubectl_ok(&["apply", "-f", "-"], Some(&c.smollm2_manifest()));
        let wait = c.kubectl(
            &[
                "wait",
                "--for=condition=Ready",
                "llmd/smollm2",
                "--timeout=150s",
            ],
            None,
        );
        assert!(
            wait.status.success(),
            "smollm2 not Ready: {}\n{}",
            String::from_utf8_lossy(&wait.stderr),
            operator_logs(&c, &first)
        );
        // The operator acted as the chart's service account, within the chart's RBAC.
        let used = c.server.audit().permissions_used(OPERATOR_SA);
        assert!(
            used.iter()
                .any(|(g, r, v)| g == "apps" && r == "statefulsets" && v == "patch"),
            "the operator's calls are its service account's: {used:?}"
        );
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
        let image = |s: StatefulSet| {
            s.spec
                .and_then(|s| s.template.spec)
                .and_then(|p| p.containers.into_iter().next())
                .and_then(|c| c.image)
                .unwrap_or_default()
        };
        let before = image(sts.get("smollm2-g0").await.expect("group 0"));
        assert_eq!(before, "ghcr.io/whaleflux/whaleflux-worker:0.1.0");

        // Upgrade a cluster setting: the operator rolls (new pods, the old ones gone) and the
        // new default worker image reaches the group.
        let upgraded = helm(
            &c,
            &[
                "upgrade",
                "--reuse-values",
                "--set",
                "workerImage.tag=0.1.1",
            ],
        );
        assert_eq!(upgraded["revision"], 2, "{upgraded}");
        c.kubectl_ok(
            &[
                "rollout",
                "status",
                "deployment/whaleflux",
                "-n",
                NS,
                "--timeout=120s",
            ],
            None,
        );
        eventually("the old operator pods to be replaced", WAIT, || async {
            let now = operator_pods(&pods).await;
            now.len() == 2 && now.is_disjoint(&first)
        })
        .await;
        eventually("the worker image to follow the setting", WAIT, || async {
            sts.get("smollm2-g0").await.map(image).ok()
                == Some("ghcr.io/whaleflux/whaleflux-worker:0.1.1".into())
        })
        .await;
        let d = deployments.get("whaleflux").await.expect("deployment");
        assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(2));

        // Uninstall after the user removed their deployment: nothing of the release is left
        // but the CRDs.
        c.kubectl_ok(&["delete", "llmd/smollm2", "--timeout=120s"], None);
        helm(&c, &["uninstall"]);
        assert_release_gone(
            &c,
            &[
                "deployments",
                "serviceaccounts",
                "configmaps",
                "services",
                "roles",
                "rolebindings",
                "poddisruptionbudgets",
            ],
            Some(NS),
        );
        assert_release_gone(&c, &["clusterroles", "clusterrolebindings"], None);
        eventually("the operator pods to go", WAIT, || async {
            operator_pods(&pods).await.is_empty()
        })
        .await;
        let crds = c.kubectl_ok(&["get", "crd", "-o", "name"], None);
        assert!(crds.contains("llmdeployments.whaleflux.io"), "{crds}");
        assert!(crds.contains("gpupools.whaleflux.io"), "{crds}");
    })
    .await;
}

/// The Prometheus Operator's kinds, as far as the API server needs them to store objects (the
/// chart's monitoring objects are checked against their real structure by `check_chart.py`).
fn monitoring_crds() -> String {
    ["ServiceMonitor", "PodMonitor", "PrometheusRule"]
        .iter()
        .map(|kind| {
            let plural = format!("{}s", kind.to_ascii_lowercase());
            format!(
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
                 metadata: {{name: {plural}.monitoring.coreos.com}}\n\
                 spec:\n  group: monitoring.coreos.com\n  scope: Namespaced\n\
                 \x20 names: {{kind: {kind}, plural: {plural}, singular: {}}}\n\
                 \x20 versions:\n  - name: v1\n    served: true\n    storage: true\n\
                 \x20   schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}\n",
                kind.to_ascii_lowercase()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_with_every_toggle_on() {
    let c = Cluster::start(Vec::new(), false).await;
    bounded(Duration::from_secs(240), async {
        c.kubectl_ok(&["apply", "-f", "-"], Some(&monitoring_crds()));
        let installed = helm(
            &c,
            &[
                "install",
                "--create-namespace",
                "--set",
                "metrics.serviceMonitor.enabled=true",
                "--set",
                "metrics.podMonitor.enabled=true",
                "--set",
                "metrics.prometheusRule.enabled=true",
                "--set",
                "grafana.dashboards.enabled=true",
                "--set",
                "networkPolicy.enabled=true",
                "--set-json",
                "imagePullSecrets=[{\"name\": \"regcred\"}]",
            ],
        );
        assert_eq!(installed["status"], "deployed", "{installed}");
        for kind in [
            "servicemonitor",
            "podmonitor",
            "prometheusrule",
            "networkpolicy",
        ] {
            let names = c.kubectl_ok(&["get", kind, "-n", NS, "-o", "name"], None);
            assert_eq!(names.lines().count(), 1, "one {kind}: {names}");
        }
        let dashboards = c.kubectl_ok(
            &[
                "get",
                "configmaps",
                "-n",
                NS,
                "-l",
                "grafana_dashboard=1",
                "-o",
                "name",
            ],
            None,
        );
        assert_eq!(dashboards.lines().count(), 3, "{dashboards}");
        let settings = c.kubectl_ok(
            &[
                "get",
                "configmap",
                "whaleflux-config",
                "-n",
                NS,
                "-o",
                "jsonpath={.data.operator\\.yaml}",
            ],
            None,
        );
        assert!(settings.contains("regcred"), "{settings}");

        helm(&c, &["uninstall"]);
        assert_release_gone(
            &c,
            &[
                "servicemonitor",
                "podmonitor",
                "prometheusrule",
                "networkpolicy",
                "configmaps",
            ],
            Some(NS),
        );
    })
    .await;
}
