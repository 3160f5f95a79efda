"""Write k8s/monitoring's dashboard ConfigMap and PrometheusRule from their sources in deploy/.

    python deploy/monitoring.py           # rewrite both manifests
    python deploy/monitoring.py --check   # exit 1 if either differs from what would be written

Sources: deploy/grafana/raycurv-dashboard.json (Grafana) and deploy/prometheus/raycurv-alerts.yaml
(a Prometheus rule file). Kustomize reads no file outside its folder, so the manifests carry
copies; tests/test_serve_dashboard.py checks that they are current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "raycurv-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "raycurv-alerts.yaml"
MONITORING = ROOT / "k8s" / "monitoring"
LABELS = {"app.kubernetes.io/name": "raycurv"}
HEADER = "# Written by `python deploy/monitoring.py` from {source}; edit that file, not this one.\n"


class _Literal(str):
    """A string YAML writes as a literal block."""


yaml.SafeDumper.add_representer(
    _Literal, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                                           style="|"))


def dashboard_configmap() -> str:
    """The ConfigMap holding the dashboard; Grafana's dashboard sidecar (kube-prometheus-stack)
    picks up ConfigMaps labelled grafana_dashboard=1."""
    doc = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "raycurv-grafana-dashboard",
                        "labels": {**LABELS, "grafana_dashboard": "1"}},
           "data": {DASHBOARD.name: _Literal(DASHBOARD.read_text())}}
    return HEADER.format(source=DASHBOARD.relative_to(ROOT)) + yaml.safe_dump(
        doc, sort_keys=False, width=1000)


def prometheus_rule() -> str:
    """The PrometheusRule (Prometheus Operator) holding the alert rules."""
    rules = yaml.safe_load(ALERTS.read_text())
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "raycurv-alerts", "labels": LABELS},
           "spec": rules}
    return HEADER.format(source=ALERTS.relative_to(ROOT)) + yaml.safe_dump(
        doc, sort_keys=False, width=100)


MANIFESTS = {"grafana-dashboard.yaml": dashboard_configmap,
             "prometheusrule-raycurv.yaml": prometheus_rule}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    stale = []
    for name, render in MANIFESTS.items():
        path, text = MONITORING / name, render()
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python deploy/monitoring.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
