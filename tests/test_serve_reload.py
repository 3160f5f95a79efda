"""Hot reload against the application started with serve.run: replaced tables are served after
the interval; corrupt ones are refused while the previous table keeps answering."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raycurv.runfolder import SCORES_FILE, RunFolder
from raycurv.serve.settings import build_settings
from tests.serve_support import make_table, run_app, wait_until, write_run

INTERVAL_S = 0.5


@pytest.fixture(scope="module")
def reloading(ray_cluster, tmp_path_factory):
    """The application over one run folder, re-checked every 0.5 s; no token."""
    from ray import serve

    root = tmp_path_factory.mktemp("reload")
    write_run(root, "live", make_table(20, seed=10, run="live-v1"))
    (root / "broken").mkdir()
    (root / "broken" / SCORES_FILE).write_bytes(b"PAR1 this is not a parquet file")
    url = run_app(build_settings(runs=[root], reload_interval_s=INTERVAL_S, environ={}),
                  name="serve-reload")
    with httpx.Client(base_url=url, timeout=30.0) as client:
        yield root, client
    serve.delete("serve-reload")


def _run(client: httpx.Client, name: str) -> dict:
    runs = {r["name"]: r for r in client.get("/v1/runs").json()["runs"]}
    return runs.get(name, {})


def _failures(client: httpx.Client, run: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "raycurv_serve_reload_failures_total" and \
                    sample.labels.get("run") == run:
                return sample.value
    return 0.0


def _curvature(client: httpx.Client, sample_id: int) -> float:
    r = client.get(f"/v1/runs/live/samples/{sample_id}")
    assert r.status_code == 200, r.text
    return r.json()["sample"]["curvature"]


def _replace_raw(run_dir: Path, write) -> None:
    """Put a file in place atomically (as a scorer would), whatever its content."""
    tmp = run_dir / ".incoming.parquet"
    write(tmp)
    os.replace(tmp, run_dir / SCORES_FILE)


def test_a_table_that_never_loaded_is_reported_and_404(reloading):
    root, client = reloading
    broken = _run(client, "broken")
    assert broken["status"] == "failed" and broken["rows"] is None
    assert "cannot read" in broken["last_error"]
    r = client.get("/v1/runs/broken/samples/0")
    assert r.status_code == 404 and "no table loaded" in r.json()["detail"]
    assert _failures(client, "broken") == 1


def test_replaced_table_is_served_after_the_interval(reloading):
    root, client = reloading
    v2 = make_table(25, seed=11, run="live-v2")
    expected = float(v2.column("curvature")[3].as_py())
    assert _curvature(client, 3) != pytest.approx(expected)
    write_run(root, "live", v2)
    wait_until(lambda: _run(client, "live").get("rows") == 25, timeout_s=15)
    assert _curvature(client, 3) == pytest.approx(expected)
    assert client.get("/v1/runs/live/samples/24").status_code == 200
    live = _run(client, "live")
    assert live["metadata"]["run"] == "live-v2" and live["loads"] >= 2


def _corrupt_truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


def _corrupt_missing_column(path: Path, good: bytes) -> None:
    pq.write_table(make_table(25, seed=12).drop_columns(["curvature"]), path)


def _corrupt_duplicate_ids(path: Path, good: bytes) -> None:
    table = make_table(25, seed=13)
    ids = table.column("sample_id").to_numpy().copy()
    ids[5] = ids[6]
    index = table.schema.get_field_index("sample_id")
    table = table.set_column(index, table.schema.field(index), pa.array(ids, type=pa.int64()))
    pq.write_table(table, path)


@pytest.mark.parametrize("corrupt,reason", [
    (_corrupt_truncated, "cannot read"),
    (_corrupt_missing_column, "missing columns: curvature"),
    (_corrupt_duplicate_ids, "not unique"),
])
def test_corrupt_table_is_refused_and_old_keeps_answering(reloading, corrupt, reason):
    root, client = reloading
    run_dir = root / "live"
    good = (run_dir / SCORES_FILE).read_bytes()
    serving = _run(client, "live")
    before_value = _curvature(client, 3)
    before_failures = _failures(client, "live")
    _replace_raw(run_dir, lambda tmp: corrupt(tmp, good))
    refused = wait_until(lambda: (r := _run(client, "live")).get("last_error") and r, timeout_s=15)
    assert reason in refused["last_error"]
    assert refused["status"] == "serving" and refused["rows"] == serving["rows"]
    assert refused["reload_failures"] == serving["reload_failures"] + 1
    assert _curvature(client, 3) == before_value
    assert _failures(client, "live") == before_failures + 1
    # the refused file is not retried: the count stays put over a few more intervals
    time.sleep(3 * INTERVAL_S)
    assert _failures(client, "live") == before_failures + 1
    # a good table clears the error and is served again
    RunFolder(str(run_dir)).write_scores(pq.read_table(io.BytesIO(good)))
    wait_until(lambda: _run(client, "live").get("last_error") is None, timeout_s=15)
    assert _curvature(client, 3) == before_value


def test_new_run_folder_is_picked_up(reloading):
    root, client = reloading
    assert client.get("/v1/runs/fresh/samples/0").status_code == 404
    write_run(root, "fresh", make_table(8, seed=14, run="fresh"))
    wait_until(lambda: client.get("/v1/runs/fresh/samples/0").status_code == 200, timeout_s=15)
    assert _run(client, "fresh")["rows"] == 8


def test_a_deleted_table_keeps_serving_the_loaded_one(reloading):
    root, client = reloading
    write_run(root, "gone", make_table(9, seed=15, run="gone"))
    wait_until(lambda: _run(client, "gone").get("rows") == 9, timeout_s=15)
    shutil.rmtree(root / "gone")
    # what was loaded keeps answering, and /v1/runs says why nothing newer is
    gone = wait_until(lambda: (r := _run(client, "gone")).get("last_error") and r, timeout_s=15)
    assert "no score table" in gone["last_error"] and gone["status"] == "serving"
    assert client.get("/v1/runs/gone/samples/8").status_code == 200
