"""Sweeps on Ray Tune: one training per noise rate, a row per (trial, estimator), metrics equal to
`raycurv evaluate` on the per-trial tables, finished trials not redone, bad sweep files refused."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raycurv.cli import main

SWEEP = ["--noise", "0.1,0.2", "--h", "0.01,0.03", "--epochs", "2", "--limit", "300"]


@pytest.fixture(scope="module")
def sweep_dir(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", *SWEEP, "--sweep-dir", str(folder)]) == 0
    return folder


@pytest.mark.slow
def test_results_have_a_row_per_trial_and_estimator(sweep_dir):
    df = pq.read_table(sweep_dir / "sweep.parquet").to_pandas()
    assert len(df) == 4
    assert sorted(zip(df["noise"], df["h"], strict=True)) == [(0.1, 0.01), (0.1, 0.03), (0.2, 0.01), (0.2, 0.03)]
    assert (df["probes"] == 2).all() and (df["variant"] == "norm").all()
    assert df["curvature_auroc"].between(0, 1).all() and df["csl_auroc"].between(0, 1).all()
    assert (sweep_dir / "sweep.csv").read_text().count("\n") == 5
    assert (sweep_dir / "auroc_vs_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["best"]["curvature_auroc"] == df["curvature_auroc"].max()


@pytest.mark.slow
def test_training_happens_once_per_noise_rate(sweep_dir):
    trials = sorted(p for p in (sweep_dir / "trials").iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["noise=0.1", "noise=0.2"]
    for trial in trials:
        assert (trial / "train").is_dir()  # one TorchTrainer run per trial ...
        assert (trial / "scores.parquet").is_file()  # ... scored by the primary estimator (h=0.01)
        assert (trial / "estimators" / "norm-h0.03-n2" / "scores.parquet").is_file()  # and h=0.03


@pytest.mark.slow
def test_auroc_equals_raycurv_evaluate_on_the_trial_tables(sweep_dir, capsys):
    df = pq.read_table(sweep_dir / "sweep.parquet").to_pandas()
    for row in df.itertuples():
        capsys.readouterr()
        assert main(["evaluate", row.table, "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        found = metrics["detection"]["corrupted"]
        assert found["curvature"]["auroc"] == row.curvature_auroc
        assert found["csl"]["average_precision"] == row.csl_average_precision
        assert found["final_loss"]["precision_at_k"] == row.final_loss_precision_at_k


@pytest.mark.slow
def test_a_sweep_run_again_does_not_redo_finished_trials(sweep_dir):
    checkpoints = sorted(str(p) for p in sweep_dir.glob("trials/*/train/checkpoint_*"))
    rows = (sweep_dir / "trials" / "noise=0.1" / "rows.json").read_text()
    assert main(["sweep", *SWEEP, "--sweep-dir", str(sweep_dir)]) == 0
    assert sorted(str(p) for p in sweep_dir.glob("trials/*/train/checkpoint_*")) == checkpoints
    assert (sweep_dir / "trials" / "noise=0.1" / "rows.json").read_text() == rows


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("grid: {noise: [0.1], temperature: [1, 2]}", "unknown sweep axis 'temperature'; valid: h, probes"),
        ("grid: {}", "the sweep grid is empty"),
        ("grid: {noise: []}", "sweep axis 'noise' has no values"),
        ("grid: {noise: [0.1], h: [0.01, 0]}", "sweep axis 'h', value 0: Input should be greater than 0"),
        ("grid: {noise: [1.5]}", "trial noise=1.5: data.noise: Input should be less than 1"),
        ("grid: {noise: [0.1]}\nsearch: bayes", "search: Input should be 'grid' or 'random'"),
    ],
)
def test_invalid_sweep_files_are_one_line_and_exit_2(tmp_path, capsys, config, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(config)
    assert main(["sweep", "--config", str(path), "--sweep-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
