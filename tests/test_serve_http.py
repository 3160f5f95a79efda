"""Real HTTP against the lookup application started with serve.run on 127.0.0.1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from raycurv.cli import main
from raycurv.serve.schemas import MAX_BATCH
from raycurv.serve.settings import build_settings
from tests.serve_support import make_table, run_app, write_run

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Service:
    url: str
    root: Path
    tables: dict[str, pa.Table]
    client: httpx.Client


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The application over two runs, token-protected, started once for this module."""
    from ray import serve

    root = tmp_path_factory.mktemp("runs")
    tables = {
        "alpha": make_table(60, seed=1, run="alpha"),
        # sparse ids: lookups go through the sorted-id search, not positions
        "beta": make_table(30, seed=2, id_step=7, id_offset=100, run="beta"),
    }
    for name, table in tables.items():
        write_run(root, name, table)
    url = run_app(build_settings(runs=[root], reload_interval_s=1.0, token=TOKEN, environ={}),
                  name="serve-http")
    with httpx.Client(base_url=url, timeout=30.0) as client:
        yield Service(url, root, tables, client)
    serve.delete("serve-http")


def _row(table: pa.Table, sample_id: int) -> dict:
    ids = table.column("sample_id").to_numpy()
    i = int(np.flatnonzero(ids == sample_id)[0])
    return {name: table.column(name)[i].as_py() for name in table.column_names}


def _get(service: Service, path: str, **kw) -> httpx.Response:
    return service.client.get(path, headers=AUTH, **kw)


