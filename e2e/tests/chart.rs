//! The Helm chart (`charts/whaleflux`) through Helm's own engine: each subcommand of
//! `charts/tests/check_chart.py` (strict lint, renders with defaults and with every toggle on,
//! the values schema against `charts/tests/bad-values`, every object against its Kubernetes or
//! CRD schema, the restricted Pod Security Standard, CRDs in sync), and the checks failing on a
//! deliberately broken copy of the chart.
//!
//! Needs `WHALEFLUX_PYTHON`: a Python with `helm-python-sdk` and `kubernetes-validate`
//! (`scripts/test.sh` creates one in `~/.cache/whaleflux/venv`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use whaleflux_e2e::output_within;

const LIMIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn python() -> String {
    std::env::var("WHALEFLUX_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WHALEFLUX_PYTHON is not set: point it at a Python with helm-python-sdk==0.2.2 and \
             kubernetes-validate==1.37.0 (scripts/test.sh creates one in \
             ~/.cache/whaleflux/venv and exports it)"
        )
    })
}

/// Runs `check_chart.py ARGS` from the repository root, bounded by [`LIMIT`].
fn check_chart(args: &[&str]) -> (Output, String) {
    let root = repo();
    let out = output_within(
        Command::new(python())
            .arg(root.join("charts/tests/check_chart.py"))
            .args(args)
            .current_dir(&root),
        None,
        LIMIT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Runs a check subcommand and asserts it passed and printed `key`.
fn passes(sub: &str, key: &str) -> String {
    let (out, text) = check_chart(&[sub]);
    assert!(
        out.status.success(),
        "check_chart.py {sub} failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("PASS {sub}: "))),
        "no PASS line from {sub}:\n{text}"
    );
    assert!(text.contains(key), "{sub} did not report {key:?}:\n{text}");
    text
}

#[test]
fn lint_is_clean_under_strict() {
    let text = passes("lint", "PASS lint: strict lint clean");
    assert!(text.contains("helm lint --strict with all toggles on: no warnings, no errors"));
}

#[test]
fn defaults_render_the_operator_and_its_rbac() {
    let text = passes(
        "render-defaults",
        "ClusterRole = files/clusterrole-rules.yaml",
    );
    assert!(
        text.contains("--lease-name whaleflux --lease-namespace whaleflux-system"),
        "{text}"
    );
    assert!(
        text.contains("checksum/config changes with workerImage, downloadImage"),
        "{text}"
    );
    assert!(
        text.contains("downloadImage curlimages/curl:8.11.1"),
        "{text}"
    );
}

#[test]
fn every_toggle_on_renders_monitoring_dashboards_and_policies() {
    let text = passes(
        "render-all-on",
        "PodMonitor: worker pods in any namespace, port http",
    );
    for key in [
        "image digest wins over the tag",
        "operator.yaml: worker and download images by digest",
        "ServiceMonitor: port metrics, honorLabels true",
        "dashboard ConfigMaps (gpu-fleet.json, operator.json, serving.json)",
        "NetworkPolicy: ingress only to port metrics",
        "each toggle off removes its objects",
    ] {
        assert!(
            text.contains(key),
            "render-all-on did not report {key:?}:\n{text}"
        );
    }
}

#[test]
fn the_values_schema_refuses_every_bad_values_file() {
    let text = passes("schema", "typo-top-level-key.yaml: refused");
    for case in [
        "typo-nested-key.yaml: refused",
        "pull-policy-enum.yaml: refused",
        "replica-count-zero.yaml: refused",
        "replica-count-negative.yaml: refused",
        "port-string.yaml: refused",
        "service-type-enum.yaml: refused",
        "download-digest-malformed.yaml: refused",
        "download-tag-empty.yaml: refused",
        "lease-retry-zero.yaml: refused",
        "lease-renew-deadline-not-shorter.yaml: refused",
        "lease-retry-not-shorter.yaml: refused",
    ] {
        assert!(
            text.contains(case),
            "schema did not report {case:?}:\n{text}"
        );
    }
    assert!(
        text.contains("each with a comment and in the schema"),
        "{text}"
    );
}

#[test]
fn every_rendered_object_is_valid() {
    let text = passes(
        "validate",
        "Deployment whaleflux (apps/v1) against kubernetes-validate strict",
    );
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(
            text.lines().any(|l| l.contains(&format!("ok: {kind} "))
                && l.ends_with("against monitoring.coreos.com structure")),
            "{kind} was not checked:\n{text}"
        );
    }
    assert!(
        text.contains("control: a Deployment with a typo'd field is refused"),
        "{text}"
    );
    assert!(
        text.contains("control: an LlmDeployment with a string replicas"),
        "{text}"
    );
}

#[test]
fn pod_templates_meet_the_restricted_pod_security_standard() {
    let text = passes(
        "pss",
        "Deployment whaleflux (all toggles on) meets the restricted standard",
    );
    assert!(text.contains("control: the checker passes a compliant pod and refuses"));
}

#[test]
fn chart_crds_equal_the_generated_manifests() {
    passes(
        "crds-in-sync",
        "llmdeployments.whaleflux.io.yaml: identical",
    );
}

#[test]
fn render_prints_the_manifest_for_set_values() {
    let (out, text) = check_chart(&[
        "render",
        "--set",
        "metrics.podMonitor.enabled=true,replicaCount=3",
        "--set-string",
        "image.tag=9.9.9",
    ]);
    assert!(out.status.success(), "render failed:\n{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("kind: PodMonitor"), "{stdout}");
    assert!(stdout.contains("replicas: 3"), "{stdout}");
    assert!(
        stdout.contains("image: ghcr.io/whaleflux/whaleflux:9.9.9"),
        "{stdout}"
    );
    assert!(!stdout.contains("kind: ServiceMonitor"), "{stdout}");

    // The download (curl) init container's image pinned by digest reaches operator.yaml as
    // repository@digest, the tag ignored.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let (out, text) = check_chart(&[
        "render",
        "--set-string",
        &format!("downloadImage.digest={digest}"),
    ]);
    assert!(out.status.success(), "render failed:\n{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("downloadImage: \"curlimages/curl@{digest}\"")),
        "{stdout}"
    );
    assert!(!stdout.contains("curlimages/curl:8.11.1"), "{stdout}");

    let (out, text) = check_chart(&["render", "--set", "replicaCount=0"]);
    assert!(!out.status.success(), "replicaCount=0 rendered:\n{text}");
    assert!(text.contains("at '/replicaCount': minimum"), "{text}");
}

