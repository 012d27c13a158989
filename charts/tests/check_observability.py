#!/usr/bin/env python3
"""Checks of WhaleFlux's Grafana dashboards and Prometheus alerts.

    check_observability.py rules
        Renders the chart with metrics.prometheusRule.enabled=true (helm_python, offline), writes
        the PrometheusRule's spec to a temporary rules.yaml, runs `promtool check rules` on it and
        `promtool test rules` on a copy of charts/tests/alerts_test.yaml whose rule_files point
        at it. Also checks the rule set (every expected alert, severity, annotations), that the
        thresholds come from the values, the extra labels, and that nothing renders when off.

    check_observability.py exprs [--exported FILE... [--no-gpu]]
        Checks the dashboards' structure (schemaVersion, uid, tags, the datasource and the
        namespace/deployment/node variables, every panel on ${datasource}, every query filtered
        by the variables its metric has labels for), parses every PromQL expression of the
        dashboards and the rules with `promtool check rules` (template variables substituted),
        and prints the metric names each references. With --exported, every referenced name
        must be exported in one of the given /metrics texts (scraped from the binaries); with
        --no-gpu too, the GPU metrics may be missing (a family without samples is not encoded,
        and without a GPU the GPU families have none).

    check_observability.py prometheus --targets HOST:PORT,... [--no-gpu]
        Starts `prometheus` on a free loopback port scraping the targets every second, waits
        for them to be up, then evaluates every panel query of the serving and operator
        dashboards and the other panels of the GPU fleet dashboard (its GPU panels too unless
        --no-gpu) and fails listing the panels without data (a panel has data when one of its
        queries returns a series; a quantile of no traffic in the window is NaN, which counts).
        Every query variable's series must exist, and every rule expression must evaluate
        without error.

Needs Python with PyYAML and helm_python (rules, exprs), and promtool/prometheus on PATH (or
$PROMTOOL / $PROMETHEUS). Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "whaleflux"
ALERTS_TEST = REPO / "charts" / "tests" / "alerts_test.yaml"
DASHBOARDS = ("gpu-fleet", "serving", "operator")
RELEASE = "whaleflux"
NAMESPACE = "whaleflux-system"

EXPECTED_ALERTS = {
    "WhaleFluxGpuFatalFault",
    "WhaleFluxGpuEccUncorrected",
    "WhaleFluxGpuTooHot",
    "WhaleFluxNodeQuarantined",
    "WhaleFluxDeploymentDegraded",
    "WhaleFluxRestartBudgetExhausted",
    "WhaleFluxReplicasNotReady",
    "WhaleFluxTimeToFirstTokenHigh",
    "WhaleFluxRequestsRefused",
    "WhaleFluxOperatorDown",
    "WhaleFluxOperatorNoLeader",
}
SEVERITIES = {"critical", "warning", "info"}

# Which dashboard variables a metric's queries must use: the labels the metric carries once
# scraped (worker and GPU series get namespace/deployment/node from the PodMonitor; the
# operator's per-deployment and per-node series carry their own).
WORKER_LABELS = ("namespace", "deployment", "node")
FILTERS = {
    "whaleflux_groups_ready": ("namespace", "deployment"),
    "whaleflux_groups_desired": ("namespace", "deployment"),
    "whaleflux_deployment_degraded": ("namespace", "deployment"),
    "whaleflux_group_restarts_total": ("namespace", "deployment"),
    "whaleflux_node_quarantined": ("node",),
}

# Panels that are empty on healthy hardware (events a GPU never had, links it does not have,
# lists of faulty things): with GPUs, `prometheus` does not require data from them.
MAY_BE_EMPTY = {
    ("whaleflux-gpu-fleet", "XID errors by code"),
    ("whaleflux-gpu-fleet", "NVLink errors"),
    ("whaleflux-gpu-fleet", "Throttling reasons active now"),
    ("whaleflux-gpu-fleet", "Unhealthy GPUs now"),
}

# Counters labelled by an event's code (XID): a healthy GPU never has a series of them.
EVENT_COUNTERS = {"whaleflux_gpu_xid_errors_total"}

# Series Prometheus makes itself, never exported by a binary.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                  "scrape_samples_post_metric_relabeling", "scrape_series_added"}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan", "atan2"}

FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)


def tool(name: str) -> str:
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        sys.exit(f"{name} not found: install Debian's `prometheus` package or set ${name.upper()}")
    return path


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        fail(f"{' '.join(cmd)} ran past {timeout} s")
        return subprocess.CompletedProcess(cmd, 124, "", "timed out")


# ---------------------------------------------------------------------------------------------
# Rendering the chart


def render(chart: Path, values: dict) -> list[dict]:
    """Every object the chart renders with `values` (offline, through helm_python)."""
    from helm_python import Chart  # imported here: `exprs --exported` and `prometheus` need
    # it only for the rules

    with Chart.load(str(chart)) as ch:
        out = ch.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path in sorted(out):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if isinstance(doc, dict):
                docs.append(doc)
    return docs


def prometheus_rule(chart: Path, rule_values: dict) -> dict | None:
    values = {"metrics": {"prometheusRule": rule_values}}
    rules = [d for d in render(chart, values) if d.get("kind") == "PrometheusRule"]
    if len(rules) > 1:
        fail(f"{len(rules)} PrometheusRules rendered, expected one")
    return rules[0] if rules else None


def alerts_of(spec: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for group in spec.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" in rule:
                if rule["alert"] in out:
                    fail(f"alert {rule['alert']} is defined twice")
                out[rule["alert"]] = rule
    return out


def rule_exprs(chart: Path) -> list[tuple[str, str]]:
    rule = prometheus_rule(chart, {"enabled": True})
    if rule is None:
        fail("metrics.prometheusRule.enabled=true renders no PrometheusRule")
        return []
    out = []
    for group in rule["spec"].get("groups", []):
        for r in group.get("rules", []):
            name = r.get("alert") or r.get("record") or "?"
            out.append((f"rule {name}", str(r.get("expr", "")).strip()))
    return out


# ---------------------------------------------------------------------------------------------
# rules


def cmd_rules(args: argparse.Namespace) -> None:
    promtool = tool("promtool")
    chart = Path(args.chart)
    if prometheus_rule(chart, {"enabled": False}) is not None:
        fail("a PrometheusRule renders with metrics.prometheusRule.enabled=false")

    rule = prometheus_rule(chart, {"enabled": True, "labels": {"release": "prometheus"}})
    if rule is None:
        fail("metrics.prometheusRule.enabled=true renders no PrometheusRule")
        return
    if rule.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(f"PrometheusRule apiVersion is {rule.get('apiVersion')}")
    meta = rule.get("metadata", {})
    labels = meta.get("labels", {})
    for key, want in (("release", "prometheus"), ("app.kubernetes.io/part-of", "whaleflux"),
                      ("app.kubernetes.io/managed-by", "Helm")):
        if labels.get(key) != want:
            fail(f"PrometheusRule label {key}={labels.get(key)!r}, expected {want!r}")
    if meta.get("namespace") != NAMESPACE:
        fail(f"PrometheusRule namespace {meta.get('namespace')!r}, expected {NAMESPACE!r}")

    alerts = alerts_of(rule["spec"])
    if set(alerts) != EXPECTED_ALERTS:
        fail(f"alerts: missing {sorted(EXPECTED_ALERTS - set(alerts))}, "
             f"unexpected {sorted(set(alerts) - EXPECTED_ALERTS)}")
    for name, a in alerts.items():
        if a.get("labels", {}).get("severity") not in SEVERITIES:
            fail(f"{name}: severity label {a.get('labels', {}).get('severity')!r}")
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            if not str(ann.get(key, "")).strip():
                fail(f"{name}: no {key} annotation")
        for key, text in ann.items():
            if ".Values" in text or ".Release" in text or "%!" in text:
                fail(f"{name}: annotation {key} has Helm leftovers: {text}")

    # The thresholds come from the values.
    custom = {"gpuTemperatureCelsius": 91, "replicasNotReadyMinutes": 7, "ttftP95Seconds": 1.5,
              "ttftForMinutes": 3, "queueRefusalsPerSecond": 0.25, "operatorDownMinutes": 4}
    tuned = prometheus_rule(chart, {"enabled": True, "thresholds": custom})
    if tuned is None:
        fail("no PrometheusRule with custom thresholds")
    else:
        t = alerts_of(tuned["spec"])
        checks = [
            ("WhaleFluxGpuTooHot", "expr", "> 91"),
            ("WhaleFluxReplicasNotReady", "for", "7m"),
            ("WhaleFluxTimeToFirstTokenHigh", "expr", "> 1.5"),
            ("WhaleFluxTimeToFirstTokenHigh", "for", "3m"),
            ("WhaleFluxRequestsRefused", "expr", "> 0.25"),
            ("WhaleFluxOperatorDown", "for", "4m"),
            ("WhaleFluxOperatorNoLeader", "for", "4m"),
        ]
        for name, field, want in checks:
            got = str(t.get(name, {}).get(field, "")).strip()
            ok = got.endswith(want) if field == "expr" else got == want
            if not ok:
                fail(f"{name}.{field} is {got!r} with custom thresholds; expected {want!r}")

    with tempfile.TemporaryDirectory(prefix="wf-rules-") as tmp:
        rules_file = Path(tmp) / "rules.yaml"
        default = prometheus_rule(chart, {"enabled": True})
        rules_file.write_text(yaml.safe_dump(default["spec"] if default else {}, sort_keys=False))
        r = run([promtool, "check", "rules", str(rules_file)])
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            fail("promtool check rules failed")

        tests = yaml.safe_load(ALERTS_TEST.read_text())
        tests["rule_files"] = [rules_file.name]
        tested = set()
        for case in tests.get("tests", []):
            for t in case.get("alert_rule_test", []):
                if t.get("exp_alerts"):
                    tested.add(t["alertname"])
        if EXPECTED_ALERTS - tested:
            fail(f"alerts never shown firing in {ALERTS_TEST.name}: "
                 f"{sorted(EXPECTED_ALERTS - tested)}")
        copy = Path(tmp) / "alerts_test.yaml"
        copy.write_text(yaml.safe_dump(tests, sort_keys=False))
        r = run([promtool, "test", "rules", str(copy)])
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            fail("promtool test rules failed")
    if not FAILURES:
        print(f"rules: {len(alerts)} alerts, promtool check and unit tests passed")


# ---------------------------------------------------------------------------------------------
# Dashboards and expressions


def load_dashboards(chart: Path) -> dict[str, dict]:
    out = {}
    for name in DASHBOARDS:
        path = chart / "dashboards" / f"{name}.json"
        try:
            out[name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            fail(f"{path}: {e}")
    return out


def panels_of(dash: dict) -> list[dict]:
    out = []
    stack = list(dash.get("panels", []))
    while stack:
        p = stack.pop(0)
        out.append(p)
        stack.extend(p.get("panels", []))  # panels of collapsed rows
    return out


def var_query(v: dict) -> str:
    q = v.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else str(q)


def label_values_selector(q: str) -> str | None:
    """The series selector of label_values(SELECTOR, label), or None."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", q, re.S)
    return m.group(1).strip() if m else None


