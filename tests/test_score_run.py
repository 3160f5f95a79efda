"""End to end through Ray: `raycurv score` on digits writes a contract-v1 table whose curvature
finds the corrupted labels; the same seed with another number of actors gives the same table."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from raycurv.cli import main
from raycurv.table import read_metadata, validate_table


def assert_same_scores(a, b) -> None:
    """Bit-identical columns (scoring batches are cut at fixed sample-id boundaries)."""
    assert a.column_names == b.column_names
    for column in a.column_names:
        assert a.column(column).equals(b.column(column)), column

pytestmark = pytest.mark.slow

EPOCHS = 4  # as in conftest's digits_run


def test_table_follows_the_contract(digits_run):
    table = pq.read_table(digits_run / "scores.parquet")
    meta = validate_table(table)
    assert table.num_rows == 600
    df = table.to_pandas()
    assert (df["epochs_scored"] == EPOCHS).all()
    assert df["sample_id"].is_monotonic_increasing and df["sample_id"].max() < 1797
    assert df["corrupted"].sum() == 60
    assert ((df["label"] != df["original_label"]) == df["corrupted"]).all()
    assert df["duplicate_of"].isna().all()
    assert (df["csl"] > 0).all() and np.isfinite(df["final_loss"]).all()
    assert df["final_confidence"].between(0, 1).all() and df["final_pred"].between(0, 9).all()
    by_rank = df.sort_values("rank")
    assert list(by_rank["rank"]) == list(range(1, 601))
    assert by_rank["curvature"].is_monotonic_decreasing
    assert df.loc[df["curvature"].idxmin(), "percentile"] == 0.0
    assert meta["dataset"] == "digits" and meta["epochs"] == list(range(EPOCHS))
    assert meta["h"] == 0.03 and meta["probes"] == 2 and meta["n"] == 600
    # the co-scores of contract 1.1, from every epoch's training pass, and 1.2's suspected kinds
    assert (meta["table_minor_version"], meta["train_epochs"]) == (2, EPOCHS)
    assert meta["suspected"]["duplicates_searched"] and meta["suspected"]["threshold"] == 0.9
    assert meta["suspected"]["mislabel_score"] == "csl"
    # no duplicates here: mislabel = csl's top 10 % predicted as another class, atypical =
    # curvature's top 10 % predicted right
    agrees = df["final_pred"] == df["label"]
    csl_high = (df["csl"].rank(method="min") - 1) / len(df) >= np.float32(0.9)
    expected = np.where(~agrees & csl_high, "mislabel",
                        np.where(agrees & (df["percentile"] >= np.float32(0.9)), "atypical", "-"))
    assert df["suspected"].fillna("-").tolist() == expected.tolist()
    assert (df["suspected"] == "mislabel").sum() > 30  # most of the 60 corrupted labels
    assert np.isfinite(df["aum"]).all() and df["margin"].between(-1, 1).all()
    assert df["forgetting_events"].between(0, EPOCHS - 1).all()
    learned = df["learned_epoch"]
    assert learned.dropna().between(0, EPOCHS - 1).all()
    # never learned for good = wrong in the last epoch's training pass, whose margin is then <= 0
    assert learned.isna().sum() > 0 and (df.loc[learned.isna(), "aum"] < df["aum"].median()).mean() > 0.5
    assert json.loads((digits_run / "run.json").read_text())["spec"]["seed"] == 5


def test_per_epoch_table_averages_to_the_score(digits_run):
    per_epoch = pq.read_table(digits_run / "curvature_by_epoch.parquet").to_pandas()
    assert len(per_epoch) == 600 * EPOCHS
    mean = per_epoch.groupby("sample_id")["curvature"].mean()
    scores = pq.read_table(digits_run / "scores.parquet").to_pandas().set_index("sample_id")
    np.testing.assert_allclose(scores["curvature"], mean.loc[scores.index], rtol=1e-5)
    # each epoch's loss of the model scored then: the last epoch's is the table's final loss,
    # and training lowers it
    assert per_epoch["loss"].notna().all() and (per_epoch["loss"] >= 0).all()
    last = per_epoch[per_epoch["epoch"] == EPOCHS - 1].set_index("sample_id")["loss"]
    np.testing.assert_allclose(last.loc[scores.index], scores["final_loss"], rtol=1e-6)
    by_epoch = per_epoch.groupby("epoch")["loss"].mean()
    assert by_epoch[EPOCHS - 1] < by_epoch[0]


def test_curvature_finds_the_corrupted_labels(digits_run, capsys):
    df = pq.read_table(digits_run / "scores.parquet").to_pandas()
    auroc = roc_auc_score(df["corrupted"], df["curvature"])
    assert auroc > 0.8, auroc  # chance gives 0.5; the full default run reaches 0.99 (README)
    capsys.readouterr()
    assert main(["evaluate", str(digits_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["detection"]["corrupted"]["curvature"]["auroc"] == pytest.approx(auroc, abs=1e-9)
    assert metrics["corrupted"] == 60


def test_same_seed_other_actor_count_gives_the_same_table_on_a_file_uri(digits_run, digits_flags,
                                                                         tmp_path, capsys):
    """Three actors instead of one, into a file:// run folder: the same table; and every verb
    reads that run through its URI: evaluate, report, query, and the service."""
    from ray import serve

    from raycurv.serve.settings import build_settings
    from tests.serve_support import run_app

    other = tmp_path / "three-actors"
    uri = f"file://{other}"
    assert main(["score", *digits_flags, "--actors", "3", "--actor-cpus", "0.3", "--run-dir", uri]) == 0
    a = pq.read_table(digits_run / "scores.parquet")
    b = pq.read_table(other / "scores.parquet")
    assert read_metadata(a)["dataset_fingerprint"] == read_metadata(b)["dataset_fingerprint"]
    assert_same_scores(a, b)

    capsys.readouterr()
    assert main(["evaluate", uri, "--epochs", "1:3", "--json"]) == 0
    windowed = json.loads(capsys.readouterr().out)
    assert windowed["epochs"] == "1:3" and windowed["corrupted"] == 60
    assert main(["report", uri, "--top", "5"]) == 0
    assert (other / "report" / "index.html").is_file() and (other / "report" / "epochs.png").is_file()
    capsys.readouterr()
    top = int(b.sort_by([("rank", "ascending")]).column("sample_id")[0].as_py())
    assert main(["query", uri, "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["sample_id"] == top
    url = run_app(build_settings(runs=[uri], environ={}), name="file-uri")
    try:
        with urllib.request.urlopen(f"{url}/v1/runs/three-actors/top?k=1", timeout=30) as answer:
            assert json.loads(answer.read())["rows"][0]["sample_id"] == top
    finally:
        serve.delete("file-uri")


def test_scoring_every_other_epoch_keeps_every_loss_and_the_same_epochs(digits_run, digits_flags,
                                                                         tmp_path):
    """--score-every 2 over 4 epochs scores epochs 1 and 3 only, each exactly as the run scoring
    every epoch did (same training, same probes); csl still sums all 4 epochs' losses."""
    sparse = tmp_path / "every-2"
    assert main(["score", *digits_flags, "--score-every", "2", "--run-dir", str(sparse)]) == 0
    full = pq.read_table(digits_run / "scores.parquet").to_pandas()
    got = pq.read_table(sparse / "scores.parquet")
    assert read_metadata(got)["epochs"] == [1, 3]
    got = got.to_pandas()
    assert (got["epochs_scored"] == 2).all()
    np.testing.assert_array_equal(got["csl"], full["csl"])
    np.testing.assert_array_equal(got["final_loss"], full["final_loss"])
    per_epoch = pq.read_table(digits_run / "curvature_by_epoch.parquet").to_pandas()
    expected = per_epoch[per_epoch["epoch"].isin([1, 3])].groupby("sample_id")["curvature"].mean()
    np.testing.assert_allclose(got["curvature"], expected.loc[got["sample_id"]], rtol=1e-6)
    assert not (sparse / "epochs").exists() or not any((sparse / "epochs").iterdir())


def test_a_folder_holding_another_run_is_refused(digits_run, digits_flags, capsys):
    before = (digits_run / "scores.parquet").read_bytes()
    flags = [f if f != "0.1" else "0.2" for f in digits_flags]
    assert main(["score", *flags, "--run-dir", str(digits_run)]) == 2
    assert "holds a run with other settings (data.noise 0.1 -> 0.2)" in capsys.readouterr().err
    assert (digits_run / "scores.parquet").read_bytes() == before
