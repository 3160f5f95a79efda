"""Scoring checkpoints a user already has (`raycurv score --checkpoints`, raycurv.checkpoints):
a run's own per-epoch weights (kept with --keep-weights) reproduce its curvature, as epoch files
(with training records: csl too) and as plain state dicts (no records: csl absent); a plain
PyTorch loop with raycurv.Recorder gives exact csl. One training run for the module."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

import raycurv
from raycurv.cli import main
from raycurv.config import DataSpec
from raycurv.data import prepare_dataset
from raycurv.data.transforms import to_input
from raycurv.models import build_model
from raycurv.runfolder import RunFolder
from raycurv.table import rank_and_percentile, read_metadata

EPOCHS = 3
SEED = 5
LIMIT = 300
# the flags a checkpoint scoring shares with the run it reproduces: data, seed, estimator
SHARED = ["--limit", str(LIMIT), "--noise", "0.1", "--seed", str(SEED), "--score-batch-size", "128"]


@pytest.fixture(scope="module")
def kept_run(ray_cluster, tmp_path_factory):
    """A 3-epoch digits run that keeps its per-epoch weights."""
    run_dir = tmp_path_factory.mktemp("kept") / "run"
    assert main(["score", *SHARED, "--epochs", str(EPOCHS), "--keep-weights",
                 "--run-dir", str(run_dir)]) == 0
    return run_dir


def _scores(run_dir) -> dict:
    table = RunFolder(str(run_dir)).read_scores()
    return {"table": table, "meta": read_metadata(table),
            **{name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}}


def test_keep_weights_keeps_every_epoch_file(kept_run):
    names = sorted(p.name for p in (kept_run / "epochs").iterdir())
    assert names == [f"epoch-{k:04d}.pt" for k in range(EPOCHS)]


def test_a_runs_own_epoch_files_reproduce_its_scores(kept_run, tmp_path, capsys):
    """Epoch files carry the training records: curvature, csl and the co-scores all reproduce."""
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["score", *SHARED, "--checkpoints", str(kept_run / "epochs"),
                 "--run-dir", str(again)]) == 0
    out = capsys.readouterr().out
    assert f"{EPOCHS} checkpoints" in out and "csl and the co-scores are absent" not in out
    run, scored = _scores(kept_run), _scores(again)
    np.testing.assert_array_equal(scored["sample_id"], run["sample_id"])
    np.testing.assert_allclose(scored["curvature"], run["curvature"], rtol=1e-5)
    np.testing.assert_allclose(scored["csl"], run["csl"], rtol=1e-5)
    np.testing.assert_allclose(scored["aum"], run["aum"], rtol=1e-5)
    np.testing.assert_array_equal(scored["forgetting_events"], run["forgetting_events"])
    assert scored["meta"]["training_records"] is True
    assert scored["meta"]["checkpoints"] == str(kept_run / "epochs")
    assert scored["meta"]["train_epochs"] == EPOCHS and scored["meta"]["epochs"] == [0, 1, 2]
    by_epoch = pq.read_table(again / "curvature_by_epoch.parquet")
    assert by_epoch.num_rows == LIMIT * EPOCHS


def test_plain_state_dicts_reproduce_curvature_and_say_csl_is_absent(kept_run, tmp_path, capsys):
    """State dicts without records (1-based names, one a training checkpoint dict): the same
    curvature; csl 0 and co-scores null, marked in the metadata, the record and the output."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for epoch in range(EPOCHS):
        saved = torch.load(kept_run / "epochs" / f"epoch-{epoch:04d}.pt", weights_only=True)
        state = {"model": saved["weights"], "epoch": epoch} if epoch == 1 else saved["weights"]
        torch.save(state, plain / f"model_{epoch + 1}.pth")
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["score", *SHARED, "--checkpoints", str(plain / "model_*.pth"),
                 "--run-dir", str(again)]) == 0
    out = capsys.readouterr().out
    assert "csl and the co-scores are absent" in out
    assert "csl " not in out.split("finding", 1)[-1]  # no detection figures of a csl that is 0
    run, scored = _scores(kept_run), _scores(again)
    np.testing.assert_allclose(scored["curvature"], run["curvature"], rtol=1e-5)
    assert (scored["csl"] == 0).all()
    assert scored["table"].column("aum").null_count == LIMIT
    assert scored["table"].column("learned_epoch").null_count == LIMIT
    assert scored["meta"]["training_records"] is False
    assert RunFolder(str(again)).read_record()["training_records"] is False
    # suspected's mislabel kind ranks by the final loss where csl is 0
    assert scored["meta"]["suspected"]["mislabel_score"] == "final_loss"
    table = scored["table"]
    wrong = (table.column("final_pred").to_numpy() != table.column("label").to_numpy())
    loss_high = rank_and_percentile(table.column("final_loss").to_numpy())[1] >= np.float32(0.9)
    suspected = np.asarray(table.column("suspected").to_pylist(), dtype=object)
    mislabel = suspected == "mislabel"
    np.testing.assert_array_equal(mislabel, wrong & loss_high & (suspected != "conflicting_duplicate"))
    assert mislabel.any()