def substitute(expr: str, interval: str) -> str:
    """Grafana's variables: intervals become `interval`, the rest match anything."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", interval, expr)
    return re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (in matchers and by/on lists) or durations."""
    return {name for name, _ in selectors(expr)}


def blank(m: re.Match) -> str:
    return " " * len(m.group(0))


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric, {label: (op, value)}) for each `metric{...}` or bare metric in `expr`."""
    # Mask strings, matcher bodies, ranges and label lists (same length, so offsets hold).
    masked = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', blank, expr)
    masked = re.sub(r"(?<=\{)[^}]*(?=\})", blank, masked)
    masked = re.sub(r"\[[^\]]*\]", blank, masked)
    masked = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", blank,
                    masked)
    out = []
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(\s*\{)?", masked):
        name = m.group(1)
        if name.lower() in PROMQL_WORDS:
            continue
        if not m.group(2) and re.match(r"\s*\(", masked[m.end():]):
            continue  # a function call or an aggregation
        matchers: dict[str, tuple[str, str]] = {}
        if m.group(2):
            body = expr[m.end():masked.index("}", m.end())]
            for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body):
                matchers[lm.group(1)] = (lm.group(2), lm.group(3))
        out.append((name, matchers))
    return out


def required_filters(metric: str) -> tuple[str, ...]:
    if metric.startswith(("whaleflux_worker_", "whaleflux_gpu_")):
        return WORKER_LABELS
    return FILTERS.get(metric, ())


def check_dashboard(name: str, d: dict) -> None:
    where = f"dashboard {name}"
    if d.get("schemaVersion") != 39:
        fail(f"{where}: schemaVersion {d.get('schemaVersion')}, expected 39")
    if not d.get("uid") or not d.get("title"):
        fail(f"{where}: no uid or title")
    if "whaleflux" not in d.get("tags", []):
        fail(f"{where}: tags {d.get('tags')} lack whaleflux")
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail(f"{where}: no datasource variable of type datasource/prometheus")
    for var in WORKER_LABELS:
        v = variables.get(var)
        if not v or v.get("type") != "query":
            fail(f"{where}: no query variable {var}")
            continue
        if v.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{where}: variable {var} is not on ${{datasource}}")
        sel = label_values_selector(var_query(v))
        if sel is None or not re.search(rf",\s*{var}\s*\)\s*$", var_query(v)):
            fail(f"{where}: variable {var} is not label_values(..., {var}): {var_query(v)!r}")
    ids = set()
    titles = set()
    for p in panels_of(d):
        title = p.get("title", "?")
        if p.get("type") == "row":
            continue
        if title in titles:
            fail(f"{where}: two panels titled {title!r}")
        titles.add(title)
        if p.get("type") not in ("timeseries", "stat", "table"):
            fail(f"{where}/{title}: panel type {p.get('type')}")
        if p.get("id") in ids:
            fail(f"{where}/{title}: duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{where}/{title}: panel datasource is not ${{datasource}}")
        if not p.get("targets"):
            fail(f"{where}/{title}: no queries")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid", "${datasource}") != "${datasource}":
                fail(f"{where}/{title}: query {t.get('refId')} datasource is not ${{datasource}}")
            for metric, matchers in selectors(t.get("expr", "")):
                for label in required_filters(metric):
                    op, value = matchers.get(label, ("", ""))
                    if op != "=~" or value not in (f"${label}", f"${{{label}}}"):
                        fail(f"{where}/{title}: {metric} is not filtered by "
                             f'{label}=~"${label}"')


def dashboard_exprs(dashes: dict[str, dict]) -> list[tuple[str, str]]:
    out = []
    for name, d in dashes.items():
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                sel = label_values_selector(var_query(v))
                if sel is None:
                    fail(f"dashboard {name}: variable {v.get('name')} is not label_values()")
                else:
                    out.append((f"{name} variable {v.get('name')}", sel))
        for p in panels_of(d):
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"{name} panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
    return out


def promtool_parse(exprs: list[tuple[str, str]]) -> None:
    promtool = tool("promtool")

    def check(batch: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
        doc = {"groups": [{"name": "whaleflux-exprs", "rules": [
            {"record": f"whaleflux_check:expr_{i}", "expr": substitute(e, "5m")}
            for i, (_, e) in enumerate(batch)]}]}
        with tempfile.TemporaryDirectory(prefix="wf-exprs-") as tmp:
            f = Path(tmp) / "exprs.yaml"
            f.write_text(yaml.safe_dump(doc, sort_keys=False))
            return run([promtool, "check", "rules", str(f)])

    r = check(exprs)
    if r.returncode == 0:
        print(f"exprs: all {len(exprs)} expressions parse (promtool check rules)")
        return
    for src, e in exprs:  # find which
        one = check([(src, e)])
        if one.returncode != 0:
            fail(f"{src}: does not parse: {e}\n{one.stdout}{one.stderr}")


def exported_names(text: str) -> set[str]:
    """Series names a /metrics text (Prometheus text or OpenMetrics) makes Prometheus store."""
    present = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            fam, kind = parts[2], parts[3]
            if kind == "counter":
                present.add(fam if fam.endswith("_total") else fam + "_total")
            elif kind in ("histogram", "gaugehistogram"):
                present.update({fam + "_bucket", fam + "_sum", fam + "_count"})
            elif kind == "summary":
                present.update({fam, fam + "_sum", fam + "_count"})
            elif kind == "info":
                present.add(fam + "_info")
            else:
                present.add(fam)
        elif line and not line.startswith("#"):
            m = re.match(r"[A-Za-z_:][\w:]*", line)
            if m:
                present.add(m.group(0))
    return present


def cmd_exprs(args: argparse.Namespace) -> None:
    chart = Path(args.chart)
    dashes = load_dashboards(chart)
    for name, d in dashes.items():
        check_dashboard(name, d)
    uids = [d.get("uid") for d in dashes.values()]
    if len(set(uids)) != len(uids):
        fail(f"dashboard uids are not unique: {uids}")
    exprs = dashboard_exprs(dashes) + rule_exprs(chart)
    promtool_parse(exprs)
    referenced: dict[str, list[str]] = {}
    for src, e in exprs:
        names = sorted(metric_names(e))
        print(f"{src}: {' '.join(names) or '-'}")
        if not names:
            fail(f"{src}: references no metric: {e}")
        for n in names:
            referenced.setdefault(n, []).append(src)
    print("metric names referenced:", " ".join(sorted(referenced)))
    if args.exported:
        present: set[str] = set()
        for f in args.exported:
            present |= exported_names(Path(f).read_text())
        missing = sorted(set(referenced) - present - PROMETHEUS_OWN)
        if args.no_gpu:
            # prometheus_client encodes no family without samples: without a GPU the GPU
            # families do not appear in /metrics at all.
            unchecked = [n for n in missing if n.startswith("whaleflux_gpu_")]
            if unchecked:
                print(f"exprs: not checked without a GPU: {' '.join(unchecked)}")
            missing = [n for n in missing if n not in unchecked]
        # Counters labelled by an event's code have no series until the first event.
        events = [n for n in missing if n in EVENT_COUNTERS]
        if events:
            print(f"exprs: no series until their first event: {' '.join(events)}")
        missing = [n for n in missing if n not in events]
        for n in missing:
            fail(f"{n} is not exported by the binaries (used by {', '.join(referenced[n])})")
        if not missing:
            print(f"exprs: every referenced metric is exported ({len(args.exported)} files)")


# ---------------------------------------------------------------------------------------------
# prometheus


def loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return json.loads(r.read().decode())


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return http_json(url)
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error
        try:
            return json.loads(e.read().decode())
        except ValueError:
            return {"status": "error", "error": str(e)}
    except (OSError, ValueError) as e:
        return {"status": "error", "error": str(e)}


def wait_for(what: str, deadline: float, check, proc: subprocess.Popen, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            sys.exit(f"prometheus exited ({proc.returncode}) while waiting for {what}:\n"
                     + log.read_text(errors="replace")[-4000:])
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}; prometheus log:\n"
                     + log.read_text(errors="replace")[-4000:])
        time.sleep(0.25)


def is_gpu_panel(exprs: list[str]) -> bool:
    names = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
    return bool(names) and any(n.startswith("whaleflux_gpu_") for n in names)


def cmd_prometheus(args: argparse.Namespace) -> None:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        sys.exit("--targets is empty")
    for t in targets:
        if not loopback(t):
            sys.exit(f"{t}: only loopback targets are scraped")
    binary = tool("prometheus")
    chart = Path(args.chart)
    dashes = load_dashboards(chart)
    rules = rule_exprs(chart)
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="wf-prometheus-") as tmp:
        tmpdir = Path(tmp)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "whaleflux",
                                "static_configs": [{"targets": targets}]}],
        }
        (tmpdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = tmpdir / "prometheus.log"
        with log.open("w") as logf:
            proc = subprocess.Popen(
                [binary, f"--config.file={tmpdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmpdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def ready() -> bool:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:  # noqa: S310
                    return r.status == 200

            wait_for("prometheus to be ready", deadline, ready, proc, log)

            def targets_up() -> bool:
                active = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
                return len(active) == len(targets) and all(a["health"] == "up" for a in active)

            wait_for(f"targets {targets} to be up", deadline, targets_up, proc, log)

            def scraped() -> bool:  # enough samples for rate() over the substituted 1m
                r = query(base, "min(count_over_time(up[1m]))")["data"]["result"]
                return bool(r) and float(r[0]["value"][1]) >= 5

            wait_for("five scrapes of every target", deadline, scraped, proc, log)

            evaluate(base, dashes, rules, args.no_gpu)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def evaluate(base: str, dashes: dict[str, dict], rules: list[tuple[str, str]], no_gpu: bool):
    checked = skipped = 0
    for name, d in dashes.items():
        uid = d.get("uid", name)
        for p in panels_of(d):
            exprs = [t["expr"] for t in p.get("targets", []) if t.get("expr")]
            if not exprs:
                continue
            title = p.get("title")
            if no_gpu and is_gpu_panel(exprs):
                print(f"{name} / {title}: skipped (GPU panel, --no-gpu)")
                skipped += 1
                continue
            with_data = 0
            for e in exprs:
                r = query(base, substitute(e, "1m"))
                if r.get("status") != "success":
                    fail(f"{name} / {title}: query error {r.get('error')}: {e}")
                    continue
                n = len(r["data"]["result"])
                print(f"{name} / {title}: {n} series from {e}")
                with_data += n > 0
            checked += 1
            if not with_data and (uid, title) not in MAY_BE_EMPTY:
                fail(f"{name} / {title}: no data from any of its queries")
        for v in d.get("templating", {}).get("list", []):
            sel = label_values_selector(var_query(v)) if v.get("type") == "query" else None
            if sel is None or (no_gpu and is_gpu_panel([sel])):
                continue
            r = query(base, f"count({substitute(sel, '1m')})")
            if r.get("status") != "success" or not r["data"]["result"]:
                fail(f"{name} variable {v.get('name')}: no series for {sel}")
    for src, e in rules:
        r = query(base, e)
        if r.get("status") != "success":
            fail(f"{src}: query error {r.get('error')}: {e}")
    print(f"prometheus: {checked} panels evaluated, {skipped} GPU panels skipped, "
          f"{len(rules)} rule expressions evaluated")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chart", default=str(CHART), help="chart directory (default: the repo's)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("rules", help="render the PrometheusRule; promtool check and unit tests")
    e = sub.add_parser("exprs", help="dashboards' structure; every expression parses; names")
    e.add_argument("--exported", nargs="+", metavar="FILE",
                   help="/metrics texts: every referenced metric must be exported in them")
    e.add_argument("--no-gpu", action="store_true",
                   help="with --exported: GPU metrics (whaleflux_gpu_*) may be missing")
    p = sub.add_parser("prometheus", help="every panel has data from the running binaries")
    p.add_argument("--targets", required=True, help="HOST:PORT,... of workers and operator")
    p.add_argument("--no-gpu", action="store_true", help="GPU panels may have no data")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the targets")
    args = ap.parse_args()
    {"rules": cmd_rules, "exprs": cmd_exprs, "prometheus": cmd_prometheus}[args.cmd](args)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed:", file=sys.stderr)
        for f in FAILURES:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.cmd}: OK")


if __name__ == "__main__":
    main()
