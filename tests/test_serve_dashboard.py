"""The Grafana dashboard (deploy/grafana/) and the Prometheus alert rules (deploy/prometheus/):
they load, every query names metrics raycurv exports (through Ray's metrics path, hence the
``ray_`` prefix) and only those, the queries are well formed, and k8s/monitoring ships current
copies (ConfigMap, PrometheusRule)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from raycurv.metrics import run_metrics
from raycurv.serve.prometheus import SERVE_METRICS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "raycurv-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "raycurv-alerts.yaml"
MONITORING = ROOT / "k8s" / "monitoring"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "delta", "deriv",
             "histogram_quantile", "min_over_time", "max_over_time", "avg_over_time",
             "label_values", "absent", "topk", "clamp_min"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset"}


def _exported() -> set[str]:
    """Every sample name Ray's export gives raycurv's metrics."""
    kinds = [(spec.name, spec.kind) for spec in SERVE_METRICS]
    kinds += [(m.info["name"], type(m).__name__.lower()) for m in run_metrics().values()]
    return {f"ray_{name}{suffix}" for name, kind in kinds for suffix in SUFFIXES[kind]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, strings, grouping
    labels, functions, keywords and numbers left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end():].lstrip()
        if rest.startswith("("):
            assert word in FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in KEYWORDS and not re.fullmatch(r"e\d*|inf|nan", word, re.I):
            names.add(word)
    return names


def well_formed(expr: str) -> bool:
    """Brackets balance and nest, and no selector or range is empty."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in re.sub(r'"(?:\\.|[^"\\])*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and "{}" not in expr and "[]" not in expr


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def test_metric_names_reads_promql():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(ray_a_bucket{x=~"4..|5.."}[5m])))'
            ' > 0 unless on (run) ray_b_total{run="c"} > 1e3')
    assert metric_names(expr) == {"ray_a_bucket", "ray_b_total"}
    assert well_formed(expr) and not well_formed("sum(rate(x[5m])") and not well_formed("x{}")


def test_dashboard_loads_and_every_query_names_exported_metrics():
    dashboard = _dashboard()
    assert dashboard["uid"] == "raycurv" and dashboard["panels"]
    exported = _exported()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= exported, f"{expr}: {names - exported or 'no metric'}"
        assert well_formed(expr), expr
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_covers_runs_and_the_service():
    used = set().union(*map(metric_names, _dashboard_exprs()))
    runs = {"ray_raycurv_train_epoch", "ray_raycurv_train_loss", "ray_raycurv_train_accuracy",
            "ray_raycurv_train_samples_per_second", "ray_raycurv_scoring_samples_per_second",
            "ray_raycurv_scoring_lag_epochs"}
    service = {"ray_raycurv_serve_requests_total", "ray_raycurv_serve_request_duration_seconds_bucket",
               "ray_raycurv_serve_table_loads_total", "ray_raycurv_serve_reload_failures_total"}
    assert runs | service <= used, (runs | service) - used
    exprs = " ".join(_dashboard_exprs())
    assert all(f"histogram_quantile({q}," in exprs for q in ("0.5", "0.95", "0.99"))
    assert 'status=~"4..|5.."' in exprs  # errors
    for expr in _dashboard_exprs():  # counters only through rate/increase: replicas restart
        for name in metric_names(expr):
            if name.endswith(("_total", "_bucket")):
                assert re.search(rf"(rate|increase)\({re.escape(name)}", expr), expr


def test_alert_rules_name_exported_metrics_and_say_what_to_do():
    rules = _rules()
    assert {"RaycurvScoringLagNotFalling", "RaycurvReloadFailures", "RaycurvLookup5xx"} <= \
        {rule["alert"] for rule in rules}
    exported = _exported()
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names and names <= exported, (rule["alert"], names - exported)
        assert well_formed(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def _monitoring_module():
    spec = importlib.util.spec_from_file_location("deploy_monitoring", ROOT / "deploy" / "monitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("manifest", ["grafana-dashboard.yaml", "prometheusrule-raycurv.yaml"])
def test_k8s_monitoring_ships_current_copies(manifest):
    module = _monitoring_module()
    assert (MONITORING / manifest).read_text() == module.MANIFESTS[manifest](), \
        "out of date: run python deploy/monitoring.py"
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert manifest in kustomization["resources"]
    doc = yaml.safe_load((MONITORING / manifest).read_text())
    if doc["kind"] == "ConfigMap":
        assert json.loads(doc["data"][DASHBOARD.name]) == _dashboard()
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    else:
        assert doc["kind"] == "PrometheusRule"
        assert doc["spec"] == yaml.safe_load(ALERTS.read_text())
