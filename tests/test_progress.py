"""Quiet progress: a default run keeps Ray's and Ray Train's own INFO lines off the console (one
progress line per epoch and the summary remain); --verbose brings them back."""

from __future__ import annotations

import io
import logging
import os

import pytest
import ray

from raycurv import cluster, train
from raycurv.cli import build_parser
from raycurv.config import DataSpec, ScoreSpec
from raycurv.data import prepare_dataset
from raycurv.progress import Steps, counted, phase
from raycurv.run import quiet_forwarded_lines, quiet_ray_logs
from tests.conftest import DIGITS_EPOCHS, digits_log


class _Captured(Exception):
    pass


class _NoRelay:
    queue = None

    def __init__(self, render):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize(("verbose", "level"), [(False, "WARNING"), (True, "INFO")])
def test_ray_train_logs_at_info_only_when_verbose(monkeypatch, tmp_path, verbose, level):
    seen = {}

    def trainer(*args, run_config, **kwargs):
        seen["level"] = run_config.logging_config.log_level
        raise _Captured

    monkeypatch.setattr(train, "TorchTrainer", trainer)
    monkeypatch.setattr(train, "Relay", _NoRelay)
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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("columns", "rows", "bar"), [(120, 40, True), (120, 0, False), (0, 40, False)])
def test_a_terminal_of_no_width_or_no_height_gets_plain_lines(columns, rows, bar):
    """tqdm hides every bar on a terminal of no rows (none fits): plain lines there instead."""
    import fcntl
    import struct
    import termios

    from raycurv.progress import on_terminal

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    with os.fdopen(follower, "w") as stream:
        assert on_terminal(stream) is bar
        Steps("epoch", 1, stream=stream).step("done")
    written = os.read(leader, 4096).decode()
    os.close(leader)
    if bar:  # tqdm's bar, drawn in place
        assert "epoch: 100%|" in written and "1/1" in written
    else:  # one plain line (the terminal writes its newline as \r\n)
        assert written == "epoch 1/1  done\r\n"


def test_off_a_terminal_each_step_is_one_plain_line():
    out = io.StringIO()
    with Steps("epoch", 5, stream=out) as steps:
        steps.begin(2)  # a resumed run: its first epoch is the third
        steps.step("loss 1.0", done=3)
        steps.step("loss 0.5")
        steps.step()
    assert out.getvalue() == "epoch 3/5  loss 1.0\nepoch 4/5  loss 0.5\nepoch 5/5\n"


def test_on_a_terminal_one_bar_with_eta_redrawn_in_place():
    out = _Terminal()
    with Steps("epoch", 4, stream=out) as steps:
        steps.begin(1)  # a resumed run, one epoch done before
        for k in range(2, 5):
            steps.step(f"loss {k}")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 4  # one line, redrawn per step
    assert text.split("\r")[1].startswith("epoch:  25%") and "1/4" in text.split("\r")[1]
    final = text.rsplit("\r", 1)[-1]
    assert final.startswith("epoch") and "4/4" in final and "loss 4" in final
    assert "<00:00" in final  # tqdm's elapsed<remaining


def test_a_one_step_phase_is_one_line_when_done_off_a_terminal():
    out = io.StringIO()
    with phase("duplicate search", stream=out):
        pass
    assert out.getvalue() == "duplicate search: 0 s\n"
    tty = _Terminal()
    with phase("duplicate search", stream=tty):
        pass
    assert tty.getvalue() == "duplicate search ...\nduplicate search: 0 s\n"
    failed = io.StringIO()
    with pytest.raises(ValueError), phase("duplicate search", stream=failed):
        raise ValueError
    assert failed.getvalue() == ""


def test_many_pieces_are_a_bar_on_a_terminal_and_one_line_off_it():
    out = io.StringIO()
    with counted("dataset preparation (9 images)", 3, unit="part", stream=out) as done:
        for _ in range(3):
            done()
    assert out.getvalue() == "dataset preparation (9 images): 0 s\n"
    tty = _Terminal()
    with counted("dataset preparation (9 images)", 3, unit="part", stream=tty) as done:
        for _ in range(3):
            done()
    final = tty.getvalue().rsplit("\r", 1)[-1]
    assert final.startswith("dataset preparation (9 images): 100%") and "3/3" in final


