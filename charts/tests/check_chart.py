#!/usr/bin/env python3
"""Checks of the WhaleFlux Helm chart, with Helm's own engine (the PyPI package
helm-python-sdk, module helm_python) and kubernetes-validate; no cluster, no helm binary.

    python charts/tests/check_chart.py lint            # strict lint, defaults and all toggles on
    python charts/tests/check_chart.py render-defaults # what a plain install creates
    python charts/tests/check_chart.py render-all-on   # every toggle on
    python charts/tests/check_chart.py schema          # values.schema.json refuses charts/tests/bad-values/*
    python charts/tests/check_chart.py validate        # every object against its Kubernetes / CRD schema
    python charts/tests/check_chart.py pss             # pod templates meet the restricted Pod Security Standard
    python charts/tests/check_chart.py crds-in-sync    # charts/whaleflux/crds == crds/manifests
    python charts/tests/check_chart.py all             # all of the above
    python charts/tests/check_chart.py render --set metrics.podMonitor.enabled=true [-f values.yaml]

Each subcommand prints what it checked, ends with `PASS <subcommand>: ...` and exits 0, or
prints `FAIL <subcommand>: <reason>` and exits 1. The scripts/test.sh venv has both packages
(helm-python-sdk==0.2.2, kubernetes-validate==1.37.0); tests get it as $WHALEFLUX_PYTHON.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - depends on the interpreter
    sys.exit(
        f"FAIL: {e}: run this with a Python that has helm-python-sdk==0.2.2 and "
        "kubernetes-validate==1.37.0 (scripts/test.sh creates ~/.cache/whaleflux/venv; "
        "tests get it as $WHALEFLUX_PYTHON)"
    )

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kube_checks import (  # noqa: E402  (beside this script)
    CrdValidator, _bad_pods, _good_pod, builtin_errors, monitoring_errors, pss_restricted,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHART = REPO / "charts" / "whaleflux"
BAD_VALUES = Path(__file__).resolve().parent / "bad-values"
RELEASE = "whaleflux"
NAMESPACE = "whaleflux-system"
# Kubernetes versions the built-in objects are validated against: the chart's minimum
# (kubeVersion >=1.29) and a fixed later one.
KUBE_VERSIONS = ["1.29.0", "1.31.0"]
# A kubeconfig naming no cluster: a client-side dry run never contacts one.
NO_CLUSTER = "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"

DIGEST = "sha256:" + "0123456789abcdef" * 4
WORKER_DIGEST = "sha256:" + "fedcba9876543210" * 4
DOWNLOAD_DIGEST = "sha256:" + "00112233445566778899aabbccddeeff" * 2
# Every toggle of the chart on, and every optional field set.
ALL_ON: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"digest": DIGEST, "tag": "ignored-when-digest-set", "pullPolicy": "Always"},
    "workerImage": {"digest": WORKER_DIGEST},
    "downloadImage": {"repository": "mirror.example/curl", "digest": DOWNLOAD_DIGEST},
    "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}],
    "gpuTolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "gpu-vendor", "operator": "Equal", "value": "nvidia", "effect": "NoExecute",
         "tolerationSeconds": 60},
    ],
    "operator": {"leaseDurationSeconds": 20, "leaseRenewDeadlineSeconds": 12,
                 "leaseRetryPeriodSeconds": 3, "apiTimeoutSeconds": 20,
                 "reconcileTimeoutSeconds": 90, "concurrency": 8,
                 "logLevel": "whaleflux=debug,info"},
    "serviceAccount": {"annotations": {"example.com/role": "whaleflux"}},
    "podAnnotations": {"example.com/team": "ml-platform"},
    "podLabels": {"team": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control",
                     "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "whaleflux",
                                              "app.kubernetes.io/component": "operator"}}}}]}},
    "priorityClassName": "whaleflux-critical",
    "metrics": {
        "port": 9090,
        "service": {"type": "ClusterIP", "annotations": {"example.com/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "20s", "scrapeTimeout": "5s",
                           "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True, "interval": "10s", "scrapeTimeout": "5s",
                       "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "grafana": {"dashboards": {"enabled": True, "namespace": "monitoring",
                               "annotations": {"grafana_folder": "WhaleFlux"}}},
    "networkPolicy": {"enabled": True, "metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
}
DASHBOARDS = ["gpu-fleet.json", "serving.json", "operator.json"]


class CheckError(Exception):
    """A check failed; the message says what and why."""


def ok(msg: str) -> None:
    print(f"  ok: {msg}")


def expect(cond: Any, msg: str) -> None:
    if not cond:
        raise CheckError(msg)


# --- rendering -------------------------------------------------------------------------------


class Render:
    """One client-side dry-run install (what `helm install --dry-run=client` / `helm template`
    produce): the objects, by (kind, name), plus NOTES.txt and the chart's CRDs."""

    def __init__(self, chart: Path, values: dict[str, Any] | None, *, release: str = RELEASE,
                 namespace: str = NAMESPACE):
        self.chart = chart
        self.values = values or {}
        with helm.Config(namespace=namespace, kubeconfig_content=NO_CLUSTER) as cfg:
            rel = cfg.install(str(chart), release, self.values, dry_run="client",
                              namespace=namespace)
        self.manifest: str = rel["manifest"]
        self.notes: str = rel.get("notes") or ""
        self.objects: list[dict[str, Any]] = [
            d for d in yaml.safe_load_all(self.manifest) if d
        ]
        with helm.Chart.load(str(chart)) as c:
            self.crds: list[dict[str, Any]] = [
                d for f in c.crds for d in yaml.safe_load_all(f["data"]) if d
            ]

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind)
                 if name is None or o["metadata"]["name"] == name]
        expect(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, "
                                f"found {len(found)}: {self.kinds()}")
        return found[0]


