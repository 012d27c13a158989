"""Kubernetes checks the chart tests share, with no Helm in them: our CRDs' schemas as JSON
Schema, the Prometheus Operator kinds' structure, built-in kinds through kubernetes-validate,
and the restricted Pod Security Standard (with the pods that must fail it)."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
from typing import Any, Callable

# --- validate --------------------------------------------------------------------------------


def crd_to_jsonschema(node: Any, root: bool = False) -> Any:
    """A CRD's structural OpenAPI v3 schema as a draft-07 JSON schema, as the API server reads it
    with strict field validation: unknown fields are errors, nullable allows null,
    int-or-string allows both. CEL rules (x-kubernetes-validations) are not evaluated here."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {p: crd_to_jsonschema(s) for p, s in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = crd_to_jsonschema(v) if isinstance(v, dict) else v
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [crd_to_jsonschema(s) for s in v]
        elif k in ("type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
                   "minItems", "maxItems", "uniqueItems", "required", "minProperties",
                   "maxProperties", "multipleOf"):
            out[k] = v
    if node.get("exclusiveMinimum") is True and "minimum" in node:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True and "maximum" in node:
        out["exclusiveMaximum"] = out.pop("maximum")
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if root:
        out.setdefault("properties", {})
        out["properties"].setdefault("apiVersion", {"type": "string"})
        out["properties"].setdefault("kind", {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-embedded-resource") and "properties" in out:
        for p in ("apiVersion", "kind", "metadata"):
            out["properties"].setdefault(p, {})
    return out


class CrdValidator:
    def __init__(self, crds: list[dict[str, Any]]):
        self.schemas: dict[tuple[str, str], Any] = {}
        for crd in crds:
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served", True):
                    schema = crd_to_jsonschema(v["schema"]["openAPIV3Schema"], root=True)
                    self.schemas[(f"{group}/{v['name']}", kind)] = schema

    def groups(self) -> set[str]:
        return {gv.split("/")[0] for gv, _ in self.schemas}

    def errors(self, obj: dict[str, Any]) -> list[str]:
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        schema = self.schemas.get(key)
        if schema is None:
            return [f"no CRD serves {key[0]} {key[1]}"]
        v = jsonschema.Draft7Validator(schema)
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.path)))]


# The Prometheus Operator's kinds, as far as this chart uses them: the keys the
# monitoring.coreos.com/v1 CRDs define for the parts we write (unknown keys are errors).
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object"}}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
_RELABEL = {"type": "array", "items": {"type": "object", "additionalProperties": False,
    "properties": {"sourceLabels": {"type": "array", "items": {"type": "string",
                                                                 "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                   "separator": {"type": "string"}, "targetLabel": {"type": "string"},
                   "regex": {"type": "string"}, "modulus": {"type": "integer"},
                   "replacement": {"type": "string"},
                   "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                       "hashmod", "HashMod", "labelmap", "LabelMap",
                                       "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                                       "lowercase", "Lowercase", "uppercase", "Uppercase",
                                       "keepequal", "KeepEqual", "dropequal", "DropEqual"]}}}}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_ENDPOINT_PROPS = {"port": {"type": "string"}, "path": {"type": "string"},
                   "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                   "interval": _DURATION, "scrapeTimeout": _DURATION,
                   "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                   "relabelings": _RELABEL, "metricRelabelings": _RELABEL}
_META = {"type": "object", "required": ["name"]}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
MONITORING_SCHEMAS: dict[str, Any] = {
    "ServiceMonitor": {"type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False,
                     "required": ["selector", "endpoints"],
                     "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                                    "jobLabel": {"type": "string"},
                                    "endpoints": {"type": "array", "minItems": 1, "items": {
                                        "type": "object", "additionalProperties": False,
                                        "properties": {**_ENDPOINT_PROPS,
                                                       "targetPort": {}}}}}}}},
    "PodMonitor": {"type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False,
                     "required": ["selector", "podMetricsEndpoints"],
                     "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                                    "jobLabel": {"type": "string"},
                                    "podMetricsEndpoints": {"type": "array", "minItems": 1,
                                        "items": {"type": "object", "additionalProperties": False,
                                                  "properties": {**_ENDPOINT_PROPS,
                                                                 "portNumber": {"type": "integer"}}}}}}}},
    "PrometheusRule": {"type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"}, "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                    "properties": {"name": {"type": "string", "minLength": 1},
                        "interval": _DURATION, "limit": {"type": "integer"},
                        "query_offset": _DURATION, "labels": _STR_MAP,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {"alert": {"type": "string", "minLength": 1},
                                "record": {"type": "string", "minLength": 1},
                                "expr": {"anyOf": [{"type": "string", "minLength": 1},
                                                   {"type": "integer"}]},
                                "for": _DURATION, "keep_firing_for": _DURATION,
                                "labels": _STR_MAP,
                                "annotations": _STR_MAP}}}}}}}}}},
}


def monitoring_errors(obj: dict[str, Any]) -> list[str]:
    schema = MONITORING_SCHEMAS.get(obj.get("kind", ""))
    if schema is None:
        return [f"unexpected monitoring.coreos.com kind {obj.get('kind')}"]
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in v.iter_errors(obj)]


