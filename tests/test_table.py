"""The score table contract 1.2: the co-score columns (1.1) and ``suspected`` (1.2) are nullable
and come after the 1.0 ones, older tables are still read (their later columns all null), and
version-1 readers read a 1.2 table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from raycurv.detection import evaluate_table
from raycurv.serve.index import TableIndex
from raycurv.serve.schemas import SampleRow
from raycurv.suspected import mislabel_score, suspect
from raycurv.table import (
    CO_SCORE_FIELDS,
    METADATA_KEY,
    OPTIONAL_COLUMNS,
    V1_FIELDS,
    TableError,
    build_table,
    read_metadata,
    validate_table,
    with_optional_columns,
)
from tests.serve_support import make_table


def _with_co_scores(n: int = 40) -> pa.Table:
    base = make_table(n, seed=3)
    columns = {name: base.column(name).to_numpy(zero_copy_only=False)
               for name in base.column_names if name not in ("rank", "percentile")}
    columns["duplicate_of"] = base.column("duplicate_of").fill_null(-1).to_numpy()
    aum = np.linspace(-2, 3, n).astype(np.float32)
    aum[5] = np.nan  # a sample without a complete training record
    columns |= {"aum": aum, "margin": aum / 10, "forgetting_events": np.arange(n) % 3,
                "learned_epoch": np.where(np.arange(n) % 4 == 0, -1, np.arange(n) % 5)}
    columns["forgetting_events"][5] = columns["learned_epoch"][5] = -1
    return build_table(columns, read_metadata(base))


def test_co_scores_are_nullable_columns_after_the_v1_ones():
    table = _with_co_scores()
    meta = validate_table(table)
    assert (meta["table_version"], meta["table_minor_version"]) == (1, 1)
    # a version-1 reader finds its columns first, in order, with their types
    assert [table.schema.field(i) for i in range(len(V1_FIELDS))] == V1_FIELDS
    assert table.column_names[len(V1_FIELDS):] == [f.name for f in CO_SCORE_FIELDS]
    assert table.column("aum").null_count == 1 and not table.column("aum").is_valid()[5].as_py()
    assert table.column("margin").null_count == 1
    assert table.column("learned_epoch").null_count == 11  # 10 never learned, and sample 5
    assert table.column("forgetting_events").to_pylist()[4:7] == [1, None, 0]


def test_a_table_built_without_co_scores_is_a_1_0_table_read_with_null_co_scores():
    table = make_table(20)
    assert table.schema.names == [f.name for f in V1_FIELDS]
    assert read_metadata(table)["table_minor_version"] == 0
    meta = read_metadata(table)
    meta.pop("table_minor_version")  # as raycurv wrote 1.0 tables
    old = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    assert validate_table(old)["table_version"] == 1
    assert set(evaluate_table(old)["detection"]["corrupted"]) == {"curvature", "csl", "final_loss"}
    widened = with_optional_columns(old)
    assert widened.column_names == _with_suspected().column_names
    assert all(widened.column(name).null_count == 20 for name in OPTIONAL_COLUMNS)
    assert with_optional_columns(widened) is widened


def _with_suspected(n: int = 40) -> pa.Table:
    """A 1.2 table: the co-scores and ``suspected`` by raycurv.suspected's rule, samples 0 and 1
    in a conflicting duplicate group, the final model wrong on the corrupted labels of odd samples."""
    base = _with_co_scores(n)
    columns = {name: base.column(name).to_numpy(zero_copy_only=False)
               for name in base.column_names if name not in ("rank", "percentile")}
    for name in ("duplicate_of", "forgetting_events", "learned_epoch"):
        columns[name] = base.column(name).fill_null(-1).to_numpy()
    # the final model predicts the original class of the corrupted labels of odd samples
    columns["final_pred"] = np.where(np.arange(n) % 2 == 1, columns["original_label"],
                                     columns["label"]).astype(np.int32)
    columns["suspected"] = suspect(
        percentile=base.column("percentile").to_numpy(),
        mislabel_percentile=mislabel_score(columns)[1], label=columns["label"],
        final_pred=columns["final_pred"], conflicting=np.arange(n) < 2)
    return build_table(columns, read_metadata(base))


def test_suspected_is_a_1_2_string_column_served_as_text_or_null():
    table = _with_suspected()
    assert validate_table(table)["table_minor_version"] == 2
    assert table.column_names[-1] == "suspected" and table.schema.field("suspected").nullable
    values = table.column("suspected").to_pylist()
    assert values[:2] == ["conflicting_duplicate"] * 2 and None in values
    percentile = table.column("percentile").to_numpy()
    csl = table.column("csl").to_numpy()
    agrees = table.column("final_pred").to_numpy() == table.column("label").to_numpy()
    for k in range(2, len(values)):
        if agrees[k]:  # atypical: curvature's top 10 %
            expected = "atypical" if percentile[k] >= np.float32(0.9) else None
        else:  # mislabel: csl's top 10 % (at least 90 % of the samples have a lower csl)
            expected = "mislabel" if (csl < csl[k]).mean() >= 0.9 else None
        assert values[k] == expected, k
    index = TableIndex.from_table(table, run="s", path="s.parquet")
    rows = json.loads(index.rows_json(np.arange(len(values))))
    assert [r["suspected"] for r in rows] == values
    assert [json.loads(index.row_json(k))["suspected"] for k in range(len(values))] == values
    for row in rows:
        SampleRow.model_validate(row)
    bad = table.set_column(table.num_columns - 1, "suspected",
                           pa.array(["typo"] + values[1:], pa.string()))
    with pytest.raises(TableError, match=r"suspected has values \['typo'\]"):
        validate_table(bad)


def test_a_co_score_of_the_wrong_type_or_another_major_version_is_refused():
    table = _with_co_scores()
    index = table.schema.get_field_index("forgetting_events")
    wrong = table.set_column(index, "forgetting_events", table.column(index).cast(pa.float64()))
    with pytest.raises(TableError, match="forgetting_events has type double"):
        validate_table(wrong)
    meta = read_metadata(table) | {"table_version": 2}
    with pytest.raises(TableError, match="table version 2, expected 1"):
        validate_table(table.replace_schema_metadata(
            {METADATA_KEY: json.dumps(meta).encode()}))


def test_the_service_serves_the_co_scores_and_null_where_a_table_has_none():
    index = TableIndex.from_table(_with_co_scores(), run="co", path="co.parquet")
    rows = json.loads(index.rows_json(np.array([6, 5, 8])))
    assert rows == [json.loads(index.row_json(p)) for p in (6, 5, 8)]
    assert [r["forgetting_events"] for r in rows] == [0, None, 2]
    assert [r["learned_epoch"] for r in rows] == [1, None, None]  # 8: never learned
    assert rows[0]["aum"] == pytest.approx(float(np.float32(np.linspace(-2, 3, 40)[6])))
    assert rows[1]["aum"] is None and rows[1]["margin"] is None
    for row in rows:
        SampleRow.model_validate(row)
    summary = index.summary()
    assert summary["aum"]["min"] == pytest.approx(-2.0)
    assert {d["score"] for d in summary["detection"]} >= {"aum", "forgetting_events"}
    old = TableIndex.from_table(make_table(10), run="old", path="old.parquet")
    row = json.loads(old.row_json(0))
    assert all(row[name] is None for name in OPTIONAL_COLUMNS) and old.summary()["aum"] is None