def render(chart: Path, values: dict[str, Any] | None = None, **kw: Any) -> Render:
    try:
        return Render(chart, values, **kw)
    except helm.HelmError as e:
        raise CheckError(f"rendering failed: {e}") from e


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def chart_file_yaml(chart: Path, rel: str) -> Any:
    return yaml.safe_load((chart / rel).read_text())


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs (with their metadata) an object creates."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [{"metadata": obj.get("metadata", {}), "spec": spec}]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job",
                "ReplicationController"):
        return [spec.get("template", {})]
    if kind == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {})]
    return []


# --- lint ------------------------------------------------------------------------------------


def cmd_lint(chart: Path, _args: argparse.Namespace) -> str:
    for label, values in (("default values", None), ("all toggles on", ALL_ON)):
        report = helm.lint(str(chart), values, strict=True, namespace=NAMESPACE,
                           kube_version="v" + KUBE_VERSIONS[-1])
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        for m in report.get("messages", []):
            if m.get("severity", 0) < 2:
                print(f"  info: {m.get('path')}: {m.get('error')}")
        expect(report.get("total_charts_linted") == 1, f"lint linted no chart: {report}")
        expect(not problems and not report.get("errors"),
               f"strict lint with {label} found: "
               + "; ".join(f"{m.get('path')}: {m.get('error')}" for m in problems)
               + "; ".join(report.get("errors") or []))
        ok(f"helm lint --strict with {label}: no warnings, no errors")
    return "strict lint clean"


# --- render-defaults -------------------------------------------------------------------------

STANDARD_LABELS = ["helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by"]
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def check_common(r: Render) -> None:
    for o in r.objects:
        md = o["metadata"]
        where = f"{o['kind']} {md.get('name')}"
        for label in STANDARD_LABELS:
            expect(label in (md.get("labels") or {}), f"{where} lacks the label {label}")
        dashboard = "grafana_dashboard" in (md.get("labels") or {})
        if o["kind"] not in CLUSTER_SCOPED and not dashboard:
            expect(md.get("namespace") == NAMESPACE,
                   f"{where} is not in the release namespace: {md.get('namespace')}")
    ok(f"all {len(r.objects)} objects carry the standard labels; namespaced ones sit in the "
       "release namespace")


def container(r: Render) -> dict[str, Any]:
    dep = r.one("Deployment", RELEASE)
    cs = dep["spec"]["template"]["spec"]["containers"]
    expect(len(cs) == 1, f"the operator pod has {len(cs)} containers")
    return cs[0]


def operator_config(r: Render) -> dict[str, Any]:
    cm = r.one("ConfigMap", f"{RELEASE}-config")
    expect(cm["metadata"].get("namespace") == NAMESPACE, "config ConfigMap namespace")
    text = (cm.get("data") or {}).get("operator.yaml")
    expect(text, "the config ConfigMap has no operator.yaml")
    cfg = yaml.safe_load(text)
    expect(isinstance(cfg, dict), f"operator.yaml is not a mapping: {text!r}")
    unknown = set(cfg) - {"workerImage", "downloadImage", "imagePullSecrets", "gpuTolerations",
                          "allowedHostPaths", "allowedImages", "workerMetricsFrom"}
    expect(not unknown, f"operator.yaml has keys the operator does not know: {unknown}")
    return cfg