def builtin_errors(obj: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []



# --- pss -------------------------------------------------------------------------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pss_restricted(template: dict[str, Any]) -> list[str]:
    """Violations of the Kubernetes Pod Security Standard `restricted` (which includes
    `baseline`), as https://kubernetes.io/docs/concepts/security/pod-security-standards/ lists
    them, for one pod template."""
    spec = template.get("spec") or {}
    meta = template.get("metadata") or {}
    psc = spec.get("securityContext") or {}
    out: list[str] = []
    containers = [("container", c) for c in spec.get("containers") or []]
    containers += [("initContainer", c) for c in spec.get("initContainers") or []]
    containers += [("ephemeralContainer", c) for c in spec.get("ephemeralContainers") or []]
    if not spec.get("containers"):
        out.append("no containers")
    # Baseline.
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            out.append(f"host namespaces: {k} must be false")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("HostProcess: pod windowsOptions.hostProcess must not be true")
    for v in spec.get("volumes") or []:
        types = set(v) - {"name"}
        if "hostPath" in types:
            out.append(f"hostPath volumes: volume {v.get('name')} is a hostPath")
        bad = types - RESTRICTED_VOLUMES
        if bad:
            out.append(f"volume types: volume {v.get('name')} uses {sorted(bad)}")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {s.get('name')} is not a safe sysctl")
    for k, v in meta.get("annotations", {}).items():
        if k.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                v == "runtime/default" or v.startswith("localhost/")):
            out.append(f"AppArmor: annotation {k}={v}")
    apparmor = (psc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"AppArmor: pod appArmorProfile {apparmor}")
    selinux = psc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        out.append(f"SELinux: pod seLinuxOptions {selinux}")
    # Restricted, pod level.
    if psc.get("runAsUser") == 0:
        out.append("running as non-root user: pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"seccomp: pod seccompProfile {pod_seccomp}")
    for kind, c in containers:
        name = f"{kind} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"privileged containers: {name} is privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"HostProcess: {name}")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"host ports: {name} uses hostPort {p['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc mount type: {name} procMount {sc.get('procMount')}")
        c_apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if c_apparmor not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"AppArmor: {name} appArmorProfile {c_apparmor}")
        c_selinux = sc.get("seLinuxOptions") or {}
        if (c_selinux.get("type", "") not in SELINUX_TYPES or c_selinux.get("user")
                or c_selinux.get("role")):
            out.append(f"SELinux: {name} seLinuxOptions {c_selinux}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {name} must set allowPrivilegeEscalation false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"running as non-root: {name} (or the pod) must set runAsNonRoot true")
        if sc.get("runAsUser") == 0:
            out.append(f"running as non-root user: {name} runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"seccomp: {name} (or the pod) must use RuntimeDefault or Localhost, "
                       f"has {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"capabilities: {name} must drop ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            out.append(f"capabilities: {name} adds {sorted(added)} (only NET_BIND_SERVICE)")
    return out


def _good_pod() -> dict[str, Any]:
    return {"metadata": {}, "spec": {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "emptyDir": {}}]}}


def _bad_pods() -> list[tuple[str, str, Callable[[dict[str, Any]], None]]]:
    def c0(p: dict[str, Any]) -> dict[str, Any]:
        return p["spec"]["containers"][0]["securityContext"]

    return [
        ("runAsNonRoot unset", "running as non-root",
         lambda p: p["spec"]["securityContext"].pop("runAsNonRoot")),
        ("runAsUser 0", "runAsUser is 0", lambda p: c0(p).update(runAsUser=0)),
        ("allowPrivilegeEscalation unset", "privilege escalation",
         lambda p: c0(p).pop("allowPrivilegeEscalation")),
        ("capabilities not dropped", "must drop ALL", lambda p: c0(p).pop("capabilities")),
        ("SYS_ADMIN added", "adds ['SYS_ADMIN']",
         lambda p: c0(p)["capabilities"].update(add=["NET_BIND_SERVICE", "SYS_ADMIN"])),
        ("seccomp Unconfined", "seccomp",
         lambda p: c0(p).update(seccompProfile={"type": "Unconfined"})),
        ("no seccomp profile", "seccomp",
         lambda p: p["spec"]["securityContext"].pop("seccompProfile")),
        ("hostPath volume", "hostPath volumes",
         lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("hostNetwork", "host namespaces", lambda p: p["spec"].update(hostNetwork=True)),
        ("hostPID", "host namespaces", lambda p: p["spec"].update(hostPID=True)),
        ("hostIPC", "host namespaces", lambda p: p["spec"].update(hostIPC=True)),
        ("privileged", "privileged containers", lambda p: c0(p).update(privileged=True)),
        ("hostPort", "host ports",
         lambda p: p["spec"]["containers"][0].update(ports=[{"containerPort": 80,
                                                             "hostPort": 80}])),
        ("nfs volume", "volume types",
         lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s",
                                                                     "path": "/"}})),
        ("unsafe sysctl", "sysctls",
         lambda p: p["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax",
                                                                 "value": "1"}])),
        ("init container escalates", "privilege escalation",
         lambda p: p["spec"].update(initContainers=[{"name": "i", "image": "x"}])),
        ("procMount Unmasked", "/proc mount", lambda p: c0(p).update(procMount="Unmasked")),
    ]
