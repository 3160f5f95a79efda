"""The Feldman-Zhang reference: on a tiny problem whose answer is known, a sample with a unique
wrong label is memorized and a typical one is not; n_in + n_out = M for every sample; the same
seed gives the same table whatever the number of models per task; models trained together
train exactly as they would alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycurv.cli import main
from raycurv.reference import (
    ReferenceSpec,
    estimate,
    mem_from_counts,
    model_subsets,
    read_reference,
    train_models,
)

MODELS = 40


def two_blobs(n: int = 40, side: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, 1, side, side) images in [0, 1] of two well-separated patterns, labels 0/1, and the
    position of the one sample that carries the other pattern's label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    patterns = np.stack([np.tri(side), np.tri(side).T])  # lower vs upper triangle
    images = 0.6 * patterns[labels] + rng.uniform(0, 0.4, (n, side, side))
    wrong = 3  # a class-1 image labeled 0
    labels = labels.copy()
    labels[wrong] = 0
    return images[:, None].astype(np.float32), labels, wrong


@pytest.fixture
def blobs_parquet(tmp_path):
    images, labels, wrong = two_blobs()
    path = tmp_path / "blobs.parquet"
    pq.write_table(pa.table({"image": [img[0].tolist() for img in images], "label": labels}), path)
    return str(path), labels, wrong


def _spec(root: str, out: str, **kw) -> ReferenceSpec:
    return ReferenceSpec.model_validate({
        "data": {"dataset": "parquet", "data_root": root}, "out": out, "models": MODELS,
        "keep": 0.5, "train": {"epochs": 30, "batch_size": 8, "lr": 0.1, "width": 32}, **kw})


def test_known_answer_on_ray(ray_cluster, blobs_parquet, tmp_path):
    root, labels, wrong = blobs_parquet
    result = estimate(_spec(root, str(tmp_path / "ref.parquet"), models_per_task=20),
                      progress=lambda *_: None)
    table, meta = read_reference(str(tmp_path / "ref.parquet"))
    df = table.to_pandas()
    assert (df["n_in"] + df["n_out"] == MODELS).all()
    assert df["n_in"].between(1, MODELS - 1).all()  # keep 0.5 of 40 samples, 40 models
    assert df.loc[wrong, "mem"] > 0.8  # right only when trained on: memorized
    typical = df.drop(index=wrong)
    assert typical["mem"].abs().max() < 0.2 and typical["p_out"].min() > 0.8
    assert (df["label"] == labels).all()
    assert meta["models"] == MODELS and meta["spec"]["keep"] == 0.5 and meta["tasks"] == 2
    assert result.summary["mean_acc_in"] == 1.0


def test_reproducible_by_seed_whatever_the_task_layout(ray_cluster, blobs_parquet, tmp_path):
    root, _, _ = blobs_parquet
    quick = {"models": 12, "train": {"epochs": 5, "batch_size": 8, "width": 16}}
    a = estimate(_spec(root, str(tmp_path / "a.parquet"), models_per_task=12, **quick))
    b = estimate(_spec(root, str(tmp_path / "b.parquet"), models_per_task=5, **quick))
    c = estimate(_spec(root, str(tmp_path / "c.parquet"), seed=1, **quick))
    for column in ("n_in", "n_out", "mem", "p_in", "p_out"):
        assert a.table.column(column).equals(b.table.column(column)), column
    assert not a.table.column("n_in").equals(c.table.column("n_in"))


def test_models_trained_together_train_as_alone():
    images, labels, _ = two_blobs(n=24)
    spec = ReferenceSpec.model_validate({"models": 3, "keep": 0.5,
                                         "train": {"epochs": 5, "batch_size": 4, "width": 16}})
    together = train_models(images, labels, np.array([0, 1, 2]), spec, 2)
    alone = train_models(images, labels, np.array([1]), spec, 2)
    assert together["acc_in"][1] == alone["acc_in"][0]
    assert together["acc_out"][1] == alone["acc_out"][0]
    subsets = model_subsets(24, np.array([0, 1, 2]), keep=0.5, seed=0)
    assert (subsets.sum(1) == 12).all()
    np.testing.assert_array_equal(model_subsets(24, np.array([1]), keep=0.5, seed=0)[0], subsets[1])


def test_cnn_reference_model_learns():
    images, labels, wrong = two_blobs(n=40, side=8)
    spec = ReferenceSpec.model_validate({"models": 8, "keep": 0.5, "train": {
        "model": "cnn", "epochs": 20, "batch_size": 8, "lr": 0.1, "width": 64}})
    out = train_models(images, labels, np.arange(8), spec, 2)
    mem, p_in, p_out = mem_from_counts(out["n_in"], out["correct_in"], out["correct_out"], 8)
    assert out["acc_out"].mean() > 0.9  # held-out typical samples: right
    assert p_out[wrong] == 0.0 and mem[wrong] >= 0  # held out, the wrong label is never predicted


def test_mem_from_counts_undefined_sides():
    mem, p_in, p_out = mem_from_counts(np.array([0, 4, 2]), np.array([0, 4, 1]), np.array([3, 0, 2]), 4)
    assert np.isnan(mem[0]) and np.isnan(mem[1])
    assert mem[2] == pytest.approx(0.5 - 1.0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--keep", "1.5"], "keep: Input should be less than 1"),
    (["--models", "1"], "models: Input should be greater than or equal to 2"),
    (["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
    (["--from-run", "/nonexistent/run"], "no run.json in /nonexistent/run"),
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--limit", "10", "--keep", "0.01"], "leaves 0 to train on"),
    (["--out", "/tmp"], "--out must name a file, got the folder /tmp"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, flags, message):
    out = tmp_path / "ref.parquet"
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["reference", "--out", str(out), *flags]))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_read_reference_rejects_other_files(tmp_path):
    from raycurv.errors import UsageError

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"sample_id": [1]}), path)
    with pytest.raises(UsageError, match="not a reference table"):
        read_reference(str(path))
    with pytest.raises(UsageError, match="no reference table"):
        read_reference(str(tmp_path / "missing.parquet"))
