"""Quiet progress: a default run keeps Ray's and Ray Train's own INFO lines off the console (one
progress line per epoch and the summary remain); --verbose brings them back."""

from __future__ import annotations

import logging
import os

import pytest

from raycurv import train
from raycurv.cli import build_parser
from raycurv.config import DataSpec, ScoreSpec
from raycurv.data import prepare_dataset
from raycurv.run import quiet_ray_logs


class _Captured(Exception):
    pass


@pytest.mark.parametrize(("verbose", "level"), [(False, "WARNING"), (True, "INFO")])
def test_ray_train_logs_at_info_only_when_verbose(monkeypatch, tmp_path, verbose, level):
    seen = {}

    def trainer(*args, run_config, **kwargs):
        seen["level"] = run_config.logging_config.log_level
        raise _Captured

    monkeypatch.setattr(train, "TorchTrainer", trainer)
    monkeypatch.setattr(train.ray, "put", lambda value: value)
    spec = ScoreSpec(run_dir=str(tmp_path), data=DataSpec(limit=20))
    with pytest.raises(_Captured):
        train.fit(spec, prepare_dataset(spec.data, seed=0), None, verbose=verbose)
    assert seen["level"] == level


def test_driver_side_ray_info_lines_are_hidden_unless_verbose(monkeypatch, caplog):
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    handler = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [handler])
    info = logging.LogRecord("ray._private.worker", logging.INFO, "", 0, "Started a local Ray", (), None)
    warning = logging.LogRecord("ray", logging.WARNING, "", 0, "careful", (), None)
    quiet_ray_logs(verbose=False)
    assert not handler.filter(info) and handler.filter(warning)
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # pytest's stdout is not a terminal: no colors
    quiet_ray_logs(verbose=True)
    assert handler.filter(info)


def test_score_takes_verbose():
    assert build_parser().parse_args(["score", "--verbose"]).verbose is True
    assert build_parser().parse_args(["score"]).verbose is False
