"""The shard scorer without Ray: estimators sharing gradient passes, idempotent epochs, and state
that survives a restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycurv import storage
from raycurv.actors import ShardScorer, ShardSpec, merge_summaries, shard_specs
from raycurv.config import CurvatureSpec, DataSpec, ScoreSpec
from raycurv.curvature import curvature
from raycurv.data import prepare_dataset
from raycurv.data.transforms import to_input
from raycurv.dynamics import TRAINING_RECORDS
from raycurv.models import build_model
from raycurv.scoring_model import prepare_for_scoring

ESTIMATORS = ((0.03, 6, "norm"), (0.03, 3, "trace"), (0.01, 2, "norm"))


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset(DataSpec(limit=300), seed=0)


def _scorer(digits, state_uri, start=40, stop=300, optimize=True):
    spec = ShardSpec(index=1, start=start, stop=stop, epochs=3, model="small_cnn", in_channels=1,
                     num_classes=10, norm=digits.norm, seed=4,
                     estimators=ESTIMATORS, batch_size=128, state_uri=str(state_uri),
                     optimize=optimize)
    sl = slice(start, stop)
    return ShardScorer(spec, digits.images[sl], digits.labels[sl], digits.sample_ids[sl])


def _training(values: np.ndarray) -> dict[str, np.ndarray]:
    """The same values for every training record (loss, logit margin, probability margin)."""
    return dict.fromkeys(TRAINING_RECORDS, values)


def _weights(seed: int):
    torch.manual_seed(seed)
    return build_model("small_cnn", in_channels=1, num_classes=10).state_dict()


@pytest.mark.parametrize("optimize", [True, False])
def test_every_estimator_equals_its_own_plain_call(digits, tmp_path, optimize):
    scorer = _scorer(digits, tmp_path / "s", optimize=optimize)
    scorer.score_epoch(2, _weights(0), _training(np.arange(300, dtype=np.float32)))
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    model.load_state_dict(_weights(0))
    x = to_input(digits.images, digits.norm)
    y, ids = torch.as_tensor(digits.labels), torch.as_tensor(digits.sample_ids)
    scoring = prepare_for_scoring(model, x[:1], fold_batch_norm=optimize, channels_last=optimize)
    assert scoring.folded == (3 if optimize else 0)
    for k, (h, n, variant) in enumerate(ESTIMATORS):
        # scoring batches are cut at multiples of 128 in dataset position: [40,128), [128,256), [256,300)
        expected = torch.cat([curvature(scoring.module, x[a:b], y[a:b], sample_ids=ids[a:b], epoch=2,
                                        seed=4, h=h, probes=n, variant=variant,
                                        max_pass=scoring.max_pass).curvature
                              for a, b in ((40, 128), (128, 256), (256, 300))]).numpy()
        np.testing.assert_array_equal(scorer.curvature[k, 2], expected)
    for name in TRAINING_RECORDS:
        np.testing.assert_array_equal(scorer.training[name][2], np.arange(40, 300, dtype=np.float32))
    assert scorer.scored_epochs == [2]


def test_an_epoch_scored_twice_counts_once_and_state_survives_a_restart(digits, tmp_path):
    scorer = _scorer(digits, tmp_path / "s")
    first = scorer.score_epoch(0, _weights(0), _training(np.ones(300, np.float32)))
    again = scorer.score_epoch(0, _weights(1), _training(np.full(300, 5.0, np.float32)))
    assert first["samples"] == 260 and again["samples"] == 0
    scorer.score_epoch(1, _weights(1), _training(np.ones(300, np.float32)))
    restarted = _scorer(digits, tmp_path / "s")
    assert restarted.scored_epochs == [0, 1]
    np.testing.assert_array_equal(restarted.curvature, scorer.curvature)
    for name in TRAINING_RECORDS:
        np.testing.assert_array_equal(restarted.training[name][0], np.ones(260, np.float32))
    assert restarted.final["epoch"] == 1


def test_each_epoch_is_written_once_and_never_rewritten(digits, tmp_path):
    """Persistence is incremental: scoring epoch 1 writes epoch 1's record and leaves epoch 0's
    file as it was; each record holds the shard's n values of that epoch only."""
    scorer = _scorer(digits, tmp_path / "s")
    scorer.score_epoch(0, _weights(0), _training(np.ones(300, np.float32)))
    first = (tmp_path / "s" / "epoch-0000.npz").stat()
    scorer.score_epoch(1, None, _training(np.full(300, 2.0, np.float32)))  # an unscored epoch
    assert sorted(f.name for f in (tmp_path / "s").iterdir()) == ["epoch-0000.npz", "epoch-0001.npz"]
    assert (tmp_path / "s" / "epoch-0000.npz").stat().st_mtime_ns == first.st_mtime_ns
    record = storage.read_npz(str(tmp_path / "s" / "epoch-0001.npz"))
    assert record["curvature"].shape == (len(ESTIMATORS), 260) and np.isnan(record["curvature"]).all()
    np.testing.assert_array_equal(record["train_loss"], np.full(260, 2.0, np.float32))
    assert "final_loss" not in record  # the final model's columns go with the latest scored epoch


