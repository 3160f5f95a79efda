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
    with pytest.raises(ValueError, match="unknown regime"):
        regime_spec("nope", base_epochs=12, data=data, seed=0, probes=1)
    assert "default" in REGIMES
