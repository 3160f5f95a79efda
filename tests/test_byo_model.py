"""Bring your own model: `--model package.module:factory` and `--weights FILE`, and from Python an
nn.Module instance (`raycurv.score(model=module)`). Every mistake is one line (exit code 2, or a
UsageError) before Ray starts, and nothing is written."""

from __future__ import annotations

import json
import os
import pickle
import re

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import raycurv
from raycurv.api import build_spec
from raycurv.cli import main
from raycurv.models import SmallCNN, build_model, check_model, pack_instance, resolve_model
from tests.byo_models import Locked, TinyNet, tiny
from tests.test_score_run import assert_same_scores


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


# --- an nn.Module instance, from Python ------------------------------------------------------

def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_instance_builds_fresh_copies_of_itself():
    source = TinyNet()
    packed = pack_instance(source)
    a, b = (build_model(packed, in_channels=1, num_classes=10) for _ in range(2))
    assert a is not b and a is not source and _same_weights(a, source) and _same_weights(b, source)
    with torch.no_grad():
        a.net[0].weight.add_(1.0)
    assert _same_weights(b, source) and not _same_weights(a, source)  # copies, independent
    check_model(packed, input_shape=(1, 8, 8), num_classes=10)


def test_weights_load_into_an_instance(tmp_path):
    other = TinyNet()
    torch.save(other.state_dict(), tmp_path / "w.pt")
    model = build_model(pack_instance(TinyNet()), in_channels=1, num_classes=10,
                        weights=str(tmp_path / "w.pt"))
    assert _same_weights(model, other)


def test_a_spec_names_an_instance_and_its_json_cannot_build_it():
    spec = build_spec(model=TinyNet(), epochs=2)
    assert spec.train.model.name == "instance of tests.byo_models.TinyNet"
    saved = spec.model_dump(mode="json")
    assert saved["train"]["model"] == "instance of tests.byo_models.TinyNet"
    assert build_spec(spec, seed=1).train.model == spec.train.model  # a spec passed on keeps it
    with pytest.raises(ValueError, match="was an nn.Module instance given to raycurv.score"):
        resolve_model(saved["train"]["model"])


def test_a_class_of_a_notebook_travels_by_value():
    class Notebook(nn.Module):  # defined where no worker can import it from
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(x.flatten(1))

    with pytest.raises((AttributeError, pickle.PicklingError)):
        pickle.dumps(Notebook())  # plain pickle refers to the class by name: no worker finds it
    check_model(pack_instance(Notebook()), input_shape=(1, 8, 8), num_classes=10)


class _WritesLog(TinyNet):
    def __init__(self, path):
        super().__init__()
        self.log = open(path, "w")  # noqa: SIM115 - an open file is the point


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: TinyNet(1, 3), "model 'instance of tests.byo_models.TinyNet' outputs (2, 3) for "
                                "a batch of 2, expected (2, 10)"),
    (lambda tmp: TinyNet(3, 10), "'instance of tests.byo_models.TinyNet' fails on inputs of shape "
                                 "(1, 8, 8)"),
    (lambda tmp: object(), "model must be a name, 'package.module:factory', a factory callable "
                           "or an nn.Module instance, got object"),
    (lambda tmp: Locked(), "'instance of tests.byo_models.Locked' cannot be pickled for Ray's "
                           "training workers and curvature actors: TypeError: cannot pickle "
                           "'_thread.lock' object"),
    (lambda tmp: _WritesLog(tmp / "log.txt"), "cannot be pickled for Ray's training workers"),
    (lambda tmp: "instance of tests.byo_models.TinyNet", "was an nn.Module instance given to "
                                                          "raycurv.score(): only the instance"),
])
def test_an_instance_that_does_not_fit_is_one_line_and_nothing_is_written(tmp_path, make, message):
    model = make(tmp_path)
    before = sorted(os.walk(tmp_path))
    with pytest.raises(raycurv.UsageError, match=re.escape(message)) as info:
        raycurv.score(limit=100, model=model, run_dir=str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    assert sorted(os.walk(tmp_path)) == before


@pytest.mark.slow
def test_an_instance_trains_and_scores_as_its_factory_does(digits_run, tmp_path):
    """The instance holds the weights the factory's seeded build starts from: the same table."""
    torch.manual_seed(5)  # as the training worker seeds before it builds small_cnn
    model = SmallCNN(1, 10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    run = raycurv.score(model=model, limit=600, noise=0.1, epochs=4, seed=5,
                        curvature={"batch_size": 128}, run_dir=str(tmp_path / "instance"))
    assert_same_scores(pq.read_table(digits_run / "scores.parquet"), run.table)
    assert run.metadata["model"] == "instance of raycurv.models.SmallCNN"
    record = json.loads((tmp_path / "instance" / "run.json").read_text())
    assert record["spec"]["train"]["model"] == "instance of raycurv.models.SmallCNN"
    assert raycurv.load_run(run.location).table.equals(run.table)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # not trained


@pytest.mark.slow
def test_an_instance_scores_checkpoints_as_its_factory_does(ray_cluster, tmp_path):
    """Saved state dicts scored with an instance of a class no worker can import, and with the
    factory of the same architecture: the same table."""
    class Notebook(nn.Sequential):  # tiny's layers: the same state dict names
        def __init__(self):
            super().__init__(*tiny(1, 10))

    torch.manual_seed(0)
    net = Notebook()
    (tmp_path / "ckpts").mkdir()
    for epoch in (1, 2):
        torch.save(tiny(1, 10).state_dict(), tmp_path / "ckpts" / f"model_{epoch}.pth")
    shared = dict(checkpoints=str(tmp_path / "ckpts"), limit=200, noise=0.1, seed=3,
                  curvature={"batch_size": 128})
    by_factory = raycurv.score(model="tests.byo_models:tiny", run_dir=str(tmp_path / "f"), **shared)
    by_instance = raycurv.score(model=net, run_dir=str(tmp_path / "i"), **shared)
    assert_same_scores(by_factory.table, by_instance.table)
    assert by_instance.metadata["train_epochs"] == 2
    assert by_instance.metadata["model"].startswith("instance of tests.test_byo_model.")
