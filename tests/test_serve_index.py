"""The table index, payloads and command-line checks of the lookup service, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from raycurv.cli import main
from raycurv.serve import payloads
from raycurv.serve.index import TableIndex
from raycurv.serve.prometheus import RELOAD_FAILURES, build_metrics
from raycurv.serve.registry import RunRegistry
from raycurv.serve.settings import ServeSettings
from raycurv.table import rank_and_percentile
from tests.serve_support import make_table, write_run

ROOT = Path(__file__).resolve().parents[1]


def _index(table: pa.Table, run: str = "t") -> TableIndex:
    return TableIndex.from_table(table, run=run, path=Path("mem"))


def test_lookup_by_id_dense_sparse_and_unsorted():
    dense = _index(make_table(30, seed=1))
    assert dense.identity_ids
    assert dense.positions(np.array([0, 29, 30, -1])).tolist() == [0, 29, -1, -1]
    sparse = make_table(30, seed=2, id_step=5, id_offset=3)
    shuffled = sparse.take(np.random.default_rng(0).permutation(30))
    for table in (sparse, shuffled):
        index = _index(table)
        ids = table.column("sample_id").to_numpy()
        found = index.positions(np.array([3, 148, 4, 153]))
        assert ids[found[0]] == 3 and ids[found[1]] == 148
        assert found[2:].tolist() == [-1, -1]
        assert index.position_of(148) == found[1] and index.position_of(4) == -1
        rows = json.loads(index.rows_json(found[:2]))
        assert [r["sample_id"] for r in rows] == [3, 148]


def test_rows_json_matches_the_table_and_single_row():
    table = make_table(12, seed=3)
    index = _index(table)
    rows = json.loads(index.rows_json(np.arange(12)))
    assert rows == [json.loads(index.row_json(i)) for i in range(12)]
    for name in table.column_names:
        expected = table.column(name).to_pylist()
        got = [r[name] for r in rows]
        if pa.types.is_floating(table.schema.field(name).type):
            assert np.array_equal(np.float32(got), np.float32(expected))
        else:
            assert got == expected, name


def test_non_finite_scores_become_null():
    table = make_table(6, seed=4)
    csl = table.column("csl").to_numpy().copy()
    csl[2], csl[4] = np.nan, np.inf
    table = table.set_column(table.schema.get_field_index("csl"), "csl",
                             pa.array(csl, type=pa.float32()))
    index = _index(table)
    rows = json.loads(index.rows_json(np.arange(6)))
    assert [r["csl"] is None for r in rows] == [False, False, True, False, True, False]
    assert json.loads(index.row_json(2))["csl"] is None
    json.loads(payloads.summary_payload(index))  # strict JSON, no NaN


def test_top_orders_and_label_groups():
    table = make_table(50, seed=5)
    index = _index(table)
    curvature = table.column("curvature").to_numpy()
    label = table.column("label").to_numpy()
    positions, total = index.top(50)
    assert total == 50 and np.all(np.diff(curvature[positions]) <= 0)
    positions, _ = index.top(5, order="asc")
    assert positions.tolist() == np.argsort(curvature, kind="stable")[:5].tolist()
    positions, total = index.top(100, label=2)
    assert total == int((label == 2).sum()) and set(label[positions]) == {2}
    assert np.all(np.diff(curvature[positions]) <= 0)
    assert index.top(3, label=99)[1] == 0


def test_a_rank_column_that_is_no_permutation_is_recomputed_as_the_table_ranks():
    table = make_table(30, seed=6)
    curvature = table.column("curvature").to_numpy().copy()
    curvature[[3, 7, 11]] = curvature[5]  # ties: broken by row position
    table = table.set_column(table.schema.get_field_index("curvature"), "curvature",
                             pa.array(curvature, type=pa.float32()))
    rank = rank_and_percentile(curvature)[0]
    for bad in (np.ones(30, dtype=np.int64), np.r_[1, 1, np.arange(3, 31)].astype(np.int64)):
        index = _index(table.set_column(table.schema.get_field_index("rank"), "rank", pa.array(bad)))
        assert index.order.tolist() == np.argsort(rank).tolist()


def test_registry_refuses_once_and_counts(tmp_path):
    write_run(tmp_path, "a", make_table(10, seed=7))
    metrics = build_metrics()
    registry = RunRegistry(sources=[tmp_path], metrics=metrics)
    assert registry.refresh() == ["a: loaded 10 rows from " + str(tmp_path / "a" / "scores.parquet")]
    (tmp_path / "a" / "scores.parquet").write_bytes(b"garbage")
    first = registry.refresh()
    assert len(first) == 1 and "refused" in first[0]
    assert registry.refresh() == []  # the same refused file is not retried
    state = registry.get("a")
    assert state.index.rows == 10 and state.failures == 1
    assert metrics.value(RELOAD_FAILURES, "a") == 1


def test_deploy_yaml_args_are_typed_settings():
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "raycurv.serve.app:app_builder"
    settings = ServeSettings.model_validate(app["args"])
    assert settings.replica_cpus == 0.25 and settings.runs == ["runs"]
    with pytest.raises(ValueError):
        ServeSettings.model_validate({**app["args"], "replicas": 0})


@pytest.mark.parametrize("argv,message", [
    (["serve", "--runs", "/no/such/dir"], "no such run folder"),
    (["serve", "--runs", ".", "--port", "70000"], "--port"),
    (["serve", "--runs", ".", "--replicas", "0"], "replicas"),
    (["serve", "--runs", ".", "--reload-interval", "-1"], "reload_interval_s"),
    (["query", "x"], "either SAMPLE_ID or --top"),
    (["query", "x", "1", "--top", "3"], "either SAMPLE_ID or --top"),
    (["query", "x", "--top", "0"], "--top must be >= 1"),
    (["query", "x", "-5"], "SAMPLE_ID must be >= 0"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_query_reads_a_table_directly(tmp_path, capsys):
    write_run(tmp_path, "run1", make_table(20, seed=8))
    assert main(["query", str(tmp_path / "run1"), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "top 3 (most memorized" in out[0] and len(out) == 5
    assert main(["query", str(tmp_path / "run1"), "99"]) == 2
    assert "no sample 99" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scores.parquet").write_bytes(b"x")
    assert main(["query", str(tmp_path / "bad"), "1"]) == 2
    assert "cannot read" in capsys.readouterr().err
