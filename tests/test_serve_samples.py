"""The routes that show a sample beyond its row (image, per-epoch curve, duplicate group), the
run's histogram and class names, the top route's filters and paging, and the UI's files: the
FastAPI app in process (no Ray), over a digits run whose images the service rebuilds."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raycurv.config import DataSpec
from raycurv.data import prepare_dataset
from raycurv.serve.api import build_api
from raycurv.serve.groups import EXACT, INJECTED, find_groups
from raycurv.serve.images import PngCache
from raycurv.serve.index import TableIndex
from raycurv.serve.prometheus import REQUESTS, ROWS, build_metrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.settings import build_settings
from raycurv.serve.ui import UI_FOLDER
from raycurv.table import build_table
from tests.serve_support import make_table, write_image_run, write_run

TOKEN = "samples-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class App:
    app: object
    root: Path
    table: pa.Table
    metrics: object

    def get(self, path: str, **kw) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://raycurv") as c:
                return await c.get(path, **kw)

        return asyncio.run(call())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> App:
    root = tmp_path_factory.mktemp("runs")
    _, table = write_image_run(root, "digits")
    write_run(root, "plain", make_table(20, run="plain"))  # a table and nothing else
    settings = build_settings(runs=[root], token=TOKEN, environ={})
    metrics = build_metrics()
    registry = RunRegistry(sources=[root], metrics=metrics)
    registry.refresh()
    return App(build_api(registry=registry, settings=settings, metrics=metrics, reload=False),
               root, table, metrics)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _id_where(table: pa.Table, mask: np.ndarray) -> int:
    return int(_column(table, "sample_id")[np.flatnonzero(mask)[0]])


# --- image -----------------------------------------------------------------------------------

def test_image_is_the_samples_pixels(served):
    data = prepare_dataset(DataSpec(dataset="digits", limit=60, noise=0.2, duplicates=4), seed=3)
    for i in (0, 17, len(data) - 1):  # the last one is an injected copy
        r = served.get(f"/v1/runs/digits/samples/{int(data.sample_ids[i])}/image", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(r.content)))
        expected = np.clip(data.images[i][0] / data.norm.scale * 255, 0, 255).astype(np.uint8)
        assert pixels.shape == (8, 8) and np.array_equal(pixels, expected)


def test_image_size_enlarges_sharply_and_is_cached(served):
    sample_id = int(_column(served.table, "sample_id")[5])
    path = f"/v1/runs/digits/samples/{sample_id}/image"
    native = np.asarray(Image.open(io.BytesIO(served.get(path, headers=AUTH).content)))
    first = served.get(path, params={"size": 32}, headers=AUTH)
    big = np.asarray(Image.open(io.BytesIO(first.content)))
    assert big.shape == (32, 32)
    assert np.array_equal(big[::4, ::4], native)  # nearest neighbour: every pixel a 4x4 block
    assert "max-age" in first.headers["cache-control"]
    second = served.get(path, params={"size": 32}, headers=AUTH)
    assert second.content == first.content


@pytest.mark.parametrize("size", [0, 3, 1025, "x"])
def test_image_size_out_of_range_is_422(served, size):
    r = served.get("/v1/runs/digits/samples/0/image", params={"size": size}, headers=AUTH)
    assert r.status_code == 422 and "size" in r.json()["detail"]


def test_image_of_a_run_without_its_data_is_404_saying_why(served):
    r = served.get("/v1/runs/plain/samples/3/image", headers=AUTH)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "images of run 'plain' are not reachable" in detail and "run.json" in detail
    assert "\n" not in detail


def test_image_of_an_unknown_sample_or_run_is_404(served):
    r = served.get("/v1/runs/digits/samples/5000/image", headers=AUTH)
    assert r.status_code == 404 and "no sample 5000" in r.json()["detail"]
    r = served.get("/v1/runs/nope/samples/1/image", headers=AUTH)
    assert r.status_code == 404 and "no run 'nope'" in r.json()["detail"]


def test_png_cache_drops_the_least_recently_used():
    cache = PngCache(max_bytes=10, max_entries=3)
    for key in "abc":
        cache.put((key,), b"xx")
    assert cache.get(("a",)) == b"xx"  # a is now the most recently used
    cache.put(("d",), b"xx")
    assert cache.get(("b",)) is None and cache.get(("a",)) == b"xx" and len(cache) == 3
    cache.put(("e",), b"x" * 9)  # past the byte limit: the oldest go until it fits
    assert len(cache) == 1 and cache.get(("e",)) is not None


# --- per-epoch curvature ---------------------------------------------------------------------

def test_sample_epochs_are_the_per_epoch_rows_and_average_to_the_score(served):
    sample_id = _id_where(served.table, _column(served.table, "corrupted"))
    body = served.get(f"/v1/runs/digits/samples/{sample_id}/epochs", headers=AUTH).json()
    assert body["sample_id"] == sample_id and body["epochs"] == [0, 1, 2, 3]
    curvature = _column(served.table, "curvature")[_column(served.table, "sample_id") == sample_id]
    assert np.mean(body["curvature"]) == pytest.approx(float(curvature[0]), rel=1e-5)
    assert body["curvature"] == sorted(body["curvature"])  # the factors rise epoch by epoch


def test_run_epochs_band_orders_its_quantiles(served):
    body = served.get("/v1/runs/digits/epochs", headers=AUTH).json()
    assert body["epochs"] == [0, 1, 2, 3]
    for low, mid, high in zip(body["p10"], body["median"], body["p90"], strict=True):
        assert low < mid < high
    expected = np.median(_column(served.table, "curvature").astype(np.float64) * 0.5)
    assert body["median"][0] == pytest.approx(expected, rel=1e-5)


def test_epochs_without_a_per_epoch_table_are_404_saying_why(served):
    for path in ("/v1/runs/plain/samples/3/epochs", "/v1/runs/plain/epochs"):
        r = served.get(path, headers=AUTH)
        assert r.status_code == 404
        assert "has no per-epoch curvature" in r.json()["detail"]


# --- duplicate groups --------------------------------------------------------------------------

def test_an_injected_copy_is_grouped_with_its_source(served):
    table = served.table
    copy = _id_where(table, _column(table, "duplicate_of").astype(float) >= 0)
    source = int(table.filter(pa.compute.equal(table.column("sample_id"), copy))
                 .column("duplicate_of")[0].as_py())
    body = served.get(f"/v1/runs/digits/samples/{source}/duplicates", headers=AUTH).json()
    assert {row["sample_id"] for row in body["rows"]} >= {copy, source}
    assert set(body["searched"]) == {INJECTED, EXACT} and body["not_searched"] is None
    ranks = [row["rank"] for row in body["rows"]]
    assert ranks == sorted(ranks)
    labels = {row["label"] for row in body["rows"]}
    assert body["conflicting"] == (len(labels) > 1)
    assert body["conflicting"]  # injected copies carry a conflicting label


def test_a_sample_in_no_group_has_no_rows(served):
    table = served.table
    in_group = set(_column(table, "sample_id")[_column(table, "duplicate_of").astype(float) >= 0])
    in_group |= set(table.column("duplicate_of").drop_null().to_pylist())
    alone = next(int(i) for i in _column(table, "sample_id") if int(i) not in in_group)
    body = served.get(f"/v1/runs/digits/samples/{alone}/duplicates", headers=AUTH).json()
    assert body["rows"] == [] and body["conflicting"] is False


def test_a_run_without_images_searches_injected_copies_only(served):
    body = served.get("/v1/runs/plain/samples/0/duplicates", headers=AUTH).json()
    assert body["searched"] == [INJECTED] and "not reachable" in body["not_searched"]
    assert {row["sample_id"] for row in body["rows"]} == {0, 1, 19}  # make_table's copies of 19


def test_exact_copies_are_grouped_by_pixels():
    table = make_table(6, noise=0.0, run="px")
    table = table.set_column(table.schema.get_field_index("duplicate_of"), "duplicate_of",
                             pa.array([None] * 6, type=pa.int64()))
    index = TableIndex.from_table(table, run="px", path="px")
    images = np.arange(6 * 4).reshape(6, 1, 2, 2).astype(np.uint8)
    images[4] = images[1]
    groups = find_groups(index, images)
    assert groups.members(1).tolist() == [1, 4] and groups.members(0).tolist() == []
    assert find_groups(index, None, "no images").members(1).tolist() == []


# --- histogram, class names ----------------------------------------------------------------------

def test_histogram_counts_every_sample_once_by_kind(served):
    body = served.get("/v1/runs/digits/histogram", headers=AUTH).json()
    assert len(body["edges"]) == len(body["counts"]["clean"]) + 1
    assert body["edges"] == sorted(body["edges"])
    corrupted = _column(served.table, "corrupted")
    copies = _column(served.table, "duplicate_of").astype(float) >= 0
    assert sum(body["counts"]["corrupted"]) == int(corrupted.sum())
    assert sum(body["counts"]["duplicate"]) == int(copies.sum())
    assert sum(body["counts"]["clean"]) == int((~corrupted & ~copies).sum())


def _index_with_metadata(metadata: dict) -> TableIndex:
    base = make_table(4, run="m")
    columns = {name: _column(base, name) for name in ("sample_id", "label", "original_label",
                                                      "corrupted", "curvature", "epochs_scored",
                                                      "csl", "final_loss", "final_confidence",
                                                      "final_pred")}
    return TableIndex.from_table(build_table(columns, metadata), run="m", path="m")


@pytest.mark.parametrize("metadata,names", [
    ({"dataset": "digits"}, None),
    ({"dataset": "fashion-mnist"}, "T-shirt/top"),
    ({"dataset": "cifar10", "class_names": ["a", "b", "c"]}, "a"),
])
def test_class_names_come_from_the_table_or_the_dataset(metadata, names):
    from raycurv.class_names import class_names

    got = class_names(_index_with_metadata(metadata).metadata)
    assert (got[0] if got else None) == names


def test_classes_route(served):
    assert served.get("/v1/runs/digits/classes", headers=AUTH).json() == {"run": "digits",
                                                                          "names": None}


# --- top: filters and paging -------------------------------------------------------------------

def _top(served, **params) -> dict:
    r = served.get("/v1/runs/digits/top", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_top_filters_by_corrupted_and_injected(served):
    table = served.table
    corrupted = _column(table, "corrupted")
    copies = _column(table, "duplicate_of").astype(float) >= 0
    body = _top(served, k=100, corrupted="true")
    assert body["total"] == int(corrupted.sum()) == len(body["rows"])
    assert all(row["corrupted"] for row in body["rows"])
    assert [r["rank"] for r in body["rows"]] == sorted(r["rank"] for r in body["rows"])
    body = _top(served, k=100, injected="true", order="asc")
    assert body["total"] == int(copies.sum())
    assert all(row["duplicate_of"] is not None for row in body["rows"])
    assert [r["rank"] for r in body["rows"]] == sorted((r["rank"] for r in body["rows"]),
                                                       reverse=True)
    body = _top(served, k=100, corrupted="false", injected="false")
    assert body["total"] == int((~corrupted & ~copies).sum())


def test_top_pages_through_the_same_order(served):
    whole = _top(served, k=30, label=3)["rows"]
    paged = [row for offset in (0, 7, 14, 21, 28) for row in
             _top(served, k=7, offset=offset, label=3)["rows"]]
    assert [r["sample_id"] for r in paged] == [r["sample_id"] for r in whole]
    filtered = _top(served, k=50, corrupted="false")["rows"]
    second_page = _top(served, k=5, offset=5, corrupted="false")["rows"]
    assert second_page == filtered[5:10]
    body = _top(served, k=5, offset=10_000)
    assert body["rows"] == [] and body["total"] == served.table.num_rows


@pytest.mark.parametrize("params", [{"offset": -1}, {"offset": "x"}, {"corrupted": "maybe"},
                                    {"injected": 2}])
def test_top_malformed_filters_are_422(served, params):
    r = served.get("/v1/runs/digits/top", params=params, headers=AUTH)
    assert r.status_code == 422 and "\n" not in r.json()["detail"]


# --- the UI's files, and the metrics of the new routes ------------------------------------------

@pytest.mark.parametrize("path,file,kind", [("/", "index.html", "text/html"),
                                            ("/ui/app.js", "app.js", "text/javascript"),
                                            ("/ui/app.css", "app.css", "text/css")])
def test_ui_files_need_no_token_and_hold_no_scores(served, path, file, kind):
    r = served.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    # the files as shipped: no run, no score (the API serves those, behind the token)
    assert r.content == (UI_FOLDER / file).read_bytes().replace(b"{{AUTH}}", b"bearer")
    text = r.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace, not a fetch
    assert "http://" not in text and "https://" not in text  # nothing from elsewhere


def test_ui_page_says_whether_a_token_is_needed(served, tmp_path):
    assert '<meta name="raycurv-auth" content="bearer">' in served.get("/").text
    settings = build_settings(runs=[served.root], environ={})
    metrics = build_metrics()
    registry = RunRegistry(sources=[served.root], metrics=metrics)
    app = App(build_api(registry=registry, settings=settings, metrics=metrics, reload=False),
              served.root, served.table, metrics)
    assert '<meta name="raycurv-auth" content="none">' in app.get("/").text


def test_api_routes_still_need_the_token(served):
    for path in ("/v1/runs/digits/samples/0/image", "/v1/runs/digits/histogram", "/ui/other"):
        assert served.get(path).status_code == 401


def test_new_routes_are_counted_by_route_template(served):
    route = "/v1/runs/{run}/samples/{sample_id}/image"
    before = served.metrics.value(REQUESTS, route, "GET", "200")
    sample_id = int(_column(served.table, "sample_id")[2])
    for _ in range(3):
        served.get(f"/v1/runs/digits/samples/{sample_id}/image", headers=AUTH)
    assert served.metrics.value(REQUESTS, route, "GET", "200") == before + 3
    rows_route = "/v1/runs/{run}/samples/{sample_id}/duplicates"
    before = served.metrics.value(ROWS, rows_route)
    body = served.get("/v1/runs/plain/samples/0/duplicates", headers=AUTH).json()
    assert served.metrics.value(ROWS, rows_route) == before + len(body["rows"])
