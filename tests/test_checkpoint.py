"""Checkpoints and epoch files raycurv writes round-trip through torch.load(weights_only=True),
and a planted pickle in their place runs nothing. No Ray cluster: the helpers run in-process."""

from __future__ import annotations

import os
import pickle
import shlex

import numpy as np
import pytest
import ray.train
import torch
from torch import nn

from raycurv import train
from raycurv.dynamics import TRAINING_RECORDS
from raycurv.runfolder import RunFolder


class _Planted:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Pool:
    """Records what the training loop hands to the curvature pool."""

    def __init__(self):
        self.submitted = []

    def submit(self, epoch, weights, training):
        self.submitted.append((epoch, weights, training))
        return []


def _trained(schedule: str, seed: int):
    """A small model, its SGD optimizer (momentum buffers filled) and schedule after one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = train.SCHEDULES[schedule](opt, 6)
    model(torch.randn(4, 1, 4, 4)).square().mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.mark.parametrize("schedule", sorted(train.SCHEDULES))
def test_checkpoint_round_trip_loads_weights_only(monkeypatch, schedule):
    model, opt, sched = _trained(schedule, seed=0)
    checkpoint = train._checkpoint(model, opt, sched, epoch=4)
    torch.load(os.path.join(checkpoint.path, "state.pt"), weights_only=True)
    other, other_opt, other_sched = _trained(schedule, seed=1)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    assert train._load_checkpoint(other, other_opt, other_sched) == 5
    for name, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], value)
    buffers = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    restored = [s["momentum_buffer"] for s in other_opt.state_dict()["state"].values()]
    assert len(buffers) == 4
    for mine, theirs in zip(buffers, restored, strict=True):
        torch.testing.assert_close(theirs, mine)
    assert other_sched.last_epoch == sched.last_epoch and other_sched.get_last_lr() == sched.get_last_lr()


def test_planted_checkpoint_runs_nothing(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"model": _Planted(marker), "epoch": 0}, folder / "state.pt")
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(folder)))
    with pytest.raises(pickle.UnpicklingError):
        train._load_checkpoint(*_trained("constant", seed=0))
    assert not marker.exists()


def test_epoch_files_round_trip_loads_weights_only(tmp_path):
    model, _, _ = _trained("constant", seed=0)
    records = np.random.default_rng(0).normal(size=(len(TRAINING_RECORDS), 7))
    run_dir = RunFolder(str(tmp_path))
    handed = _Pool()
    train._hand_to_pool(handed, run_dir, 0, model.state_dict(), records)
    train._hand_to_pool(handed, run_dir, 1, None, records * 2)  # an epoch the run does not score
    caught_up = _Pool()
    train._catch_up(caught_up, run_dir, start=2)
    assert [s[0] for s in caught_up.submitted] == [0, 1]
    for (_, weights, training), (_, saved_weights, saved) in zip(handed.submitted,
                                                                 caught_up.submitted, strict=True):
        assert list(saved) == list(training) == list(TRAINING_RECORDS)
        for name, values in training.items():
            assert isinstance(saved[name], np.ndarray) and saved[name].dtype == np.float32
            np.testing.assert_array_equal(saved[name], values)
        assert (weights is None) == (saved_weights is None)
        for name, value in (weights or {}).items():
            torch.testing.assert_close(saved_weights[name], value)


def test_an_epoch_file_from_before_margins_resubmits_its_loss_only(tmp_path):
    """Epoch files written before raycurv kept margins hold train_loss only: a resumed run hands
    that on, and the actors leave the epoch's margins missing (no co-scores, never wrong ones)."""
    folder = RunFolder(str(tmp_path))
    (tmp_path / "epochs").mkdir()
    torch.save({"epoch": 0, "weights": None, "train_loss": torch.arange(3.0)},
               folder.epoch_weights(0))
    pool = _Pool()
    train._catch_up(pool, folder, start=1)
    [(epoch, weights, training)] = pool.submitted
    assert epoch == 0 and weights is None and list(training) == ["train_loss"]
    np.testing.assert_array_equal(training["train_loss"], [0.0, 1.0, 2.0])


def test_planted_epoch_file_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    folder = RunFolder(str(tmp_path))
    (tmp_path / "epochs").mkdir()
    torch.save({"epoch": 0, "weights": _Planted(marker), "train_loss": torch.zeros(3)},
               folder.epoch_weights(0))
    with pytest.raises(pickle.UnpicklingError):
        train._catch_up(_Pool(), folder, start=1)
    assert not marker.exists()