/// A private copy of the chart to break.
struct ChartCopy(PathBuf);

impl ChartCopy {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("whaleflux-chart-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&repo().join("charts/whaleflux"), &dir);
        Self(dir)
    }

    fn edit(&self, rel: &str, from: &str, to: &str) {
        let path = self.0.join(rel);
        let text = std::fs::read_to_string(&path).expect("chart file readable");
        assert!(text.contains(from), "{rel} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("chart file writable");
    }

    fn check(&self, sub: &str) -> (Output, String) {
        check_chart(&["--chart", self.0.to_str().expect("utf-8 path"), sub])
    }
}

impl Drop for ChartCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the chart") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a chart file");
        }
    }
}

#[test]
fn the_checks_fail_on_a_broken_chart() {
    // A container that may escalate its privileges breaks the restricted standard.
    let chart = ChartCopy::new("pss");
    chart.edit(
        "templates/deployment.yaml",
        "allowPrivilegeEscalation: false",
        "allowPrivilegeEscalation: true",
    );
    let (out, text) = chart.check("pss");
    assert!(!out.status.success(), "pss passed a broken chart:\n{text}");
    assert!(text.contains("FAIL pss: "), "{text}");
    assert!(text.contains("privilege escalation"), "{text}");

    // A CRD that drifted from crds/manifests.
    let chart = ChartCopy::new("crds");
    chart.edit(
        "crds/gpupools.whaleflux.io.yaml",
        "shortNames:",
        "shortNames:\n    - gp",
    );
    let (out, text) = chart.check("crds-in-sync");
    assert!(
        !out.status.success(),
        "crds-in-sync passed a drifted CRD:\n{text}"
    );
    assert!(
        text.contains("gpupools.whaleflux.io.yaml differs from crds/manifests"),
        "{text}"
    );

    // A schema that leaves an object open.
    let chart = ChartCopy::new("schema");
    chart.edit(
        "values.schema.json",
        "\"additionalProperties\": false,\n      \"properties\": {\n        \"create\"",
        "\"properties\": {\n        \"create\"",
    );
    let (out, text) = chart.check("schema");
    assert!(
        !out.status.success(),
        "schema passed an open object:\n{text}"
    );
    assert!(
        text.contains("an object without additionalProperties"),
        "{text}"
    );
}
