"""One local Ray cluster for the whole test session: starting Ray costs seconds, so it starts once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one; yields its address."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: training workers, curvature actors and Serve
        # replicas ask for fractions of these, so a test can run a few side by side.
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )
    yield ray.get_runtime_context().gcs_address
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


DIGITS_EPOCHS = 4
DIGITS_FLAGS = ["--limit", "600", "--noise", "0.1", "--epochs", str(DIGITS_EPOCHS), "--seed", "5",
                "--score-batch-size", "128"]


@pytest.fixture(scope="session")
def digits_flags():
    """Flags of the reference scoring run: 600 digits, 10 % noise, 4 epochs (about 30 s)."""
    return list(DIGITS_FLAGS)


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory):
    """One uninterrupted `raycurv score` run (1 worker, 1 actor) that other runs compare with."""
    from raycurv.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["score", *DIGITS_FLAGS, "--run-dir", str(run_dir)]) == 0
    return run_dir