def check_rbac(r: Render, chart: Path) -> None:
    rules = chart_file_yaml(chart, "files/clusterrole-rules.yaml")
    lease_rules = chart_file_yaml(chart, "files/lease-role-rules.yaml")
    expect(isinstance(rules, list) and rules, "files/clusterrole-rules.yaml is not a rule list")
    expect(isinstance(lease_rules, list) and lease_rules,
           "files/lease-role-rules.yaml is not a rule list")
    for rule in rules + lease_rules:
        for k in ("apiGroups", "resources", "verbs"):
            expect("*" not in rule.get(k, []), f"wildcard in a rule: {rule}")
    cr = r.one("ClusterRole", RELEASE)
    expect(cr["rules"] == rules, "the ClusterRole's rules differ from files/clusterrole-rules.yaml")
    expect(all("leases" not in rule["resources"] for rule in cr["rules"]),
           "the ClusterRole grants Leases cluster-wide")
    role = r.one("Role", f"{RELEASE}-leader-election")
    expect(role["rules"] == lease_rules, "the Role's rules differ from files/lease-role-rules.yaml")
    expect(any("leases" in rule["resources"] for rule in role["rules"]), "no Lease rule")
    sa = r.one("ServiceAccount", RELEASE)["metadata"]["name"]
    for kind, ref_kind, ref_name in (("ClusterRoleBinding", "ClusterRole", RELEASE),
                                     ("RoleBinding", "Role", f"{RELEASE}-leader-election")):
        b = r.one(kind)
        expect(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind,
                                "name": ref_name}, f"{kind} roleRef {b['roleRef']}")
        expect(b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
               f"{kind} subjects {b['subjects']}")
    ok(f"ClusterRole = files/clusterrole-rules.yaml ({len(rules)} rules, no Leases, no "
       f"wildcards); Role {RELEASE}-leader-election in {NAMESPACE} = files/lease-role-rules.yaml; "
       f"both bound to ServiceAccount {sa}")


def check_deployment(r: Render, *, metrics_port: int, lease: tuple[int, int, int],
                     timeouts: tuple[int, int], concurrency: int, image: str,
                     replicas: int) -> None:
    """`lease`: duration, renew deadline, retry period; `timeouts`: API call, reconcile
    (seconds)."""
    dep = r.one("Deployment", RELEASE)
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    expect(dep["spec"]["replicas"] == replicas, f"replicas {dep['spec']['replicas']}")
    sel = dep["spec"]["selector"]["matchLabels"]
    expect(all(pod["metadata"]["labels"].get(k) == v for k, v in sel.items()),
           "the pod labels do not match the Deployment's selector")
    expect(sel.get("app.kubernetes.io/component") == "operator",
           "the selector must name component=operator (never the worker pods)")
    c = container(r)
    expect("command" not in c, "the container sets command: the image entrypoint is whaleflux")
    want_args = ["operator", "--metrics-addr", f"0.0.0.0:{metrics_port}",
                 "--metrics-host", "$(POD_IP)", "--lease-name", RELEASE, "--lease-namespace", NAMESPACE,
                 "--lease-duration-seconds", str(lease[0]),
                 "--lease-renew-deadline-seconds", str(lease[1]),
                 "--lease-retry-seconds", str(lease[2]),
                 "--api-timeout-seconds", str(timeouts[0]),
                 "--reconcile-timeout-seconds", str(timeouts[1]),
                 "--concurrency", str(concurrency),
                 "--config", "/etc/whaleflux/operator.yaml"]
    expect(c["args"] == want_args, f"args {c['args']} != {want_args}")
    expect(c["image"] == image, f"image {c['image']} != {image}")
    env = {e["name"]: e for e in c.get("env", [])}
    for name, path in (("POD_IP", "status.podIP"), ("POD_NAME", "metadata.name"),
                       ("POD_NAMESPACE", "metadata.namespace")):
        expect(env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == path,
               f"env {name} must come from fieldRef {path}")
    ports = c.get("ports", [])
    expect(ports == [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}],
           f"container ports {ports}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = c.get(probe, {}).get("httpGet", {})
        expect(got.get("path") == path and got.get("port") == "metrics",
               f"{probe} must GET {path} on port metrics: {got}")
    sc = c.get("securityContext", {})
    for k, v in (("runAsNonRoot", True), ("runAsUser", 65532), ("readOnlyRootFilesystem", True),
                 ("allowPrivilegeEscalation", False)):
        expect(sc.get(k) == v, f"container securityContext.{k} must be {v}: {sc}")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    expect(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
    expect(spec.get("automountServiceAccountToken") is True,
           "the operator needs its ServiceAccount token (automountServiceAccountToken: true)")
    expect(spec.get("serviceAccountName") == RELEASE, "serviceAccountName")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    expect("/etc/whaleflux" in mounts, "the config is not mounted at /etc/whaleflux")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    vol = vols.get(mounts["/etc/whaleflux"]["name"], {})
    expect(vol.get("configMap", {}).get("name") == f"{RELEASE}-config",
           f"/etc/whaleflux must be the {RELEASE}-config ConfigMap: {vol}")
    checksum = pod["metadata"].get("annotations", {}).get("checksum/config", "")
    expect(re.fullmatch(r"[0-9a-f]{64}", checksum), f"checksum/config annotation: {checksum!r}")
    ok(f"Deployment: {replicas} replicas, args {' '.join(want_args)}, image {image}, "
       "POD_NAME/POD_NAMESPACE from fieldRef, probes /healthz /readyz on port metrics, "
       "restricted securityContext, config mounted at /etc/whaleflux, checksum/config")


def check_service(r: Render, port: int) -> None:
    svc = r.one("Service", f"{RELEASE}-metrics")
    expect(svc["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics",
                                     "protocol": "TCP"}], f"Service ports {svc['spec']['ports']}")
    dep = r.one("Deployment", RELEASE)
    expect(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"],
           "the metrics Service does not select the operator pods")
    ok(f"Service {RELEASE}-metrics: port metrics {port} -> the operator pods")


