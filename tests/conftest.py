"""One local Ray cluster for the whole test session: starting Ray costs seconds, so it starts once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster shared by every test that needs one; yields its address. Its processes
    reach the S3 test server like any S3 store: through the AWS variables, set before it starts."""
    import ray

    os.environ.update(s3_server)
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


def digits_log(run_dir) -> str:
    """What `raycurv score` printed in ``digits_run`` (stdout and stderr)."""
    return (run_dir.parent / "digits.log").read_text()


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory):
    """One uninterrupted `raycurv score` run (1 worker, 1 actor) that other runs compare with: the
    command as a user runs it, joined to the session's cluster, with its stdout and stderr piped
    to one file (``digits_log``)."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    with open(run_dir.parent / "digits.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "raycurv.cli", "score", *DIGITS_FLAGS,
                               "--run-dir", str(run_dir), "--address", ray_cluster],
                              stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, digits_log(run_dir)[-3000:]
    return run_dir


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint (moto's standalone server) on a loopback port, reached like
    any S3 store through AWS_ENDPOINT_URL and the key variables. Yields those variables; use
    ``s3_env`` to set them for a test. The bucket ``raycurv`` exists."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the S3 test server did not start") from None
                time.sleep(0.2)
        from pyarrow import fs

        fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                        secret_key="testing", region="us-east-1",
                        allow_bucket_creation=True).create_dir("raycurv")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 test server's variables set in os.environ for one test."""
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return s3_server
