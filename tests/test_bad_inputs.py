"""Hostile and broken input, case by case: every one gets one line on stderr and exit code 2,
before Ray starts, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from raycurv.config import DataSpec, ScoreSpec
from raycurv.data import prepare_dataset
from raycurv.errors import UsageError
from raycurv.run import _spec_record, check_run_dir
from raycurv.runfolder import RunFolder
from tests.serve_support import make_table
from tests.test_cli import _fails
from tests.test_data import BAD_INPUTS  # the data cases, also tested at the library level there


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test: these inputs are refused before that."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def _write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# (case, files to write {name: content}, argv with {tmp} for the test folder, message fragment)
CASES = [
    ("5,000-deep nested YAML", {"deep.yaml": "a: " + "[" * 5000 + "]" * 5000 + "\n"},
     ["score", "--config", "{tmp}/deep.yaml"], "is nested too deeply"),
    ("binary --config", {"bin.yaml": bytes(range(256)) * 4},
     ["score", "--config", "{tmp}/bin.yaml"], "is not UTF-8 text"),
    ("--h inf", {}, ["score", "--h", "inf"], "argument --h: expected a finite number, got 'inf'"),
    ("--h nan", {}, ["score", "--h", "nan"], "argument --h: expected a finite number, got 'nan'"),
    ("--lr inf", {}, ["score", "--lr", "inf"], "argument --lr: expected a finite number"),
    ("--weight-decay inf", {}, ["score", "--weight-decay", "inf"],
     "argument --weight-decay: expected a finite number"),
    ("--actor-cpus nan", {}, ["score", "--actor-cpus", "nan"], "expected a finite number"),
    ("inf in a YAML spec", {"inf.yaml": "curvature: {h: .inf}\n"},
     ["score", "--config", "{tmp}/inf.yaml"], "curvature.h: Input should be a finite number"),
    ("nan in a YAML spec", {"nan.yaml": "train: {lr: .nan}\n"},
     ["score", "--config", "{tmp}/nan.yaml"], "train.lr: Input should be a finite number"),
    ("sweep --h with inf", {}, ["sweep", "--sweep-dir", "{tmp}/sweep", "--h", "0.01,inf"],
     "argument --h: expected a finite number"),
    ("evaluate --top-k nan", {}, ["evaluate", "{tmp}", "--top-k", "nan"], "expected a finite number"),
    ("--run-dir that is a file", {"afile": "x"}, ["score", "--run-dir", "{tmp}/afile"],
     "{tmp}/afile is a file, not a folder"),
    ("--run-dir under a file", {"afile": "x"}, ["score", "--run-dir", "{tmp}/afile/run"],
     "{tmp}/afile/run lies under {tmp}/afile, which is a file"),
    ("--run-dir with an unknown scheme", {}, ["score", "--run-dir", "nosuchfs://bucket/run"],
     "cannot write to nosuchfs://bucket/run"),
    ("run.json that is a list", {"run.json": "[1, 2]"}, ["score", "--run-dir", "{tmp}"],
     "{tmp}/run.json does not hold a run spec"),
    ("run.json without a spec", {"run.json": '{"samples": 3}'}, ["score", "--run-dir", "{tmp}"],
     "{tmp}/run.json does not hold a run spec"),
    ("run.json that is not JSON", {"run.json": "{"}, ["score", "--run-dir", "{tmp}"],
     "{tmp}/run.json does not hold a run spec"),
]


@pytest.mark.parametrize(("files", "argv", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_one_line_and_exit_2(capsys, tmp_path, files, argv, message):
    for name, content in files.items():
        _write(tmp_path / name, content)
    before = sorted(os.walk(tmp_path))
    err = _fails(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(os.walk(tmp_path)) == before, "something was written"


def _data_flags(spec: DataSpec) -> list[str]:
    flags = ["--dataset", spec.dataset, "--data-root", spec.data_root or ""]
    return flags + (["--limit", str(spec.limit)] if spec.limit else [])


@pytest.mark.parametrize(("write", "message"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_data_through_the_command_line(capsys, tmp_path, write, message):
    """Every bad-data case of tests/test_data.py, as `raycurv score` meets it."""
    (tmp_path / "data").mkdir()
    spec = write(tmp_path / "data")
    before = sorted(os.walk(tmp_path))
    err = _fails(capsys, ["score", *_data_flags(spec), "--run-dir", str(tmp_path / "run")])
    assert message in err
    assert sorted(os.walk(tmp_path)) == before, "something was written"


def test_evaluate_of_a_run_folder_whose_run_json_is_a_list(capsys, tmp_path):
    RunFolder(str(tmp_path)).write_scores(make_table(20))
    _write(tmp_path / "run.json", "[]")
    assert "run.json does not hold a run spec" in _fails(capsys, ["evaluate", str(tmp_path)])


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro): even root cannot write there."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here (needs root with CAP_SYS_ADMIN)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_run_dir(capsys, read_only_folder):
    err = _fails(capsys, ["score", "--run-dir", str(read_only_folder / "run")])
    assert f"cannot write to {read_only_folder}/run: Read-only file system" in err


def test_a_bucket_that_does_not_exist(capsys, s3_env):
    err = _fails(capsys, ["score", "--run-dir", "s3://no-such-bucket/run"])
    assert "cannot write to s3://no-such-bucket/run" in err and "bucket does not exist" in err


def test_a_bucket_without_valid_credentials(capsys, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on discard
    err = _fails(capsys, ["score", "--run-dir", "s3://raycurv/run"])
    assert "cannot write to s3://raycurv/run" in err


def test_a_writable_bucket_passes_the_check_and_keeps_nothing(s3_env):
    from raycurv import storage

    storage.check_writable_folder("s3://raycurv/probe-run")
    assert storage.list_files("s3://raycurv/probe-run") == []


@pytest.mark.parametrize("spelling", ["relative", "absolute", "file-uri", "trailing-slash"])
def test_a_run_folder_resumes_under_any_spelling(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    first = ScoreSpec(run_dir="runs/r1", data=DataSpec(limit=200))
    data = prepare_dataset(first.data, seed=first.seed)
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "run.json").write_text(json.dumps(_spec_record(first, data)))
    location = {"relative": "runs/r1", "absolute": str(tmp_path / "runs" / "r1"),
                "file-uri": f"file://{tmp_path}/runs/r1", "trailing-slash": "runs/r1/"}[spelling]
    assert check_run_dir(first.model_copy(update={"run_dir": location}), data) is True
    other = first.model_copy(update={"run_dir": location, "seed": 1})
    with pytest.raises(UsageError, match="seed 0 -> 1"):
        check_run_dir(other, data)


# --- `raycurv score --checkpoints`: every checkpoint is checked before Ray starts -------------

def _save(path: Path, value) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)


def _digits_weights(in_channels: int = 1):
    from raycurv.models import build_model

    return build_model("small_cnn", in_channels=in_channels, num_classes=10).state_dict()


def _series(folder: Path, names: list[str]) -> None:
    for name in names:
        _save(folder / name, _digits_weights())


class _Planted:
    """Unpickling this would create ``marker``: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _records_of(sample_ids: list[int]) -> dict:
    import torch

    n = len(sample_ids)
    return {"epoch": 0, "weights": _digits_weights(), "sample_ids": torch.tensor(sample_ids),
            "labels": torch.zeros(n, dtype=torch.int64), "train_loss": torch.ones(n),
            "train_margin": torch.ones(n), "train_prob_margin": torch.ones(n)}


