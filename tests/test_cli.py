"""Bad input to `raycurv score` / `evaluate`: one clear line on stderr, exit code 2, and no run
folder left behind. None of these start Ray: everything is checked before the cluster is joined."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycurv.cli import main


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def bad_parquet(tmp_path):
    def write(labels, pixel=0.5):
        images = np.full((len(labels), 4, 4), pixel, dtype=np.float32)
        path = tmp_path / "data.parquet"
        pq.write_table(pa.table({"image": [a.tolist() for a in images], "label": labels}), path)
        return str(path)

    return write


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "svhn"], "unknown dataset 'svhn'; valid: digits, fashion-mnist, mnist, cifar10"),
        (["--model", "vgg"], "unknown model 'vgg'; valid: small_cnn, resnet18_cifar, resnet18"),
        (["--noise", "1.0"], "data.noise: Input should be less than 1"),
        (["--noise", "-0.1"], "data.noise: Input should be greater than or equal to 0"),
        (["--h", "0"], "curvature.h: Input should be greater than 0"),
        (["--probes", "0"], "curvature.probes: Input should be greater than or equal to 1"),
        (["--workers", "0"], "train.workers: Input should be greater than or equal to 1"),
        (["--variant", "hutch"], "curvature.variant: Input should be 'norm' or 'trace'"),
        (["--score-from", "12"], "--score-from 12 leaves no epoch to score: epochs are 0..11"),
        (["--score-every", "0"], "curvature.every: Input should be greater than or equal to 1"),
        (["--method", "exact"], "curvature.method: Input should be 'fd' or 'hvp'"),
        (["--precision", "bf16"], "precision bf16 needs method hvp"),
        (["--precision", "fp8", "--method", "hvp"], "curvature.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--actors", "2000"], "--actors 2000 exceeds the 8 scoring batches"),
        (["--dataset", "mnist", "--data-root", "/nonexistent"], "no train-images-idx3-ubyte[.gz] under /nonexistent"),
    ],
)
def test_bad_flags(capsys, tmp_path, flags, message):
    run_dir = tmp_path / "run"
    err = _fails(capsys, ["score", "--run-dir", str(run_dir), *flags])
    assert message in err
    assert not run_dir.exists()


def test_bad_data(capsys, tmp_path, bad_parquet):
    run_dir = tmp_path / "run"
    err = _fails(capsys, ["score", "--dataset", "parquet", "--data-root", bad_parquet([0, 1, 7, -2]),
                          "--run-dir", str(run_dir)])
    assert "labels out of range: found -2..7" in err
    err = _fails(capsys, ["score", "--dataset", "parquet", "--data-root", bad_parquet([0, 1], np.inf),
                          "--run-dir", str(run_dir)])
    assert "non-finite pixel values" in err
    assert not run_dir.exists()


def test_config_file_errors(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  dataset: digits\n  nosie: 0.1\n")
    assert "data.nosie: Extra inputs are not permitted" in _fails(capsys, ["score", "--config", str(config)])
    config.write_text("data: [1, 2\n")
    assert "is not valid YAML" in _fails(capsys, ["score", "--config", str(config)])
    assert "config file not found" in _fails(capsys, ["score", "--config", str(tmp_path / "no.yaml")])


def test_config_file_and_flags_merge(tmp_path):
    from raycurv.cli import build_parser
    from raycurv.commands.score import build_spec

    config = tmp_path / "run.yaml"
    config.write_text("seed: 3\ndata: {noise: 0.2, limit: 100}\ncurvature: {h: 0.01}\n")
    args = build_parser().parse_args(["score", "--config", str(config), "--noise", "0.05", "--probes", "4"])
    spec = build_spec(args)
    assert (spec.seed, spec.data.noise, spec.data.limit) == (3, 0.05, 100)
    assert (spec.curvature.h, spec.curvature.probes) == (0.01, 4)


def test_evaluate_refuses_what_is_not_a_score_table(capsys, tmp_path):
    assert "no score table at" in _fails(capsys, ["evaluate", str(tmp_path)])
    pq.write_table(pa.table({"sample_id": [0, 1]}), tmp_path / "scores.parquet")
    assert "missing columns: label" in _fails(capsys, ["evaluate", str(tmp_path)])
    (tmp_path / "scores.parquet").write_bytes(b"PAR1 truncated")
    assert "cannot read" in _fails(capsys, ["evaluate", str(tmp_path)])


def test_a_run_folder_from_before_new_settings_still_resumes(tmp_path):
    """run.json written before a setting existed: the missing setting counts as its default."""
    import json

    from raycurv.config import DataSpec, ScoreSpec
    from raycurv.data import prepare_dataset
    from raycurv.errors import UsageError
    from raycurv.run import _spec_record, check_run_dir

    spec = ScoreSpec(run_dir=str(tmp_path), data=DataSpec(limit=300))
    data = prepare_dataset(spec.data, seed=spec.seed)
    record = _spec_record(spec, data)
    for key in ("every", "from_epoch", "method", "precision", "optimize", "compile"):
        del record["spec"]["curvature"][key]
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert check_run_dir(spec, data) is True
    record["spec"]["curvature"]["probes"] = 10  # a real change is still refused, and named
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(UsageError, match=r"curvature.probes 10 -> 2"):
        check_run_dir(spec, data)
