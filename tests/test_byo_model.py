"""Bring your own model: `--model package.module:factory` and `--weights FILE`. Every mistake is
one line and exit code 2 before Ray starts, and nothing is written."""

from __future__ import annotations

import os

import pytest
import torch

from raycurv.cli import main
from raycurv.models import build_model, check_model
from tests.byo_models import tiny


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_factory_path_builds_the_users_model():
    model = build_model("tests.byo_models:tiny", in_channels=1, num_classes=10)
    assert isinstance(model[0], torch.nn.Conv2d)
    check_model("tests.byo_models:tiny", input_shape=(1, 8, 8), num_classes=10)


def test_weights_are_loaded(tmp_path):
    source = tiny(1, 10)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model("tests.byo_models:tiny", in_channels=1, num_classes=10,
                        weights=str(tmp_path / "w.pt"))
    assert torch.equal(model[0].weight, source[0].weight)


@pytest.mark.parametrize(("model", "message"), [
    ("tests.no_such_module:tiny", "cannot import tests.no_such_module: ModuleNotFoundError"),
    ("tests.byo_models:missing", "tests.byo_models has no attribute 'missing'"),
    ("tests.byo_models:not_a_module", "returned str, not a torch.nn.Module"),
    ("tests.byo_models:wrong_outputs", "outputs (2, 3) for a batch of 2, expected (2, 10)"),
    ("tests.byo_models:fails_on_input", "fails on inputs of shape (1, 8, 8)"),
    ("vgg", "unknown model 'vgg'; valid: small_cnn"),
    (":tiny", "must look like package.module:factory"),
])
def test_a_model_that_does_not_fit_is_one_line_and_exit_2(capsys, tmp_path, model, message):
    run_dir = tmp_path / "run"
    err = _fails(capsys, ["score", "--limit", "100", "--model", model, "--run-dir", str(run_dir)])
    assert message in err
    assert not run_dir.exists()


def test_weights_that_do_not_fit_are_one_line_and_exit_2(capsys, tmp_path):
    run_dir = tmp_path / "run"
    torch.save(tiny(1, 5).state_dict(), tmp_path / "five.pt")  # 5 classes, digits has 10
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"w": [1, 2]}, tmp_path / "list.pt")
    cases = [("five.pt", "does not match model 'tests.byo_models:tiny'"),
             ("junk.pt", "is not a torch state dict"),
             ("list.pt", "does not hold a state dict"),
             ("missing.pt", "weights file not found")]
    before = sorted(os.walk(tmp_path))
    for name, message in cases:
        err = _fails(capsys, ["score", "--limit", "100", "--model", "tests.byo_models:tiny",
                              "--weights", str(tmp_path / name), "--run-dir", str(run_dir)])
        assert message in err
    assert sorted(os.walk(tmp_path)) == before