def test_a_whole_state_file_from_earlier_versions_is_split_and_resumes(digits, tmp_path):
    """shard-KKKK.npz (the whole state in one file, with train_loss only, as before margins were
    kept) loads, is written out per epoch, and resumes: csl stays exact and the samples without
    margins get null co-scores in the merge."""
    scorer = _scorer(digits, tmp_path / "s")
    scorer.score_epoch(0, _weights(0), {"train_loss": np.ones(300, np.float32)})
    storage.write_npz(str(tmp_path / "old.npz"), {  # as an older raycurv wrote it
        "start": np.int64(40), "curvature": scorer.curvature, "train_loss": scorer.train_loss,
        "final_epoch": np.int64(0), "final_loss": scorer.final["loss"],
        "final_pred": scorer.final["pred"], "final_confidence": scorer.final["confidence"]})
    restarted = _scorer(digits, tmp_path / "old")
    assert restarted.scored_epochs == [0]
    assert sorted(f.name for f in (tmp_path / "old").iterdir()) == ["epoch-0000.npz"]
    np.testing.assert_array_equal(restarted.curvature, scorer.curvature)
    assert np.isnan(restarted.training["train_margin"]).all()
    for epoch in (1, 2):
        restarted.score_epoch(epoch, _weights(epoch), _training(np.full(300, 0.5, np.float32)))
    head = _scorer(digits, tmp_path / "head", start=0, stop=40)
    for epoch in range(3):
        head.score_epoch(epoch, _weights(epoch), _training(np.full(300, 0.5, np.float32)))
    merged = merge_summaries([restarted.summary(), head.summary()], digits).columns
    np.testing.assert_array_equal(merged["csl"][40:], np.float32(2.0))
    assert np.isnan(merged["aum"][40:]).all() and (merged["forgetting_events"][40:] == -1).all()
    np.testing.assert_array_equal(merged["aum"][:40], np.float32(0.5))
    np.testing.assert_array_equal(merged["learned_epoch"][:40], 0)


