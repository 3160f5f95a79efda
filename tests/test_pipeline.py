"""The distributed pipeline: DDP workers, a sharded actor pool, and runs that survive a killed
training worker, a killed curvature actor and a stopped driver with the same table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycurv.cli import build_parser, main
from raycurv.commands.score import build_spec
from raycurv.run import score_run
from tests.test_score_run import assert_same_scores

pytestmark = pytest.mark.slow


def _spec(flags: list[str], run_dir: Path):
    return build_spec(build_parser().parse_args(["score", *flags, "--run-dir", str(run_dir)]))


def _table(run_dir: Path):
    return pq.read_table(run_dir / "scores.parquet")


def test_two_workers_two_actors_score_every_sample_every_epoch(ray_cluster, digits_flags, tmp_path):
    run_dir = tmp_path / "ddp"  # given as a URI: the run folder goes through pyarrow's filesystems
    assert main(["score", *digits_flags, "--workers", "2", "--actors", "2",
                 "--run-dir", run_dir.as_uri()]) == 0
    df = _table(run_dir).to_pandas()
    epochs = int(digits_flags[digits_flags.index("--epochs") + 1])
    assert len(df) == 600 and (df["epochs_scored"] == epochs).all()
    assert np.isfinite(df["csl"]).all() and (df["csl"] > 0).all()
    # every sample's margins came from the worker that trained it (a missed one would be 0)
    assert df["aum"].notna().all() and (df["aum"] != 0).all() and (df["forgetting_events"] >= 0).all()
    per_epoch = pq.read_table(run_dir / "curvature_by_epoch.parquet").to_pandas()
    assert per_epoch.groupby("sample_id").size().eq(epochs).all()
    assert not (run_dir / "epochs").exists() or not os.listdir(run_dir / "epochs")


def test_killed_training_worker_resumes_from_its_checkpoint(digits_run, digits_flags, tmp_path):
    run_dir = tmp_path / "worker-killed"
    marker = tmp_path / "killed-once"
    score_run(_spec(digits_flags, run_dir), extra_config={"fault_marker": str(marker), "fault_epoch": 2})
    assert marker.exists(), "the fault hook did not fire"
    assert_same_scores(_table(digits_run), _table(run_dir))


def _alive_actor_pids(address: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=address,
                         filters=[("class_name", "=", "CurvatureActor"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_killed_curvature_actor_restarts_without_losing_or_double_counting(digits_run, digits_flags, ray_cluster,
                                                                            tmp_path):
    run_dir = tmp_path / "actor-killed"
    errors: list[BaseException] = []

    def drive():
        try:
            score_run(_spec([*digits_flags, "--actors", "2"], run_dir))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "shards" / "shard-0001").glob("epoch-*.npz")):
        time.sleep(0.2)
    pids = _alive_actor_pids(ray_cluster)
    assert pids, "no curvature actor found to kill"
    os.kill(pids[-1], signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive() and not errors, errors
    assert_same_scores(_table(digits_run), _table(run_dir))


def test_stopped_driver_resumes_when_the_command_runs_again(digits_run, digits_flags, ray_cluster, tmp_path,
                                                          monkeypatch):
    """Started with an absolute --run-dir, resumed with a relative one: the same run."""
    run_dir = tmp_path / "driver-stopped"
    argv = [sys.executable, "-m", "raycurv.cli", "score", *digits_flags, "--run-dir", str(run_dir),
            "--address", ray_cluster]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((run_dir / "train").glob("checkpoint_*"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "scores.parquet").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["score", *digits_flags, "--run-dir", "driver-stopped"]) == 0
    assert_same_scores(_table(digits_run), _table(run_dir))


def _scrape_ray_metrics() -> str:
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_run_metrics_are_exported_through_ray(digits_run):
    """Ray's metrics agent exports what the workers and actors record (every ~10 s)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"ray_raycurv_train_epoch", "ray_raycurv_train_loss", "ray_raycurv_scoring_lag_epochs",
              "ray_raycurv_scored_samples", "ray_raycurv_scoring_samples_per_second"}
    deadline, samples = time.time() + 60, {}
    while time.time() < deadline and not wanted <= set(samples):
        samples = {f.name: f.samples for f in text_string_to_metric_families(_scrape_ray_metrics())
                   if f.name.startswith("ray_raycurv")}
        time.sleep(2)
    assert wanted <= set(samples), sorted(samples)
    # series of finished workers expire after a while; the latest runs (4 epochs each) remain
    assert 4.0 in [s.value for s in samples["ray_raycurv_train_epoch"]]
    assert any(s.labels.get("shard") == "0" for s in samples["ray_raycurv_scoring_samples_per_second"])


def test_an_instance_model_reaches_restarted_actors_through_one_object(ray_cluster, tmp_path, capfd):
    """A model instance (here 1.5 MB pickled) goes into the object store once, referred to by each
    shard's data, not as an actor constructor argument: Ray cannot keep a restartable actor's
    constructor arguments alive (ray-project/ray#53727, and its warning on stderr). An actor
    killed and restarted builds the model again from it."""
    import ray

    from raycurv.actors import start_pool
    from raycurv.config import CurvatureSpec, DataSpec, ScoreSpec, TrainSpec
    from raycurv.data import prepare_dataset
    from raycurv.models import SmallCNN, pack_instance

    model = pack_instance(SmallCNN(1, 10, width=64))
    assert len(model.pickled) > 1_000_000
    spec = ScoreSpec(seed=0, run_dir=str(tmp_path / "pool"),
                     data=DataSpec(dataset="digits", limit=200),
                     train=TrainSpec(epochs=2, model=model),
                     curvature=CurvatureSpec(actors=2, batch_size=100))
    pool = start_pool(spec, prepare_dataset(spec.data, seed=0))
    try:
        first = [actor.pid.remote() for actor in pool.actors]
        assert ray.get([actor.scored_epochs.remote([shard])  # each builds the model from the ref
                        for actor, shard in zip(pool.actors, pool.shard_refs, strict=True)]) == [[], []]
        os.kill(ray.get(first[0]), signal.SIGKILL)
        ray.get(pool.submit(0, SmallCNN(1, 10, width=64).state_dict(),
                            {"train_loss": np.ones(200, np.float32)}), timeout=120)
        assert ray.get(pool.actors[0].scored_epochs.remote([pool.shard_refs[0]])) == [0]
        assert ray.get(pool.actors[0].pid.remote()) != ray.get(first[0])
    finally:
        pool.shutdown()
    assert "constructor arguments in the object store" not in capfd.readouterr().err