def cmd_render_defaults(chart: Path, _args: argparse.Namespace) -> str:
    r = render(chart)
    want = sorted(["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role",
                   "RoleBinding", "Service", "Deployment", "PodDisruptionBudget"])
    expect(r.kinds() == want, f"default kinds {r.kinds()} != {want} (monitoring objects, "
                              "dashboards and the NetworkPolicy are opt-in)")
    ok(f"defaults render exactly {', '.join(want)}")
    check_common(r)
    app = chart_file_yaml(chart, "Chart.yaml")["appVersion"]
    check_deployment(r, metrics_port=8080, lease=(15, 10, 2), timeouts=(30, 120),
                     concurrency=16,
                     image=f"ghcr.io/whaleflux/whaleflux:{app}", replicas=2)
    c = container(r)
    expect(c["imagePullPolicy"] == "IfNotPresent", "default pullPolicy")
    expect("imagePullSecrets" not in r.one("Deployment")["spec"]["template"]["spec"],
           "no imagePullSecrets by default")
    check_service(r, 8080)
    check_rbac(r, chart)
    cfg = operator_config(r)
    expect(cfg["workerImage"] == f"ghcr.io/whaleflux/whaleflux-worker:{app}",
           f"workerImage {cfg['workerImage']}")
    # The operator's own default (operator/src/resources/children.rs DOWNLOAD_IMAGE).
    expect(cfg["downloadImage"] == "curlimages/curl:8.11.1",
           f"downloadImage {cfg['downloadImage']}")
    expect(cfg["imagePullSecrets"] == [], f"imagePullSecrets {cfg['imagePullSecrets']}")
    expect(cfg["gpuTolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}],
           f"gpuTolerations {cfg['gpuTolerations']}")
    # The operator's own defaults (operator/src/resources/settings.rs).
    expect(cfg["allowedHostPaths"] == ["/models"], f"allowedHostPaths {cfg['allowedHostPaths']}")
    expect(cfg["allowedImages"] == [], f"allowedImages {cfg['allowedImages']}")
    ok(f"operator.yaml: workerImage {cfg['workerImage']}, downloadImage {cfg['downloadImage']}, "
       "no pull secrets, the nvidia.com/gpu toleration, hostPath weights under /models, any image")
    pdb = r.one("PodDisruptionBudget", RELEASE)
    expect(pdb["spec"]["maxUnavailable"] == 1, f"PDB {pdb['spec']}")
    expect(pdb["spec"]["selector"]["matchLabels"]
           == r.one("Deployment")["spec"]["selector"]["matchLabels"], "PDB selector")
    ok("PodDisruptionBudget: maxUnavailable 1 over the operator pods")
    crd_names = sorted(c["metadata"]["name"] for c in r.crds)
    expect(crd_names == ["gpupools.whaleflux.io", "llmdeployments.whaleflux.io"],
           f"chart CRDs {crd_names}")
    ok(f"CRDs shipped in crds/: {', '.join(crd_names)}")
    for needle in (f"rollout status deployment/{RELEASE}", "kubectl apply -f examples/",
                   "grafana.dashboards.enabled=true"):
        expect(needle in r.notes, f"NOTES.txt lacks {needle!r}:\n{r.notes}")
    ok("NOTES.txt says how to check the operator, apply an example, and get the dashboards")
    # The checksum rolls the operator when (and only when) its configuration changes.
    base = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    for values, changes in (({"workerImage": {"tag": "0.2.0"}}, True),
                            ({"downloadImage": {"digest": DOWNLOAD_DIGEST}}, True),
                            ({"gpuTolerations": []}, True),
                            ({"imagePullSecrets": [{"name": "regcred"}]}, True),
                            ({"replicaCount": 3}, False)):
        other = render(chart, values).one("Deployment")["spec"]["template"]["metadata"]
        differs = other["annotations"]["checksum/config"] != base
        expect(differs == changes, f"checksum/config {'did not change' if changes else 'changed'}"
                                   f" with {values}")
    ok("checksum/config changes with workerImage, downloadImage, gpuTolerations and "
       "imagePullSecrets, not with replicaCount")
    return f"{len(r.objects)} objects"


# --- render-all-on ---------------------------------------------------------------------------


def cmd_render_all_on(chart: Path, _args: argparse.Namespace) -> str:
    r = render(chart, ALL_ON)
    check_common(r)
    check_deployment(r, metrics_port=9090, lease=(20, 12, 3), timeouts=(20, 90),
                     concurrency=8,
                     image=f"ghcr.io/whaleflux/whaleflux@{DIGEST}", replicas=3)
    ok("image digest wins over the tag (repository@digest)")
    dep = r.one("Deployment", RELEASE)
    spec = dep["spec"]["template"]["spec"]
    c = container(r)
    expect(c["imagePullPolicy"] == "Always", "pullPolicy")
    expect(spec.get("imagePullSecrets") == ALL_ON["imagePullSecrets"], "pod imagePullSecrets")
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        expect(spec.get(key) == ALL_ON[key], f"pod {key} {spec.get(key)} != {ALL_ON[key]}")
    meta = dep["spec"]["template"]["metadata"]
    expect(meta["annotations"].get("example.com/team") == "ml-platform", "podAnnotations")
    expect(meta["labels"].get("team") == "ml-platform", "podLabels")
    expect({"name": "RUST_LOG", "value": "whaleflux=debug,info"} in c["env"], "RUST_LOG")
    ok("pull policy, pull secrets, nodeSelector, tolerations, affinity, priorityClassName, pod "
       "annotations and labels, log level reach the operator pod")
    expect(r.one("ServiceAccount")["metadata"].get("annotations")
           == ALL_ON["serviceAccount"]["annotations"], "ServiceAccount annotations")
    check_service(r, 9090)
    svc = r.one("Service", f"{RELEASE}-metrics")
    expect(svc["metadata"].get("annotations") == {"example.com/scrape": "true"}, "svc annotations")
    check_rbac(r, chart)

    cfg = operator_config(r)
    expect(cfg["workerImage"] == f"ghcr.io/whaleflux/whaleflux-worker@{WORKER_DIGEST}",
           f"workerImage {cfg['workerImage']}")
    expect(cfg["downloadImage"] == f"mirror.example/curl@{DOWNLOAD_DIGEST}",
           f"downloadImage {cfg['downloadImage']}")
    expect(cfg["imagePullSecrets"] == ["regcred", "mirror"], f"{cfg['imagePullSecrets']}")
    expect(cfg["gpuTolerations"] == ALL_ON["gpuTolerations"], f"{cfg['gpuTolerations']}")
    ok("operator.yaml: worker and download images by digest, pull secret names, both GPU "
       "tolerations")

    sm = r.one("ServiceMonitor", RELEASE)
    expect(sm["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor labels")
    expect(sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
           "the ServiceMonitor does not select the metrics Service")
    expect(sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}, "SM namespaceSelector")
    (ep,) = sm["spec"]["endpoints"]
    expect(ep["port"] == "metrics" and ep["honorLabels"] is True and ep["interval"] == "20s"
           and ep["scrapeTimeout"] == "5s", f"ServiceMonitor endpoint {ep}")
    ok("ServiceMonitor: port metrics, honorLabels true, 20s/5s, labels, selects the Service")

    pm = r.one("PodMonitor", f"{RELEASE}-workers")
    expect(pm["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "whaleflux",
                                                      "app.kubernetes.io/component": "worker"}},
           f"PodMonitor selector {pm['spec']['selector']}")
    expect(pm["spec"]["namespaceSelector"] == {"any": True}, "PodMonitor namespaceSelector")
    (pep,) = pm["spec"]["podMetricsEndpoints"]
    expect(pep["port"] == "http" and pep["interval"] == "10s" and pep["scrapeTimeout"] == "5s",
           f"PodMonitor endpoint {pep}")
    relabel = {(tuple(x["sourceLabels"]), x["targetLabel"]) for x in pep["relabelings"]}
    for src, dst in (("__meta_kubernetes_pod_node_name", "node"),
                     ("__meta_kubernetes_pod_label_app_kubernetes_io_instance", "deployment"),
                     ("__meta_kubernetes_namespace", "namespace"),
                     ("__meta_kubernetes_pod_name", "pod")):
        expect(((src,), dst) in relabel, f"PodMonitor lacks the relabeling {src} -> {dst}")
    ok("PodMonitor: worker pods in any namespace, port http, node/deployment/namespace/pod "
       "relabelings")

    (rule,) = r.of_kind("PrometheusRule") or [None]
    expect(rule, "metrics.prometheusRule.enabled rendered no PrometheusRule")
    expect(rule["metadata"]["labels"].get("release") == "prometheus", "PrometheusRule labels")
    alerts = [x.get("alert") for g in rule["spec"]["groups"] for x in g["rules"] if "alert" in x]
    expect(alerts, "the PrometheusRule has no alerts")
    ok(f"PrometheusRule with {len(alerts)} alerts and the extra labels")

    files = sorted(Path(p).name for p in glob.glob(str(chart / "dashboards" / "*.json")))
    for want in DASHBOARDS:
        expect(want in files, f"dashboards/{want} is missing (have {files})")
    cms = [o for o in r.of_kind("ConfigMap")
           if "grafana_dashboard" in (o["metadata"].get("labels") or {})]
    got_files = sorted(k for cm in cms for k in (cm.get("data") or {}))
    expect(got_files == files, f"dashboard ConfigMaps carry {got_files}, the chart has {files}")
    for cm in cms:
        md = cm["metadata"]
        expect(md["labels"]["grafana_dashboard"] == "1", "grafana_dashboard label value")
        expect(md.get("namespace") == "monitoring", f"dashboard namespace {md.get('namespace')}")
        expect(md.get("annotations") == {"grafana_folder": "WhaleFlux"}, "dashboard annotations")
        ((key, text),) = cm["data"].items()
        expect(json.loads(text) == json.loads((chart / "dashboards" / key).read_text()),
               f"ConfigMap {md['name']} does not carry dashboards/{key} verbatim")
    ok(f"{len(cms)} dashboard ConfigMaps ({', '.join(files)}) in namespace monitoring, label "
       "grafana_dashboard=1, JSON verbatim")

    np_ = r.one("NetworkPolicy", RELEASE)
    expect(np_["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"],
           "the NetworkPolicy does not select the operator pods")
    expect(np_["spec"]["policyTypes"] == ["Ingress"], "egress must stay unrestricted")
    expect(np_["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}],
                                       "from": ALL_ON["networkPolicy"]["metricsFrom"]}],
           f"NetworkPolicy ingress {np_['spec']['ingress']}")
    ok("NetworkPolicy: ingress only to port metrics from networkPolicy.metricsFrom; egress open")
    pdb = r.one("PodDisruptionBudget", RELEASE)
    expect(pdb["spec"]["maxUnavailable"] == 1, "PDB")
    ok("PodDisruptionBudget maxUnavailable 1")
    for needle in ("A ServiceMonitor scrapes", "A PodMonitor scrapes", "Alerts:",
                   "dashboard-* in namespace monitoring"):
        expect(needle in r.notes, f"NOTES.txt lacks {needle!r}:\n{r.notes}")
    ok("NOTES.txt names the monitors, the alerts and where the dashboards are")

    # Toggles off again: each object goes away.
    off = render(chart, deep_merge(ALL_ON, {
        "metrics": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False},
                    "prometheusRule": {"enabled": False}},
        "grafana": {"dashboards": {"enabled": False}},
        "networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
        "rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing-sa"}}))
    expect(off.kinds() == ["ConfigMap", "Deployment", "Service"], f"toggled off: {off.kinds()}")
    expect(off.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
           == "existing-sa", "serviceAccount.name with create=false")
    ok("each toggle off removes its objects; serviceAccount.create=false uses serviceAccount.name")
    return f"{len(r.objects)} objects: {', '.join(sorted(set(r.kinds())))}"


