"""`raycurv export`: CSV and JSON Lines with every score, path and class names; cleanlab's
label-issues table read by pandas with cleanlab's names and types; a FiftyOne
image-classification dataset in its documented layout (fiftyone itself is not installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raycurv
from raycurv.cli import main
from raycurv.commands.export import FORMAT_CHOICES
from raycurv.data import plane
from raycurv.export import FORMATS
from raycurv.runfolder import RunFolder
from raycurv.table import METADATA_KEY, build_table, rank_and_percentile, read_metadata
from tests.serve_support import make_table, write_image_run

CLASSES = ("cat", "dog", "fox")


def _run_with_store(root: Path) -> tuple[Path, pa.Table]:
    """A run folder of an image-folder source: a score table (class names in its metadata) and a
    prepared dataset whose rows name each sample's file."""
    base = make_table(30, classes=3, seed=1)
    columns = {name: base.column(name).to_numpy(zero_copy_only=False).copy() for name in
               ("sample_id", "label", "original_label", "corrupted", "curvature", "epochs_scored",
                "csl", "final_loss", "final_confidence")}
    columns["duplicate_of"] = np.full(30, -1, dtype=np.int64)
    pred = columns["label"].copy()
    pred[:5] = (pred[:5] + 1) % 3  # the final model disagrees with five labels
    columns["final_pred"] = pred
    columns["curvature"][:5] += 10  # ... and those five are the most memorized
    columns["csl"][:5] += 10  # ... and have the highest summed training loss
    table = build_table(columns, {**read_metadata(base), "dataset": "imagefolder",
                                  "class_names": list(CLASSES)})
    folder = RunFolder(str(root / "run"))
    folder.write_scores(table)
    store = root / "run" / "data"
    store.mkdir()
    paths = [f"/photos/{CLASSES[k]}/{i:03d}.jpg" for i, k in enumerate(columns["label"])]
    pq.write_table(pa.table({"sample_id": columns["sample_id"], "label": columns["label"].astype(np.int64),
                             "path": paths, "image": [b"\0" * 4] * 30}, schema=plane.STORE_SCHEMA),
                   store / "part-0000.parquet")
    (store / plane.MANIFEST).write_text(json.dumps({
        "parts": ["part-0000.parquet"], "rows": [30], "shape": [1, 2, 2], "mean": [0.5],
        "std": [0.2], "fingerprint": "x"}))
    return root / "run", table


def test_the_command_offers_every_format():
    assert FORMAT_CHOICES == tuple(FORMATS)


def test_csv_and_jsonl_hold_every_score_path_and_class_names(tmp_path):
    run, table = _run_with_store(tmp_path)
    assert main(["export", str(run), "--format", "csv"]) == 0
    frame = pd.read_csv(run / "exports" / "scores.csv")
    assert list(frame.columns[:2]) == ["sample_id", "path"]
    assert {"curvature", "rank", "percentile", "csl", "aum", "final_pred", "label_name",
            "final_pred_name"} <= set(frame.columns)
    assert frame["path"][0] == f"/photos/{CLASSES[table.column('label')[0].as_py()]}/000.jpg"
    assert frame["label_name"].tolist() == [CLASSES[k] for k in table.column("label").to_pylist()]
    np.testing.assert_allclose(frame["curvature"], table.column("curvature").to_numpy(), rtol=1e-6)
    out = tmp_path / "all.jsonl"
    assert raycurv.export(run, format="jsonl", output=str(out)) == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["aum"] is None and rows[0]["sample_id"] == 0
    assert rows[1]["final_pred_name"] == CLASSES[table.column("final_pred")[1].as_py()]


def test_a_builtin_run_has_no_path_and_no_class_names(tmp_path):
    folder = tmp_path / "plain"
    RunFolder(str(folder)).write_scores(make_table(10))
    frame = pd.read_csv(raycurv.export(folder, format="csv"))
    assert frame["path"].isna().all() and frame["label_name"].isna().all()


