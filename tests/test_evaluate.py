"""`raycurv evaluate`: agreement with a reference, the epoch window, duplicate groups, bad input.
Run folders are built from synthetic scores (no training): digits with injected noise and
duplicates, prepared exactly as a scoring run would prepare them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycurv.agreement import agreement, evaluate_reference, top_k_count
from raycurv.cli import main
from raycurv.config import ScoreSpec
from raycurv.data import prepare_dataset
from raycurv.errors import UsageError
from raycurv.evaluate import epoch_window, parse_epochs
from raycurv.reference import ReferenceSpec, reference_table
from raycurv.runfolder import BY_EPOCH_FILE, RunFolder
from raycurv.table import BY_EPOCH_SCHEMA, build_table

EPOCH_FACTORS = (0.5, 1.0, 1.5)  # per-epoch curvature = curvature * factor; the mean is curvature


def fake_run(run_dir, *, limit: int = 300, noise: float = 0.1, duplicates: int = 10, seed: int = 3):
    """A run folder (scores.parquet, curvature_by_epoch.parquet, run.json) on digits whose
    curvature is high for corrupted labels and injected copies; returns (run_dir, data)."""
    spec = ScoreSpec.model_validate({"seed": seed, "run_dir": str(run_dir), "data": {
        "limit": limit, "noise": noise, "duplicates": duplicates}})
    data = prepare_dataset(spec.data, seed=seed)
    rng = np.random.default_rng(seed)
    flagged = data.corrupted | (data.duplicate_of >= 0)
    curvature = rng.lognormal(-3, 0.5, len(data)) + flagged * rng.uniform(0.5, 1.0, len(data))
    columns = {"sample_id": data.sample_ids, "label": data.labels, "original_label": data.original_labels,
               "corrupted": data.corrupted, "duplicate_of": data.duplicate_of, "curvature": curvature,
               "epochs_scored": np.full(len(data), 3), "csl": curvature * 10 + rng.uniform(0, 1, len(data)),
               "final_loss": curvature + rng.uniform(0, 0.5, len(data)),
               "final_confidence": np.full(len(data), 0.9), "final_pred": data.original_labels,
               # co-scores: flagged samples have a low margin and are never learned for good
               "aum": 2 - 3 * flagged + rng.normal(0, 0.3, len(data)),
               "margin": np.tanh(2 - 3 * flagged + rng.normal(0, 0.3, len(data))),
               "forgetting_events": rng.poisson(0.2 + flagged), "learned_epoch":
               np.where(flagged, -1, rng.integers(0, 3, len(data)))}
    meta = {"run": run_dir.name, "dataset": "digits", "n": len(data), "classes": 10, "epochs": [0, 1, 2]}
    RunFolder(str(run_dir)).write_scores(build_table(columns, meta))
    epochs = np.repeat(np.arange(3, dtype=np.int32), len(data))
    per_epoch = np.concatenate([curvature * f for f in EPOCH_FACTORS]).astype(np.float32)
    pq.write_table(pa.Table.from_arrays([pa.array(np.tile(data.sample_ids, 3)), pa.array(epochs),
                                         pa.array(per_epoch)], schema=BY_EPOCH_SCHEMA),
                   run_dir / BY_EPOCH_FILE)
    record = {"spec": spec.model_dump(mode="json"), "dataset_fingerprint": data.fingerprint}
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir, data


def fake_reference(path, data, mem: np.ndarray, models: int = 100) -> str:
    """A reference table for ``data`` with the given mem (n_in = models / 2)."""
    n_in = np.full(len(data), models // 2)
    total = {"n_in": n_in, "correct_in": n_in, "correct_out": np.round((1 - mem) * (models - n_in))}
    spec = ReferenceSpec.model_validate({"models": models})
    pq.write_table(reference_table(data, total, spec, {"models": models}), path)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("runs") / "digits")


def _cli(capsys, argv) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_agreement_of_known_vectors():
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.0])
    same = agreement(x, x, 2)
    assert same == pytest.approx({"cosine": 1, "cosine_top_k": 1, "pearson": 1, "spearman": 1,
                                  "top_k_overlap": 1})
    reverse = agreement(-x, x, 2)
    assert reverse["spearman"] == pytest.approx(-1) and reverse["top_k_overlap"] == 0
    y = np.array([1.0, 0.0, 3.0, 2.0, 5.0])
    top = [4, 2]  # the two highest of y
    expected = x[top] @ y[top] / np.linalg.norm(x[top]) / np.linalg.norm(y[top])
    assert agreement(x, y, 2)["cosine_top_k"] == pytest.approx(expected)
    assert top_k_count(0.1, 1000) == 100 and top_k_count(50, 1000) == 50 and top_k_count(5000, 10) == 10


def test_evaluate_with_reference_and_window(run, capsys, tmp_path):
    run_dir, data = run
    flagged = (data.corrupted | (data.duplicate_of >= 0)).astype(float)
    ref = fake_reference(tmp_path / "ref.parquet", data, flagged * 0.9)
    code, out, err = _cli(capsys, ["evaluate", str(run_dir), "--reference", ref, "--epochs", "2:3", "--json"])
    assert code == 0, err
    m = json.loads(out)
    assert m["epochs"] == "2:3" and m["samples"] == len(data)
    found = m["detection"]
    assert found["corrupted"]["curvature"]["auroc"] > 0.95 and found["duplicate"]["curvature"]["auroc"] > 0.99
    assert found["duplicate"]["curvature"]["positives"] == 10
    a = m["agreement"]
    assert a["k"] == round(0.1 * len(data)) and a["samples"] == len(data)
    assert a["scores"]["curvature"]["top_k_overlap"] > 0.6  # k = 31 of 40 tied at the top of mem
    assert a["scores"]["curvature"]["spearman"] > 0.5
    assert set(a["scores"]) == {"curvature", "csl", "final_loss", "aum", "margin",
                                "forgetting_events", "learned_epoch"}
    # read higher = more memorized: a low aum and never learned agree with a high mem
    assert a["scores"]["aum"]["spearman"] > 0.5 and a["scores"]["learned_epoch"]["top_k_overlap"] > 0.6
    assert found["corrupted"]["aum"]["auroc"] > 0.95
    d = m["duplicate_groups"]
    assert d["injected"] == {"copies": 10, "found": 1.0}
    assert d["conflicting_groups"] >= 10 and d["ranking"]["curvature"]["groups_with_member_in_top"] > 0.5
    assert d["ranking"]["aum"]["groups_with_member_in_top"] > 0.5
    code, out, _ = _cli(capsys, ["evaluate", str(run_dir), "--reference", ref, "--no-duplicates"])
    assert code == 0 and "agreement with the reference" in out and "duplicate groups" not in out


def test_epoch_window_is_the_mean_of_its_epochs(run):
    run_dir, data = run
    by_epoch = pq.read_table(run_dir / BY_EPOCH_FILE)
    scores = pq.read_table(run_dir / "scores.parquet").column("curvature").to_numpy()
    mean, counts = epoch_window(by_epoch, data.sample_ids, 1, None)
    np.testing.assert_allclose(mean, scores * np.mean(EPOCH_FACTORS[1:]), rtol=1e-5)
    assert (counts == 2).all()
    # streamed in small batches, as a large per-epoch table is read: the same figures
    streamed = epoch_window(iter(by_epoch.to_batches(max_chunksize=37)), data.sample_ids, 1, None)
    np.testing.assert_array_equal(streamed[0], mean)
    np.testing.assert_array_equal(streamed[1], counts)
    assert parse_epochs("2:5") == (2, 5) and parse_epochs(":4") == (0, 4) and parse_epochs("3:") == (3, None)


def test_reference_with_other_labels_is_refused(run, tmp_path):
    run_dir, _ = run
    other = prepare_dataset(ScoreSpec.model_validate({"data": {"limit": 300, "noise": 0.2,
                                                                "duplicates": 10}}).data, seed=3)
    ref = fake_reference(tmp_path / "other.parquet", other, np.zeros(len(other)))
    table = pq.read_table(run_dir / "scores.parquet")
    with pytest.raises(UsageError, match="computed with other labels"):
        evaluate_reference(table, pq.read_table(ref))


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "5"], "--epochs must look like A:B"),
    (["--epochs", "3:1"], "need 0 <= A < B"),
    (["--epochs", "7:9"], "hold no scored epoch"),
    (["--reference", "/nonexistent.parquet"], "no reference table at /nonexistent.parquet"),
    (["--near-threshold", "3"], "--near-threshold must lie in [0, 2]"),
    (["--top-k", "x"], "argument --top-k: expected a number, got 'x'"),
])
def test_bad_input_is_one_line_exit_2(run, capsys, flags, message):
    code, _, err = _cli(capsys, ["evaluate", str(run[0]), *flags])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_missing_run_and_missing_data(capsys, tmp_path):
    code, _, err = _cli(capsys, ["evaluate", str(tmp_path / "nope")])
    assert code == 2 and "no score table" in err
    run_dir, _ = fake_run(tmp_path / "r", limit=100, duplicates=0)
    (run_dir / "run.json").unlink()
    code, _, err = _cli(capsys, ["evaluate", str(run_dir)])
    assert code == 2 and "no run.json" in err
    code, out, _ = _cli(capsys, ["evaluate", str(run_dir), "--no-duplicates"])
    assert code == 0 and "finding corrupted labels" in out