def test_the_merge_equals_the_per_epoch_arrays_reduced_whole(digits, tmp_path):
    """Shards reduced on their own and joined give exactly what reducing the whole (epochs, N)
    arrays gives; a sample never scored is an error."""
    shards = [_scorer(digits, tmp_path / f"s{k}", start=a, stop=b)
              for k, (a, b) in enumerate(((0, 128), (128, 300)))]
    rng = np.random.default_rng(0)
    losses = [rng.random(300).astype(np.float32) for _ in range(3)]
    for epoch in (0, 2):
        for shard in shards:
            shard.score_epoch(epoch, _weights(epoch), _training(losses[epoch]))
    for shard in shards:
        shard.score_epoch(1, None, _training(losses[1]))
    merged = merge_summaries([s.summary() for s in reversed(shards)], digits)
    whole = np.concatenate([s.curvature for s in shards], axis=2)  # (estimators, epochs, N)
    for k in range(len(ESTIMATORS)):
        np.testing.assert_array_equal(merged.curvature[k], np.nanmean(whole[k], axis=0))
    np.testing.assert_array_equal(merged.epochs_scored, np.full((len(ESTIMATORS), 300), 2))
    np.testing.assert_array_equal(merged.scored, np.tile([True, False, True], (len(ESTIMATORS), 1)))
    np.testing.assert_array_equal(merged.columns["csl"], np.sum(losses, axis=0, dtype=np.float32))
    np.testing.assert_array_equal(merged.columns["final_pred"][:128], shards[0].final["pred"])
    assert [s[:2] for s in merged.shards] == [(0, 128), (128, 300)]
    lonely = _scorer(digits, tmp_path / "lonely", start=0, stop=300)
    lonely.score_epoch(0, None, _training(losses[0]))
    with pytest.raises(RuntimeError, match="never scored"):
        merge_summaries([lonely.summary()], digits)


def test_training_records_need_the_loss(digits, tmp_path):
    with pytest.raises(ValueError, match="lack train_loss"):
        _scorer(digits, tmp_path / "s").score_epoch(0, None, {"train_margin": np.ones(300)})


def test_hvp_in_half_precision_scores_like_a_direct_call(digits, tmp_path):
    spec = ShardSpec(index=0, start=0, stop=100, epochs=1, model="small_cnn", in_channels=1,
                     num_classes=10, norm=digits.norm, seed=4,
                     estimators=((0.03, 3, "norm"),), batch_size=64, state_uri=str(tmp_path / "h"),
                     method="hvp", precision="bf16")
    scorer = ShardScorer(spec, digits.images[:100], digits.labels[:100], digits.sample_ids[:100])
    scorer.score_epoch(0, _weights(0), _training(np.zeros(300, np.float32)))
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    model.load_state_dict(_weights(0))
    x = to_input(digits.images[:100], digits.norm)
    y, ids = torch.as_tensor(digits.labels[:100]), torch.as_tensor(digits.sample_ids[:100])
    fp32 = torch.cat([curvature(model, x[a:b], y[a:b], sample_ids=ids[a:b], epoch=0, seed=4, h=0.03,
                                probes=3, method="hvp").curvature for a, b in ((0, 64), (64, 100))])
    rel = np.abs(scorer.curvature[0, 0] - fp32.numpy()) / fp32.numpy()
    assert np.median(rel) < 0.05 and rel.max() > 0  # half precision: close, not equal


def test_run_settings_reach_every_shard(digits):
    spec = ScoreSpec(data=DataSpec(limit=300), curvature=CurvatureSpec(
        method="hvp", precision="bf16", optimize=False, compile=True, actors=2, batch_size=64))
    shards = shard_specs(spec, digits)
    assert [(s.start, s.stop) for s in shards] == [(0, 128), (128, 300)]  # whole 64-batches
    for s in shards:
        assert (s.method, s.precision, s.optimize, s.compile) == ("hvp", "bf16", False, True)
        assert s.estimators == ((0.03, 2, "norm"),)
    assert shard_specs(ScoreSpec(data=DataSpec(limit=300)), digits)[0].precision is None  # fp32


@pytest.mark.parametrize(("every", "from_epoch", "scored"), [
    (1, 0, [0, 1, 2, 3, 4, 5, 6, 7]),
    (3, 0, [1, 4, 7]),  # counted back from the last epoch, which is always scored
    (1, 5, [5, 6, 7]),
    (2, 3, [3, 5, 7]),
])
def test_scored_epochs(every, from_epoch, scored):
    c = CurvatureSpec(every=every, from_epoch=from_epoch)
    assert [e for e in range(8) if c.scores_epoch(e, 8)] == scored