def test_cleanlab_layout_names_types_and_rule(tmp_path):
    run, table = _run_with_store(tmp_path)
    assert main(["export", str(run), "--format", "cleanlab", "-o", str(tmp_path / "issues.csv")]) == 0
    issues = pd.read_csv(tmp_path / "issues.csv", index_col="sample_id")
    assert list(issues.columns) == ["is_label_issue", "label_score", "given_label", "predicted_label"]
    assert issues.dtypes.to_dict() == {"is_label_issue": np.dtype(bool), "label_score": np.dtype("float64"),
                                       "given_label": np.dtype("int64"), "predicted_label": np.dtype("int64")}
    # the five disagreeing labels are the top 5 by csl, the mislabel score: its percentile >= 0.9
    # flags the top 3
    csl = table.column("csl").to_numpy()
    assert issues.index[issues["is_label_issue"]].tolist() == sorted(np.argsort(-csl)[:3].tolist())
    np.testing.assert_allclose(issues["label_score"], 1 - rank_and_percentile(csl)[1], atol=1e-6)
    raycurv.export(run, format="cleanlab", output=str(tmp_path / "all.csv"), threshold=0.0)
    assert pd.read_csv(tmp_path / "all.csv")["is_label_issue"].sum() == 5  # every disagreement
    # scored checkpoints without training records (csl 0): the final loss ranks instead
    loss = np.linspace(1, 0, 30, dtype=np.float32)  # sample 0 the highest
    plain = table.set_column(table.schema.get_field_index("csl"), "csl", pa.array(np.zeros(30, np.float32)))
    plain = plain.set_column(plain.schema.get_field_index("final_loss"), "final_loss", pa.array(loss))
    plain = plain.replace_schema_metadata({METADATA_KEY: json.dumps(
        {**read_metadata(table), "training_records": False}).encode()})
    RunFolder(str(tmp_path / "plain")).write_scores(plain)
    found = pd.read_csv(raycurv.export(tmp_path / "plain", format="cleanlab"), index_col="sample_id")
    assert found.index[found["is_label_issue"]].tolist() == [0, 1, 2]
    np.testing.assert_allclose(found["label_score"], 1 - rank_and_percentile(loss)[1], atol=1e-6)


def _check_fiftyone_layout(out: Path, table: pa.Table, classes: list[str]) -> dict[str, str]:
    """FiftyOneImageClassificationDataset, as its importer reads it: labels.json holds
    ``classes`` and ``labels`` (uuid -> class index, or {label, confidence}); data.json maps each
    uuid to its image file. Returns the data map."""
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == classes
    ids = [str(i) for i in table.column("sample_id").to_pylist()]
    assert labels["labels"] == dict(zip(ids, table.column("label").to_pylist(), strict=True))
    predictions = json.loads((out / "predictions.json").read_text())
    first = predictions["labels"][ids[0]]
    assert first["label"] == table.column("final_pred")[0].as_py()
    assert first["confidence"] == pytest.approx(table.column("final_confidence")[0].as_py())
    data = json.loads((out / "data.json").read_text())
    assert set(data) == set(ids) and all(os.path.isabs(p) for p in data.values())
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["sample_id"] for s in scores] == table.column("sample_id").to_pylist()
    return data


def test_fiftyone_layout_points_at_the_runs_own_files(tmp_path):
    run, table = _run_with_store(tmp_path)
    assert main(["export", str(run), "--format", "fiftyone", "-o", str(tmp_path / "fo")]) == 0
    data = _check_fiftyone_layout(tmp_path / "fo", table, list(CLASSES))
    assert data["0"].startswith("/photos/") and not (tmp_path / "fo" / "data").exists()


def test_fiftyone_layout_writes_pngs_of_a_builtin_run(tmp_path):
    from PIL import Image

    folder, table = write_image_run(tmp_path, "digits", limit=20, duplicates=0)
    out = tmp_path / "fo"
    raycurv.export(folder, format="fiftyone", output=str(out))
    used = 1 + max(max(table.column("label").to_pylist()), max(table.column("final_pred").to_pylist()))
    data = _check_fiftyone_layout(out, table, [str(k) for k in range(used)])  # no class count kept
    with Image.open(data[str(table.column("sample_id")[0].as_py())]) as img:
        assert img.size == (8, 8)


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["--format", "csv", "--threshold", "2"], "threshold must lie in [0, 1], got 2.0"),
    (["--format", "csv", "-o", "{tmp}/file.txt/out.csv"], "file.txt is a file, not a folder"),
    (["--format", "csv", "-o", "{tmp}/run"], "run is a folder: give a file name for the csv export"),
])
def test_bad_export_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    run, _ = _run_with_store(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    before = sorted(os.walk(tmp_path))
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["export", str(run), *[a.replace("{tmp}", str(tmp_path)) for a in argv]]))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(os.walk(tmp_path)) == before


def test_export_of_a_missing_run(capsys, tmp_path):
    assert main(["export", str(tmp_path / "none"), "--format", "csv"]) == 2
    assert "no score table at" in capsys.readouterr().err


def test_unknown_format_through_the_api(tmp_path):
    with pytest.raises(raycurv.UsageError, match="unknown export format 'xls'; valid: csv, jsonl"):
        raycurv.export(tmp_path, format="xls")


def test_a_runs_class_names_are_kept_in_its_table_metadata():
    import dataclasses

    from raycurv.config import DataSpec, ScoreSpec
    from raycurv.data import prepare_dataset
    from raycurv.results import table_metadata

    spec = ScoreSpec(data=DataSpec(limit=20))
    data = prepare_dataset(spec.data, seed=0)
    assert "class_names" not in table_metadata(spec, data, spec.curvature.estimators[0], [0])
    named = dataclasses.replace(data, class_names=tuple(f"c{k}" for k in range(10)))
    meta = table_metadata(spec, named, spec.curvature.estimators[0], [0])
    assert meta["class_names"] == [f"c{k}" for k in range(10)]