# --- schema ----------------------------------------------------------------------------------


def schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        expect(ref.startswith("#/"), f"external $ref {ref}")
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def audit_schema(schema: dict[str, Any]) -> int:
    """Every object in values.schema.json closes its keys (additionalProperties: false) or is a
    typed free-form map (additionalProperties: <schema>). Returns the objects seen."""
    seen = 0

    def walk(node: Any, path: str) -> None:
        nonlocal seen
        if isinstance(node, dict):
            # The value schema of a free-form map (e.g. affinity's terms) is the free part.
            free_value = path.endswith("/additionalProperties")
            if node.get("type") == "object" and path != "/properties/global" and not free_value:
                seen += 1
                ap = node.get("additionalProperties", None)
                expect(ap is False or isinstance(ap, dict),
                       f"values.schema.json{path}: an object without additionalProperties "
                       "(false, or a schema for a free-form map)")
                if isinstance(ap, dict):
                    expect("type" in ap or "$ref" in ap,
                           f"values.schema.json{path}: free-form map values are untyped")
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    return seen


def audit_values_comments(chart: Path, schema: dict[str, Any]) -> int:
    """Every key of values.yaml has a comment line right above it and exists in the schema;
    keys inside free-form maps and list items are data, not settings."""
    lines = (chart / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, dict[str, Any] | None]] = []  # (indent, key, schema node)
    list_indent: int | None = None
    keys = 0
    prev = ""
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            prev = ""
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            prev = stripped
            continue
        if list_indent is not None and indent > list_indent:
            prev = ""
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            prev = ""
            continue
        m = re.match(r"([A-Za-z0-9_.-]+|\"[^\"]+\"):", stripped)
        expect(m, f"values.yaml:{n}: cannot read {line!r}")
        key = m.group(1).strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][2] if stack else schema
        if parent is None:  # inside a free-form map: data
            stack.append((indent, key, None))
            prev = ""
            continue
        parent = schema_node(schema, parent)
        ap = parent.get("additionalProperties")
        props = parent.get("properties", {})
        path = ".".join([s[1] for s in stack] + [key])
        if key in props:
            node: dict[str, Any] | None = schema_node(schema, props[key])
            expect(prev.startswith("#"), f"values.yaml:{n}: {path} has no comment above it")
            keys += 1
        elif isinstance(ap, dict):
            node = None
        else:
            raise CheckError(f"values.yaml:{n}: {path} is not in values.schema.json")
        if node is not None and not (node.get("type") == "object" and "properties" in node):
            node = None if node.get("type") == "object" else node
        stack.append((indent, key, node))
        prev = ""
    return keys