NOTICE = ("[2026-12-01 20:04:39,179 E 6452 6493] core_worker.cc:2465: Actor with class name: '{}' "
          "and ID: '6ef1a3' has constructor arguments in the object store and max_restarts > 0. If "
          "the arguments in the object store go out of scope or are lost, the actor restart will fail.")


def test_only_ray_trains_known_notice_is_kept_off_the_console_unless_verbose(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", printed.append)])
    theirs, ours = NOTICE.format("PreemptionWatcher"), NOTICE.format("CurvatureActor")
    quiet_forwarded_lines(verbose=False)
    quiet_forwarded_lines(verbose=False)  # a second run in the same process
    dispatcher.emit({"lines": [theirs, ours, "epoch 1/4"], "is_err": True})
    dispatcher.emit({"lines": [theirs], "is_err": True})
    assert printed == [{"lines": [ours, "epoch 1/4"], "is_err": True}]
    quiet_forwarded_lines(verbose=True)
    dispatcher.emit({"lines": [theirs], "is_err": True})
    assert printed[-1] == {"lines": [theirs], "is_err": True}


@pytest.mark.parametrize("line", [
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars"
    " = True`.",
    "\u2714\ufe0f  Dataset train_0357KPjbWELYai1OdpULTj_0 execution finished in 4.30 seconds"])
def test_ray_datas_known_notices_are_kept_off_the_console_unless_verbose(monkeypatch, line):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", printed.append)])
    quiet_forwarded_lines(verbose=False)
    dispatcher.emit({"lines": [line, "epoch 1/4"], "is_err": True})
    assert printed == [{"lines": ["epoch 1/4"], "is_err": True}]
    record = logging.LogRecord("ray.data", logging.WARNING, __file__, 1, line, None, None)
    handler = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger("ray.data"), "handlers", [handler])
    quiet_ray_logs(verbose=False)
    assert not handler.filter(record)
    quiet_ray_logs(verbose=True)
    assert handler.filter(record)


def test_a_local_clusters_processes_are_told_its_address(monkeypatch):
    """Ray Train's PlacementGroupCleaner finds its cluster by RAY_ADDRESS; without it, another
    cluster on the machine makes it print a traceback."""
    seen = {}

    def init(**kwargs):
        seen.update(kwargs, port=os.environ.get(cluster.GCS_PORT_ENV))

    for step in ("loopback_node", "record_cluster_processes"):
        monkeypatch.setattr(cluster, step, lambda: None)
    monkeypatch.setattr(cluster, "start_watchdog", lambda cleanup: None)
    monkeypatch.setattr(ray, "init", init)
    cluster.start_local_ray(num_cpus=1)
    assert seen["runtime_env"]["env_vars"]["RAY_ADDRESS"] == f"127.0.0.1:{seen['port']}"
    assert cluster.GCS_PORT_ENV not in os.environ  # the next cluster started chooses its own


def test_a_default_run_piped_to_a_file_prints_a_line_per_epoch_and_the_summary(digits_run):
    """The session's reference run is `raycurv score --noise 0.1` on 600 digits for 4 epochs, as a
    user runs it (a process of its own, joined to the cluster), stdout and stderr piped to a file."""
    text = digits_log(digits_run)
    lines = text.splitlines()
    for noise in ("core_worker.cc", "UserWarning", "INFO", "(RayTrainWorker", "\r", "\x1b["):
        assert noise not in text, [line for line in lines if noise in line]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == [f"{k}/{DIGITS_EPOCHS}" for k in range(1, DIGITS_EPOCHS + 1)]
    assert all("train loss" in line and "scoring lag" in line for line in epochs)
    wrote = lines.index(next(line for line in lines if line.startswith("wrote ")))
    assert lines[wrote].startswith(f"wrote {digits_run / 'scores.parquet'}: 600 samples, {DIGITS_EPOCHS} epochs")
    summary = lines[wrote:]
    assert summary[1].startswith("train accuracy") and summary[2].startswith("most memorized")
    assert len(summary[3:13]) == 10 and all(line.split()[0].isdigit() for line in summary[3:13])
    assert any(line.startswith("finding corrupted labels") for line in summary)
    assert summary[-1].split()[0] == "learned_epoch"  # the detection table's last row