def test_healthz_needs_no_token(service):
    r = service.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "runs_loaded": 2}


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/alpha/samples/0"),
    ("POST", "/v1/runs/alpha/samples:lookup"),
    ("GET", "/v1/runs/alpha/top"),
    ("GET", "/v1/runs/alpha/summary"),
    ("GET", "/v1/runs/alpha/samples/0/image"),
    ("GET", "/v1/runs/alpha/samples/0/epochs"),
    ("GET", "/v1/runs/alpha/samples/0/duplicates"),
    ("GET", "/v1/runs/alpha/epochs"),
    ("GET", "/v1/runs/alpha/histogram"),
    ("GET", "/v1/runs/alpha/classes"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_every_route_but_healthz_needs_the_token(service, method, path, headers):
    r = service.client.request(method, path, headers=headers, json={"sample_ids": [0]})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["detail"]


def test_runs_lists_tables_and_metadata(service):
    body = _get(service, "/v1/runs").json()
    runs = {run["name"]: run for run in body["runs"]}
    assert set(runs) == {"alpha", "beta"}
    assert runs["alpha"]["rows"] == 60 and runs["beta"]["rows"] == 30
    assert runs["alpha"]["status"] == "serving" and runs["alpha"]["last_error"] is None
    assert runs["beta"]["metadata"]["run"] == "beta"
    assert runs["beta"]["metadata"]["table_version"] == 1


@pytest.mark.parametrize("run,sample_id", [("alpha", 0), ("alpha", 59), ("beta", 100),
                                           ("beta", 100 + 7 * 29)])
def test_one_sample_is_the_table_row(service, run, sample_id):
    r = _get(service, f"/v1/runs/{run}/samples/{sample_id}")
    assert r.status_code == 200
    body = r.json()
    assert body["run"] == run
    expected = _row(service.tables[run], sample_id)
    for name, value in expected.items():
        got = body["sample"][name]
        if isinstance(value, float):
            assert np.float32(got) == np.float32(value), name
        else:
            assert got == value, name


def test_unknown_sample_and_run_404_name_what_exists(service):
    r = _get(service, "/v1/runs/beta/samples/101")
    assert r.status_code == 404
    assert "no sample 101" in r.json()["detail"] and "100..303" in r.json()["detail"]
    r = _get(service, "/v1/runs/gamma/samples/1")
    assert r.status_code == 404
    assert "no run 'gamma'" in r.json()["detail"] and "alpha, beta" in r.json()["detail"]
    r = service.client.post("/v1/runs/gamma/samples:lookup", headers=AUTH,
                            json={"sample_ids": [1]})
    assert r.status_code == 404
    for path in ("/v1/runs/gamma/top", "/v1/runs/gamma/summary"):
        assert _get(service, path).status_code == 404


@pytest.mark.parametrize("path", [
    "/v1/runs/alpha/samples/abc", "/v1/runs/alpha/samples/-1", "/v1/runs/alpha/samples/1.5",
    f"/v1/runs/alpha/samples/{2**63}", "/v1/runs/alpha/top?k=-1", "/v1/runs/alpha/top?k=0",
    "/v1/runs/alpha/top?k=10001", "/v1/runs/alpha/top?k=x", "/v1/runs/alpha/top?order=up",
    "/v1/runs/alpha/top?label=-2",
])
def test_malformed_get_is_422_with_one_line(service, path):
    r = _get(service, path)
    assert r.status_code == 422
    body = r.json()
    assert "\n" not in body["detail"] and body["errors"]


@pytest.mark.parametrize("payload", [
    {"sample_ids": ["a"]}, {"sample_ids": [1.5]}, {"sample_ids": [True]}, {"sample_ids": [-3]}, {"sample_ids": []},
    {"sample_ids": [2**63]}, {"ids": [1]}, {"sample_ids": [1], "extra": 1}, [1, 2], "x",
    {"sample_ids": "1,2"},
])
def test_malformed_lookup_is_422(service, payload):
    r = service.client.post("/v1/runs/alpha/samples:lookup", headers=AUTH, json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_oversized_batch_is_422_naming_the_limit(service):
    ids = list(range(MAX_BATCH + 1))
    r = service.client.post("/v1/runs/alpha/samples:lookup", headers=AUTH, json={"sample_ids": ids})
    assert r.status_code == 422
    assert f"at most {MAX_BATCH} sample ids" in r.json()["detail"]


def test_huge_body_is_413(service):
    body = b'{"sample_ids": [' + b"1," * 600_000 + b"1]}"
    r = service.client.post("/v1/runs/alpha/samples:lookup", content=body,
                            headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "exceeds the limit" in r.json()["detail"]


def test_batch_lookup_keeps_order_and_lists_missing(service):
    ids = [59, 3, 1000, 3, 0, 61]
    r = service.client.post("/v1/runs/alpha/samples:lookup", headers=AUTH,
                            json={"sample_ids": ids})
    assert r.status_code == 200
    body = r.json()
    assert [row["sample_id"] for row in body["rows"]] == [59, 3, 3, 0]
    assert body["missing"] == [1000, 61]
    assert body["rows"][0]["rank"] == _row(service.tables["alpha"], 59)["rank"]


def test_full_batch_answers(service):
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 120, MAX_BATCH)]
    r = service.client.post("/v1/runs/alpha/samples:lookup", headers=AUTH,
                            json={"sample_ids": ids})
    assert r.status_code == 200
    body = r.json()
    assert len(body["rows"]) + len(body["missing"]) == MAX_BATCH
    assert all(row["sample_id"] < 60 for row in body["rows"])
    assert all(i >= 60 for i in body["missing"])
    assert "app;dur=" in r.headers["server-timing"]


def test_top_is_rank_order_with_label_filter_and_order(service):
    table = service.tables["alpha"]
    curvature = table.column("curvature").to_numpy()
    labels = table.column("label").to_numpy()
    ids = table.column("sample_id").to_numpy()
    body = _get(service, "/v1/runs/alpha/top", params={"k": 5}).json()
    assert [row["sample_id"] for row in body["rows"]] == ids[np.argsort(-curvature)[:5]].tolist()
    assert [row["rank"] for row in body["rows"]] == [1, 2, 3, 4, 5]
    assert body["total"] == 60 and body["order"] == "desc"
    body = _get(service, "/v1/runs/alpha/top", params={"k": 3, "order": "asc"}).json()
    assert [row["sample_id"] for row in body["rows"]] == ids[np.argsort(curvature)[:3]].tolist()
    assert [row["rank"] for row in body["rows"]] == [60, 59, 58]
    body = _get(service, "/v1/runs/alpha/top", params={"k": 100, "label": 1}).json()
    assert body["total"] == int((labels == 1).sum()) == len(body["rows"])
    assert all(row["label"] == 1 for row in body["rows"])
    ranks = [row["rank"] for row in body["rows"]]
    assert ranks == sorted(ranks)
    body = _get(service, "/v1/runs/alpha/top", params={"label": 7}).json()
    assert body["total"] == 0 and body["rows"] == []


def test_summary_counts_and_detection(service):
    from sklearn.metrics import average_precision_score, roc_auc_score

    table = service.tables["alpha"]
    corrupted = table.column("corrupted").to_numpy()
    curvature = table.column("curvature").to_numpy()
    body = _get(service, "/v1/runs/alpha/summary").json()
    assert body["rows"] == 60 and body["corrupted"] == int(corrupted.sum())
    assert body["duplicates"] == 6 and body["classes"] == 3
    assert sum(item["count"] for item in body["by_label"]) == 60
    assert body["curvature"]["max"] == pytest.approx(float(curvature.max()))
    found = {(d["target"], d["score"]): d for d in body["detection"]}
    assert {score for _, score in found} == {"curvature", "csl", "final_loss"}
    assert found["corrupted", "curvature"]["auroc"] == pytest.approx(
        roc_auc_score(corrupted, curvature))
    assert found["corrupted", "curvature"]["average_precision"] == pytest.approx(
        average_precision_score(corrupted, curvature))
    assert found["corrupted", "csl"]["auroc"] == pytest.approx(
        roc_auc_score(corrupted, table.column("csl").to_numpy()))


def _metrics(service: Service) -> dict[tuple[str, tuple], float]:
    r = _get(service, "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_parse_and_move_with_requests(service):
    route = "/v1/runs/{run}/samples/{sample_id}"
    ok = ("raycurv_serve_requests_total",
          (("method", "GET"), ("route", route), ("status", "200")))
    missing = ("raycurv_serve_requests_total",
               (("method", "GET"), ("route", route), ("status", "404")))
    rows = ("raycurv_serve_rows_returned_total", (("route", route),))
    timed = ("raycurv_serve_request_duration_seconds_count", (("route", route),))
    lookup_rows = ("raycurv_serve_rows_returned_total",
                   (("route", "/v1/runs/{run}/samples:lookup"),))
    before = _metrics(service)
    for i in range(5):
        assert _get(service, f"/v1/runs/alpha/samples/{i}").status_code == 200
    assert _get(service, "/v1/runs/alpha/samples/999").status_code == 404
    service.client.post("/v1/runs/alpha/samples:lookup", headers=AUTH,
                        json={"sample_ids": [1, 2, 3, 500]})
    after = _metrics(service)
    assert after[ok] - before.get(ok, 0) == 5
    assert after[missing] - before.get(missing, 0) == 1
    assert after[rows] - before.get(rows, 0) == 5
    assert after[timed] - before.get(timed, 0) == 6
    assert after[lookup_rows] - before.get(lookup_rows, 0) == 3
    assert after["raycurv_serve_tables_loaded", ()] == 2
    assert after["raycurv_serve_table_rows", (("run", "alpha"),)] == 60
    assert after["raycurv_serve_table_rows", (("run", "beta"),)] == 30
    assert after["raycurv_serve_table_loads_total", (("run", "beta"),)] == 1


def test_openapi_document(service):
    doc = _get(service, "/openapi.json").json()
    assert set(doc["paths"]) == {
        "/healthz", "/v1/runs", "/v1/runs/{run}/samples/{sample_id}",
        "/v1/runs/{run}/samples:lookup", "/v1/runs/{run}/top", "/v1/runs/{run}/summary",
        "/metrics", "/v1/runs/{run}/samples/{sample_id}/image",
        "/v1/runs/{run}/samples/{sample_id}/epochs", "/v1/runs/{run}/samples/{sample_id}/duplicates",
        "/v1/runs/{run}/epochs", "/v1/runs/{run}/histogram", "/v1/runs/{run}/classes",
    }
    body = doc["components"]["schemas"]["LookupRequest"]["properties"]["sample_ids"]
    assert body["maxItems"] == MAX_BATCH
    assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())
    assert _get(service, "/docs").status_code == 200


def test_query_cli_over_http_matches_direct_read(service, capsys):
    assert main(["query", "beta", "107", "--url", service.url, "--token", TOKEN, "--json"]) == 0
    over_http = json.loads(capsys.readouterr().out)
    assert main(["query", str(service.root / "beta"), "107", "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert over_http["sample"] == direct["sample"]
    assert main(["query", "alpha", "--top", "4", "--label", "2", "--url", service.url,
                 "--token", TOKEN, "--json"]) == 0
    over_http = json.loads(capsys.readouterr().out)
    assert main(["query", str(service.root / "alpha"), "--top", "4", "--label", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == over_http["rows"]


def test_query_cli_errors_are_one_line(service, capsys):
    assert main(["query", "beta", "101", "--url", service.url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 404" in err and "no sample 101" in err
    assert main(["query", "beta", "101", "--url", service.url]) == 2
    assert "HTTP 401" in capsys.readouterr().err


# --- schema-driven fuzzing of the OpenAPI document -------------------------------------------

@pytest.fixture(scope="module")
def api_schema(service):
    doc = _get(service, "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.base_url = service.url
    return schema


fuzz = schemathesis.pytest.from_fixture("api_schema")


@fuzz.parametrize()
@settings(max_examples=7, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_openapi_no_5xx_and_schema_conformance(case, service):
    case.call_and_validate(base_url=service.url, headers=AUTH)
