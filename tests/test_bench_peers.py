"""The science benchmarks' own logic: cleanlab's side of bench/peers.py, the combined score, and
the regimes of bench/regimes.py. Small data, a few seconds of training."""

from __future__ import annotations

import numpy as np
import pytest

from bench.peers import cleanlab_scores, combined, cross_validated_probabilities, figures
from bench.regimes import REGIMES, regime_spec
from raycurv.config import DataSpec, ScoreSpec, TrainSpec


def test_cleanlab_flags_labels_the_out_of_sample_model_disbelieves():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = np.full((60, 3), 0.1)
    probs[np.arange(60), labels] = 0.8
    wrong = np.arange(60) < 6  # the model puts its mass on another class
    probs[wrong] = 0.1
    probs[wrong, (labels[wrong] + 1) % 3] = 0.8
    found = cleanlab_scores(labels, probs)
    assert figures({"cleanlab": found["cleanlab"]}, wrong, np.full(60, -1))["cleanlab"][
        "corrupted"]["auroc"] == 1.0
    assert found["flagged"][wrong].all() and not found["flagged"][~wrong].any()


def test_combined_is_the_mean_rank_and_ranks_missing_values_last():
    parts = {"a": np.array([1.0, 2.0, 3.0, np.nan]), "b": np.array([4.0, 3.0, np.inf, 1.0])}
    np.testing.assert_array_equal(combined(parts, ("a", "b")), [2.5, 2.5, 4.0, 1.0])


def test_cross_validation_predicts_every_sample_out_of_fold():
    spec = ScoreSpec(seed=1, data=DataSpec(limit=300, noise=0.1), train=TrainSpec(epochs=3))
    cv = cross_validated_probabilities(spec, 3, log=lambda *a, **k: None)
    probs = cv["probs"]
    assert probs.shape == (300, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)  # every row filled exactly once
    assert cv["seconds"]["train"] > 0


def test_regimes_change_only_what_they_name():
    data = DataSpec(limit=100)
    default, width = regime_spec("default", base_epochs=12, data=data, seed=0, probes=1)
    assert width is None and default.train == TrainSpec(epochs=12)
    memorize, _ = regime_spec("memorize", base_epochs=12, data=data, seed=0, probes=1)
    assert (memorize.train.epochs, memorize.train.weight_decay, memorize.train.schedule) == (
        36, 0.0, "constant")
    assert regime_spec("wide", base_epochs=12, data=data, seed=0, probes=1)[1] == 64
    assert regime_spec("h-large", base_epochs=12, data=data, seed=0, probes=1)[0].curvature.h == 0.1
    fit, fit_width = regime_spec("fit", base_epochs=15, data=data, seed=0, probes=1)
    assert (fit.train.epochs, fit.train.lr, fit_width) == (30, 0.05, 64)
    assert fit.train.weight_decay == TrainSpec().weight_decay
    with pytest.raises(ValueError, match="unknown regime"):
        regime_spec("nope", base_epochs=12, data=data, seed=0, probes=1)
    assert "default" in REGIMES


def test_curvature_through_confidence_is_the_median_of_each_confidence_bin():
    from bench.ceiling import through_confidence

    p_y = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    curvature = np.array([5.0, 1.0, 3.0, 2.0, 8.0, 4.0])
    np.testing.assert_array_equal(through_confidence(curvature, p_y, 2), [3, 3, 3, 4, 4, 4])
    # a curvature that follows p_y ranks through it as the loss does
    rng = np.random.default_rng(0)
    p_y = rng.uniform(size=2000)
    corrupted = rng.uniform(size=2000) < np.where(p_y < 0.2, 0.9, 0.02)
    follows = 1.0 - p_y + rng.normal(0, 0.01, size=2000)
    auc = {name: figures({"s": values}, corrupted, np.full(2000, -1))["s"]["corrupted"]["auroc"]
           for name, values in (("through", through_confidence(follows, p_y, 20)),
                                ("loss", -np.log(p_y)))}
    assert auc["through"] > 0.9 and abs(auc["through"] - auc["loss"]) < 0.02


def test_ceiling_reads_a_stored_run_and_its_figures_match_evaluate(digits_run):
    from bench.ceiling import analyze
    from raycurv.evaluate import evaluate_run
    from tests.conftest import DIGITS_EPOCHS

    found = analyze(str(digits_run), bins=10)
    figures_ = evaluate_run(str(digits_run), duplicates=False)["detection"]["corrupted"]
    auroc = found["auroc"]["corrupted"]
    assert auroc["final_loss"] == pytest.approx(figures_["final_loss"]["auroc"])
    assert auroc["curvature_run"] == pytest.approx(figures_["curvature"]["auroc"])
    assert found["corrupted"] == sum(r["corrupted"] for r in found["by_p_y"]) > 0
    assert found["samples"] == sum(r["clean"] + r["corrupted"] for r in found["by_p_y"])
    # every epoch's loss comes from the run's per-epoch table: the last one is the final loss
    assert [e["epoch"] for e in found["by_epoch"]] == list(range(DIGITS_EPOCHS))
    assert found["by_epoch"][-1]["loss"] == pytest.approx(auroc["final_loss"])
    assert found["by_epoch"][-1]["curvature"] == pytest.approx(auroc["curvature_last_epoch"])
    assert 0.5 < auroc["curvature_last_epoch"] <= 1.0
    # the spread's persistence: a correlation for every epoch but the last, and averaging over
    # the epochs cannot widen it (the mean of vectors is no longer than their mean length)
    corr = [e.get("spread_corr_next") for e in found["by_epoch"]]
    assert corr[-1] is None and all(-1 <= c <= 1 for c in corr[:-1])
    persistence = found["spread_persistence"]
    assert 0 < persistence["spread_std_of_mean"] <= persistence["spread_std_one_epoch"]
    # summed over the scored epochs (all of them here), curvature ranks as the table's does
    assert persistence["auroc_over_epochs"]["curvature"] == pytest.approx(auroc["curvature_run"])


def test_ceiling_agreement_matches_evaluate_on_a_stored_run_and_reference(tmp_path):
    from bench.ceiling import analyze, main, report
    from raycurv.agreement import evaluate_reference
    from raycurv.reference import read_reference
    from raycurv.runfolder import read_run_scores
    from tests.test_evaluate import fake_reference, fake_run

    run_dir, data = fake_run(tmp_path / "run")
    mem = np.clip(np.random.default_rng(0).uniform(-0.1, 1.0, len(data)), 0, 1)
    ref = fake_reference(tmp_path / "reference.parquet", data, mem)
    found = analyze(str(run_dir), bins=5, reference=ref)
    expected = evaluate_reference(read_run_scores(str(run_dir))[1], read_reference(ref)[0])["scores"]
    for ours, theirs in (("curvature_run", "curvature"), ("final_loss", "final_loss")):
        assert found["agreement"][ours] == pytest.approx(expected[theirs])
    # the last epoch's curvature is the run's times the last factor: the same ranks
    assert found["agreement"]["curvature_last_epoch"]["spearman"] == pytest.approx(
        expected["curvature"]["spearman"])
    assert set(found["auroc"]) == {"corrupted", "duplicate"}
    # its per-epoch table, as raycurv wrote them before the loss column: no per-epoch figures
    assert found["by_epoch"] == [] and "per-epoch figures left out" in report(found)
    assert main([str(run_dir), "--reference", ref, "--bins", "5"]) == 0
    with pytest.raises(SystemExit) as exc:
        main([str(run_dir), "--bins", "1"])
    assert exc.value.code == 2