def cmd_schema(chart: Path, _args: argparse.Namespace) -> str:
    schema = json.loads((chart / "values.schema.json").read_text())
    expect(schema.get("$schema") == "http://json-schema.org/draft-07/schema#",
           "values.schema.json must declare draft-07")
    jsonschema.Draft7Validator.check_schema(schema)
    objects = audit_schema(schema)
    ok(f"values.schema.json is valid draft-07; all {objects} objects close their keys "
       "(additionalProperties false, or typed free-form maps)")
    keys = audit_values_comments(chart, schema)
    ok(f"values.yaml: {keys} settings, each with a comment and in the schema")
    with helm.Chart.load(str(chart)) as c:
        c.validate_schema(c.values)
        c.validate_schema(c.merge_values(ALL_ON))
    ok("the default values and the all-on values pass the schema")
    cases = sorted(BAD_VALUES.glob("*.yaml"))
    expect(len(cases) >= 6, f"only {len(cases)} cases in {BAD_VALUES}")
    for case in cases:
        text = case.read_text()
        m = re.search(r"^# expect: (.+?)\s*$", text, re.M)
        expect(m, f"{case.name} has no '# expect: <substring>' header")
        want = m.group(1)
        values = yaml.safe_load(text) or {}
        try:
            Render(chart, values)
        except helm.HelmError as e:
            msg = str(e)
            expect(want in msg, f"{case.name}: the error does not contain {want!r}:\n{msg}")
            first = next((ln.strip() for ln in msg.splitlines() if want in ln), msg)
            ok(f"{case.name}: refused ({first})")
            continue
        raise CheckError(f"{case.name}: the install was accepted, expected an error with {want!r}")
    return f"{len(cases)} bad values files refused, defaults and all-on accepted"


