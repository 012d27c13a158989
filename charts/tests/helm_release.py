#!/usr/bin/env python3
"""Install, upgrade and uninstall the WhaleFlux chart against a cluster with Helm's own engine
(the PyPI package helm-python-sdk, module helm_python: Helm v4's Go SDK through a C ABI), as
`helm install|upgrade|uninstall` would. Prints one JSON line with the release's name, revision,
status and manifest's object list; exits 1 with the error on failure.

    python charts/tests/helm_release.py --kubeconfig KC install  --namespace whaleflux-system \\
        --create-namespace --set image.repository=whaleflux
    python charts/tests/helm_release.py --kubeconfig KC upgrade  --namespace whaleflux-system \\
        --reuse-values --set workerImage.tag=0.1.1
    python charts/tests/helm_release.py --kubeconfig KC uninstall --namespace whaleflux-system
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import helm_python as helm
    import yaml
except ImportError as e:  # pragma: no cover - depends on the interpreter
    sys.exit(f"FAIL: {e}: run this with the scripts/test.sh venv ($WHALEFLUX_PYTHON)")

CHART = Path(__file__).resolve().parents[1] / "whaleflux"


def merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def values(args: argparse.Namespace) -> dict:
    out: dict = {}
    for expr in args.set or []:
        merge(out, helm.parse_set_string(expr))
    for expr in args.set_json or []:
        merge(out, helm.parse_set_json(expr))
    return out


def summary(rel: dict) -> dict:
    objects = []
    for doc in yaml.safe_load_all(rel.get("manifest") or ""):
        if isinstance(doc, dict):
            objects.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
    return {
        "name": rel.get("name"),
        "revision": rel.get("revision"),
        "status": rel.get("status"),
        "objects": objects,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", default="whaleflux-system")
    p.add_argument("--release", default="whaleflux")
    p.add_argument("--timeout", type=int, default=120)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install", "upgrade"):
        s = sub.add_parser(name)
        s.add_argument("--set", action="append")
        s.add_argument("--set-json", action="append")
        s.add_argument("--wait", action="store_true", help="wait until the objects are ready")
        if name == "install":
            s.add_argument("--create-namespace", action="store_true")
        else:
            s.add_argument("--reuse-values", action="store_true")
    sub.add_parser("uninstall")
    sub.add_parser("status")
    args = p.parse_args()

    try:
        with helm.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace) as cfg:
            if args.cmd == "install":
                rel = cfg.install(
                    str(CHART), args.release, values(args), namespace=args.namespace,
                    create_namespace=args.create_namespace, timeout=args.timeout,
                    wait="watcher" if args.wait else None,
                )
            elif args.cmd == "upgrade":
                rel = cfg.upgrade(
                    str(CHART), args.release, values(args), namespace=args.namespace,
                    reuse_values=args.reuse_values, timeout=args.timeout,
                    wait="watcher" if args.wait else None,
                )
            elif args.cmd == "uninstall":
                out = cfg.uninstall(args.release, timeout=args.timeout)
                rel = out.get("release") or {}
            else:
                rel = cfg.status(args.release)
    except helm.HelmError as e:
        print(f"FAIL helm {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary(rel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
