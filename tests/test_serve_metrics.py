"""Metrics that add up across replicas: the lookup application with two replicas on the session's
Ray Serve. Requests are counted through Ray's metrics path (one series per replica), so the
scrape of Ray's metrics export counts every request exactly once; GET /metrics answers for the
one replica that takes the scrape."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raycurv.serve.prometheus import LATENCY, REQUESTS, ROWS, SERVE_METRICS, TABLE_ROWS
from raycurv.serve.settings import build_settings
from tests.serve_support import make_table, run_app, scrape_ray_metrics, wait_until, write_run

APP = "serve-metrics"
ROUTE = "/v1/runs/{run}/samples/{sample_id}"
REQUESTS_SENT = 60


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("runs")
    write_run(root, "m", make_table(40, run="m"))
    url = run_app(build_settings(runs=[root], replicas=2, reload_interval_s=60, environ={}),
                  name=APP)
    with httpx.Client(base_url=url, timeout=30.0) as client:
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout_s=60)
        yield client
    serve.delete(APP)


def _exported() -> dict[str, dict[tuple, float]]:
    """Ray's export of the app's serve metrics: sample name -> {sorted labels: value}."""
    found: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(scrape_ray_metrics()):
        for sample in family.samples:
            if sample.name.startswith("ray_raycurv_serve") and \
                    sample.labels.get("application") == APP:
                found[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _per_replica(exported: dict, name: str, **wanted: str) -> dict[str, float]:
    """Values of sample ``name`` whose labels include ``wanted``, summed by replica."""
    out: dict[str, float] = defaultdict(float)
    for labels, value in exported.get(name, {}).items():
        labels = dict(labels)
        if all(labels.get(k) == v for k, v in wanted.items()):
            out[labels["replica"]] += value
    return dict(out)


def test_scraped_request_count_equals_requests_sent(two_replicas):
    def get(i: int) -> int:
        return two_replicas.get(f"/v1/runs/m/samples/{i % 40}").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get, range(REQUESTS_SENT))) == {200}
    name = f"ray_{REQUESTS.name}_total"

    def counted() -> dict | None:
        exported = _exported()
        by_replica = _per_replica(exported, name, route=ROUTE, status="200", method="GET")
        return exported if sum(by_replica.values()) >= REQUESTS_SENT else None

    exported = wait_until(counted, timeout_s=90, every_s=2)
    by_replica = _per_replica(exported, name, route=ROUTE, status="200", method="GET")
    assert sum(by_replica.values()) == REQUESTS_SENT, by_replica
    assert len(by_replica) == 2 and all(by_replica.values()), by_replica  # both served
    latencies = _per_replica(exported, f"ray_{LATENCY.name}_count", route=ROUTE)
    rows = _per_replica(exported, f"ray_{ROWS.name}_total", route=ROUTE)
    assert sum(latencies.values()) == REQUESTS_SENT and sum(rows.values()) == REQUESTS_SENT
    table_rows = _per_replica(exported, f"ray_{TABLE_ROWS.name}", run="m")
    assert sorted(table_rows.values()) == [40, 40]  # a gauge per replica: aggregate with max


def test_metrics_route_answers_for_one_replica(two_replicas):
    text = two_replicas.get("/metrics").text
    local = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == f"{REQUESTS.name}_total" and s.labels.get("route") == ROUTE}
    # the other replica answered some of the requests: this one has counted only its own
    assert 0 <= local.get(f"{REQUESTS.name}_total", 0) < REQUESTS_SENT


def test_every_serve_metric_is_exported(two_replicas):
    suffix = {"counter": "_total", "gauge": "", "histogram": "_count"}
    names = {f"ray_{spec.name}{suffix[spec.kind]}" for spec in SERVE_METRICS
             if spec.name != "raycurv_serve_reload_failures"}  # nothing refused here

    def all_there() -> bool:
        return names <= set(_exported())

    wait_until(all_there, timeout_s=60, every_s=2)