def validate_object(obj: dict[str, Any], crds: CrdValidator) -> list[str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    if group == "monitoring.coreos.com":
        return monitoring_errors(obj)
    if group in crds.groups():
        return crds.errors(obj)
    return [f"[k8s {v}] {m}" for v in KUBE_VERSIONS for m in builtin_errors(obj, v)]


def cmd_validate(chart: Path, _args: argparse.Namespace) -> str:
    r = render(chart, ALL_ON)
    crds = CrdValidator(r.crds)
    objs = r.crds + r.objects
    counts: dict[str, int] = {}
    for o in objs:
        errs = validate_object(o, crds)
        where = f"{o.get('kind')} {o.get('metadata', {}).get('name')}"
        expect(not errs, f"{where} is invalid:\n  " + "\n  ".join(errs))
        group = o["apiVersion"].rpartition("/")[0]
        how = ("monitoring.coreos.com structure" if group == "monitoring.coreos.com"
               else "its CRD schema" if group in crds.groups()
               else f"kubernetes-validate strict {'/'.join(KUBE_VERSIONS)}")
        counts[how] = counts.get(how, 0) + 1
        ok(f"{where} ({o['apiVersion']}) against {how}")
    # Our own kinds: the repository's examples against the chart's CRDs.
    examples = sorted(glob.glob(str(REPO / "examples" / "*.yaml")))
    n_examples = 0
    for path in examples:
        for o in yaml.safe_load_all(Path(path).read_text()):
            if o and o.get("apiVersion", "").startswith("whaleflux.io/"):
                errs = crds.errors(o)
                expect(not errs, f"examples/{Path(path).name} {o['kind']} is invalid:\n  "
                       + "\n  ".join(errs))
                n_examples += 1
                ok(f"examples/{Path(path).name}: {o['kind']} {o['metadata']['name']} against "
                   "the chart's CRD schema")
    expect(n_examples >= 2, "no whaleflux.io examples were validated")
    # The validators can fail: a wrong object of each family must be refused.
    dep = copy.deepcopy(r.one("Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    llmd = {"apiVersion": "whaleflux.io/v1alpha1", "kind": "LlmDeployment",
            "metadata": {"name": "bad"}, "spec": {"gpuPool": "p", "replicas": "two",
                                                   "model": {"preset": "smollm2-135m"},
                                                   "surplus": True}}
    sm = copy.deepcopy(r.one("ServiceMonitor"))
    sm["spec"]["endpoints"][0]["honorlabels"] = True
    for label, bad in (("a Deployment with a typo'd field", dep),
                       ("an LlmDeployment with a string replicas and an unknown field", llmd),
                       ("a ServiceMonitor with a typo'd field", sm)):
        errs = validate_object(bad, crds)
        expect(errs, f"the validator accepted {label}")
        ok(f"control: {label} is refused ({errs[0].splitlines()[0]})")
    summary = ", ".join(f"{n} by {how}" for how, n in sorted(counts.items()))
    return f"{len(objs)} objects valid ({summary}); {n_examples} examples valid"


def cmd_pss(chart: Path, _args: argparse.Namespace) -> str:
    good = _good_pod()
    expect(pss_restricted(good) == [], f"the checker refuses a compliant pod: "
                                       f"{pss_restricted(good)}")
    for label, want, spoil in _bad_pods():
        pod = copy.deepcopy(good)
        spoil(pod)
        found = pss_restricted(pod)
        expect(any(want in f for f in found),
               f"the checker accepted a pod with {label} (found {found})")
    ok(f"control: the checker passes a compliant pod and refuses {len(_bad_pods())} deliberately "
       "bad ones (runAsNonRoot, runAsUser 0, privilege escalation, capabilities, seccomp, "
       "hostPath, host namespaces, privileged, hostPort, volume types, sysctls, initContainers, "
       "procMount)")
    n = 0
    for label, values in (("defaults", None), ("all toggles on", ALL_ON)):
        r = render(chart, values)
        for o in r.objects:
            for t in pod_templates(o):
                found = pss_restricted(t)
                expect(not found, f"{o['kind']} {o['metadata']['name']} ({label}) violates the "
                                  "restricted Pod Security Standard:\n  " + "\n  ".join(found))
                n += 1
                ok(f"{o['kind']} {o['metadata']['name']} ({label}) meets the restricted standard")
    expect(n >= 2, "no pod templates were found in the render")
    return f"{n} pod templates meet the restricted Pod Security Standard"


# --- crds-in-sync ----------------------------------------------------------------------------


def cmd_crds_in_sync(chart: Path, _args: argparse.Namespace) -> str:
    src = REPO / "crds" / "manifests"
    want = sorted(p.name for p in src.glob("*.yaml"))
    have = sorted(p.name for p in (chart / "crds").glob("*.yaml"))
    expect(want, f"no CRDs in {src}")
    expect(have == want, f"charts/whaleflux/crds has {have}, crds/manifests has {want}; "
                         "copy them: cp crds/manifests/*.yaml charts/whaleflux/crds/")
    for name in want:
        a, b = (src / name).read_bytes(), (chart / "crds" / name).read_bytes()
        expect(a == b, f"charts/whaleflux/crds/{name} differs from crds/manifests/{name}; "
                       "copy it: cp crds/manifests/*.yaml charts/whaleflux/crds/")
        ok(f"{name}: identical (sha256 {hashlib.sha256(a).hexdigest()[:16]})")
    return f"{len(want)} CRDs identical to crds/manifests"


# --- render ----------------------------------------------------------------------------------


def cmd_render(chart: Path, args: argparse.Namespace) -> str | None:
    values: dict[str, Any] = {}
    for f in args.values or []:
        values = deep_merge(values, helm.values_from_yaml(Path(f).read_text()))
    for s in args.set or []:
        values = deep_merge(values, helm.parse_set_string(s))
    for s in args.set_string or []:
        values = deep_merge(values, helm.parse_set_string_values(s))
    for s in args.set_json or []:
        values = deep_merge(values, helm.parse_set_json(s))
    r = render(chart, values, release=args.release, namespace=args.namespace)
    docs = (r.crds if args.include_crds else []) + r.objects
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    if args.notes:
        sys.stderr.write(r.notes)
    return None


COMMANDS: dict[str, Callable[[Path, argparse.Namespace], str | None]] = {
    "lint": cmd_lint,
    "render-defaults": cmd_render_defaults,
    "render-all-on": cmd_render_all_on,
    "schema": cmd_schema,
    "validate": cmd_validate,
    "pss": cmd_pss,
    "crds-in-sync": cmd_crds_in_sync,
}


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chart", type=Path, default=DEFAULT_CHART,
                    help="chart directory (default: charts/whaleflux)")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        sub.add_parser(name, help=(globals()[f"cmd_{name.replace('-', '_')}"].__doc__ or None))
    sub.add_parser("all", help="every check above, in order")
    rp = sub.add_parser("render", help="print the rendered manifest as YAML")
    rp.add_argument("-f", "--values", action="append", help="a values file (repeatable)")
    rp.add_argument("--set", action="append", help="helm --set expression (repeatable)")
    rp.add_argument("--set-string", action="append", help="helm --set-string (repeatable)")
    rp.add_argument("--set-json", action="append", help="helm --set-json (repeatable)")
    rp.add_argument("--release", default=RELEASE, help=f"release name (default {RELEASE})")
    rp.add_argument("--namespace", default=NAMESPACE, help=f"namespace (default {NAMESPACE})")
    rp.add_argument("--include-crds", action="store_true", help="print the CRDs first")
    rp.add_argument("--notes", action="store_true", help="print NOTES.txt to stderr")
    args = ap.parse_args(list(argv) if argv is not None else None)
    chart = args.chart.resolve()
    if args.command == "render":
        try:
            cmd_render(chart, args)
        except (CheckError, helm.HelmError) as e:
            print(f"FAIL render: {e}", file=sys.stderr)
            return 1
        return 0
    names = list(COMMANDS) if args.command == "all" else [args.command]
    for name in names:
        print(f"== {name} ({chart})")
        try:
            summary = COMMANDS[name](chart, args)
        except (CheckError, helm.HelmError, OSError, yaml.YAMLError) as e:
            print(f"FAIL {name}: {e}", flush=True)
            return 1
        print(f"PASS {name}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