def _train_with_recorder(folder, data, *, epochs: int) -> np.ndarray:
    """A plain PyTorch loop (no Ray) on ``data`` with a Recorder; returns each sample's summed
    training loss (N,), as the loop computed it."""
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=data.input_shape[0], num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = raycurv.Recorder(folder, num_samples=len(data))
    rng = np.random.default_rng(0)
    losses = np.zeros(len(data))
    for epoch in range(epochs):
        for batch in np.array_split(rng.permutation(len(data)), 6):
            x = to_input(data.images[batch], data.norm)
            y = torch.as_tensor(data.labels[batch])
            logits = model(x)
            per_sample = F.cross_entropy(logits, y, reduction="none")
            opt.zero_grad()
            per_sample.mean().backward()
            opt.step()
            rec.record(epoch, data.sample_ids[batch], logits, y)
            losses[batch] += per_sample.detach().numpy()
        rec.end_epoch(epoch, model)
    return losses


def test_a_recorder_loop_scores_with_exact_csl(ray_cluster, tmp_path):
    data = prepare_dataset(DataSpec(limit=LIMIT, noise=0.1), seed=SEED)
    losses = _train_with_recorder(tmp_path / "ckpts", data, epochs=2)
    run = raycurv.score(checkpoints=str(tmp_path / "ckpts"), limit=LIMIT, noise=0.1, seed=SEED,
                        run_dir=str(tmp_path / "run"), curvature={"batch_size": 128})
    table = run.table
    np.testing.assert_array_equal(table.column("sample_id").to_numpy(), data.sample_ids)
    np.testing.assert_allclose(table.column("csl").to_numpy(), losses, rtol=1e-5)
    assert table.column("aum").null_count == 0
    assert run.metadata["training_records"] is True and run.metadata["train_epochs"] == 2
    assert np.isfinite(table.column("curvature").to_numpy()).all()


def test_the_recorder_refuses_epochs_out_of_order_and_missing_samples(tmp_path):
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    rec = raycurv.Recorder(tmp_path, num_samples=5)
    with pytest.raises(raycurv.UsageError, match="the recorder is at epoch 0"):
        rec.record(1, [0, 1, 2, 3], logits, labels)
    rec.record(0, np.array([0, 1, 2, 3]), logits, labels)
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    with pytest.raises(raycurv.UsageError, match="recorded 4 distinct samples, not num_samples=5"):
        rec.end_epoch(0, model)
    rec.record(0, torch.tensor([4]), logits[:1], labels[:1])
    assert rec.end_epoch(0, model).endswith("epoch-0000.pt")
    assert raycurv.Recorder(tmp_path).epoch == 1  # a new recorder continues after the files there


def test_kept_weights_of_an_unscored_epoch_are_saved_but_not_scored(tmp_path):
    """--keep-weights with --score-every: an unscored epoch's file holds its weights (to score
    later with --checkpoints), but the actors get its records only, now and on resume. (That the
    files stay once scored: test_keep_weights_keeps_every_epoch_file.)"""
    from raycurv import train
    from raycurv.checkpoints import read_checkpoint
    from raycurv.dynamics import TRAINING_RECORDS
    from tests.test_checkpoint import _Pool

    folder = RunFolder(str(tmp_path))
    state = build_model("small_cnn", in_channels=1, num_classes=10).state_dict()
    records = np.ones((len(TRAINING_RECORDS), 4))
    pool = _Pool()
    train._hand_to_pool(pool, folder, 0, state, records, scored=False)
    assert pool.submitted[0][1] is None
    weights, saved = read_checkpoint(folder.epoch_weights(0))
    assert saved["epoch"] == 0 and weights.keys() == state.keys()
    resumed = _Pool()
    train._catch_up(resumed, folder, start=1, scores=lambda epoch: False)
    assert resumed.submitted[0][1] is None
    train._catch_up(resumed, folder, start=1)
    assert resumed.submitted[1][1].keys() == state.keys()