def _folder(*names: str, odd: tuple[str, object] | None = None):
    """A writer of folder ``c`` holding digits small_cnn state dicts under ``names`` (and
    ``odd``: (name, content saved with torch.save)); returns the folder."""

    def write(tmp: Path) -> str:
        _series(tmp / "c", list(names))
        if odd is not None:
            _save(tmp / "c" / odd[0], odd[1]() if callable(odd[1]) else odd[1])
        (tmp / "c").mkdir(exist_ok=True)
        return f"{tmp}/c"

    return write


def _planted(tmp: Path) -> str:
    _save(tmp / "e0.pt", _Planted(tmp / "marker"))
    return f"{tmp}/e0.pt"


# (case, write(tmp) -> the --checkpoints value, more flags, message fragment)
CHECKPOINT_CASES = [
    ("an empty folder", _folder(), [], "no .pt or .pth files in {tmp}/c"),
    ("a folder of other files", lambda tmp: _write(tmp / "notes.txt", "x") and str(tmp), [],
     "no .pt or .pth files in {tmp}"),
    ("a folder that does not exist", lambda tmp: f"{tmp}/nowhere", [],
     "no checkpoints at {tmp}/nowhere"),
    ("a glob that matches nothing", lambda tmp: f"{tmp}/ckpt-*.pt", [],
     "no checkpoint files match {tmp}/ckpt-*.pt"),
    ("a series with a gap", _folder("epoch-0000.pt", "epoch-0002.pt"), [],
     "skip epoch(s) 1 (files numbered 0..2)"),
    ("two files of one epoch", _folder("e1.pt", "e01.pt"), [], "are both epoch 1"),
    ("numbered and unnumbered names", _folder("e1.pt", "final.pt"), [],
     "mixes file names with and without an epoch number (final.pt)"),
    ("a file that is not a checkpoint", lambda tmp: _write(tmp / "e0.pt", "not torch"), [],
     "checkpoint {tmp}/e0.pt is not a torch state dict"),
    ("a list, not a state dict", _folder(odd=("e0.pt", [1, 2])), [],
     "checkpoint {tmp}/c/e0.pt does not hold a state dict (name -> tensor)"),
    ("a planted pickle", _planted, [], "checkpoint {tmp}/e0.pt is not a torch state dict"),
    ("a state dict of another model", _folder(odd=("e0.pt", lambda: {"w": _digits_weights()["head.bias"]})),
     [], "does not match model 'small_cnn': missing features.0.weight"),
    ("a later checkpoint of other shapes", _folder("e0.pt", odd=("e1.pt", lambda: _digits_weights(3))),
     [], "checkpoint {tmp}/c/e1.pt does not match model 'small_cnn': features.0.weight is "
     "[32, 3, 3, 3], the model's [32, 1, 3, 3]"),
    ("records of other samples", _folder(odd=("epoch-0000.pt", lambda: _records_of([0, 1]))),
     ["--limit", "50"], "lacks sample(s)"),
    ("--epochs with --checkpoints", _folder("e0.pt"), ["--epochs", "3"],
     "--epochs does not apply with --checkpoints"),
    ("--weights with --checkpoints", _folder("e0.pt"), ["--weights", "{tmp}/c/e0.pt"],
     "weights (a state dict to start training from) does not apply"),
]


@pytest.mark.parametrize(("write", "flags", "message"), [c[1:] for c in CHECKPOINT_CASES],
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints(capsys, tmp_path, write, flags, message):
    checkpoints = write(tmp_path)
    before = sorted(os.walk(tmp_path))
    argv = ["score", "--checkpoints", checkpoints, "--run-dir", str(tmp_path / "run"), *flags]
    err = _fails(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(os.walk(tmp_path)) == before, "something was written"
    assert not (tmp_path / "marker").exists()
