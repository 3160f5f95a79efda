"""A scoring run, end to end: validate -> curvature pool (raycurv.actors) -> TorchTrainer
(raycurv.train) -> score tables (raycurv.results) in the run folder (raycurv.runfolder). A run of
saved checkpoints (``train.checkpoints``, raycurv.checkpoints) hands them to the pool instead of
training.

Everything the user can get wrong is checked before Ray starts and before the run folder is
touched, so bad input never leaves a partial folder behind.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

import raycurv
from raycurv import storage
from raycurv.actors import merge_summaries, start_pool
from raycurv.checkpoints import (
    Series,
    check_series,
    find_checkpoints,
    score_series,
    series_metadata,
)
from raycurv.cluster import check_resources, ensure_ray
from raycurv.config import ScoreSpec
from raycurv.data import Prepared, materialize, plane, prepare_dataset
from raycurv.data.sharding import actor_shards
from raycurv.detection import evaluate_table
from raycurv.errors import UsageError
from raycurv.models import check_model, resolve_model
from raycurv.results import write_results
from raycurv.runfolder import RUN_FILE, RunFolder
from raycurv.train import fit


@dataclass
class RunResult:
    run_dir: str
    table: pa.Table
    metrics: dict[str, Any]  # detection metrics (raycurv.evaluate)
    train: dict[str, Any]  # last epoch's training metrics
    seconds: float
    tables: dict[str, pa.Table]  # every estimator's table by name, the primary (``table``) first
    epochs: int = 0  # epochs trained, or checkpoints scored
    training_records: bool = True  # False: checkpoints without records (csl 0, co-scores null)


def _spec_record(spec: ScoreSpec, data: Prepared) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "dataset_fingerprint": data.fingerprint,
            "samples": len(data), "raycurv_version": raycurv.__version__}


# Settings that change where or how fast a run goes, not its results: a resumed run may differ in them.
# run_dir: the record is read from the folder itself, so how the folder is spelled (relative,
# absolute, file://) is not a setting.
_PLACEMENT = {"run_dir", "data.max_classes", "train.cpus_per_worker", "train.gpus_per_worker", "train.max_failures",
              "curvature.actor_cpus", "curvature.actor_gpus", "curvature.max_lag", "name",
              "curvature.optimize", "curvature.compile",  # speed and rounding only
              "train.keep_weights"}


def _changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of result-changing settings that differ, as 'name old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{name}.")
        elif a != b and name not in _PLACEMENT:
            out.append(f"{name} {a} -> {b}")
    return out


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved spec with the settings added since it was written filled in with their defaults
    (a setting that did not exist then had its default's effect); as saved if it no longer parses."""
    try:
        return ScoreSpec.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def check_run_dir(spec: ScoreSpec, data: Prepared) -> bool:
    """True if ``run_dir`` holds this same run (resume it); False if it is new or empty.
    A folder holding another run (other data or settings) is refused, never overwritten."""
    folder = RunFolder(spec.run_dir)
    record = folder.read_record()
    if record is None:
        if folder.has_scores():
            raise UsageError(f"{spec.run_dir} holds a score table but no {RUN_FILE}; "
                             "choose another --run-dir")
        return False
    if record.get("dataset_fingerprint") != data.fingerprint:
        raise UsageError(f"{spec.run_dir} holds a run on other data ({record['spec']['data'].get('dataset')}, "
                         f"fingerprint {record.get('dataset_fingerprint')}); choose another --run-dir")
    changed = _changed_settings(_with_defaults(record["spec"]), _spec_record(spec, data)["spec"])
    if changed:
        raise UsageError(f"{spec.run_dir} holds a run with other settings ({', '.join(changed)}); "
                         "choose another --run-dir")
    return True


def validate_spec(spec: ScoreSpec) -> Prepared:
    """All checks that need no cluster; returns the prepared dataset."""
    storage.check_writable_folder(spec.run_dir)
    try:
        resolve_model(spec.train.model)  # an unknown name or a factory that does not import
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data = prepare_dataset(spec.data, seed=spec.seed)
    min_side = min(data.input_shape[1:])
    if spec.train.model == "small_cnn" and min_side < 4:
        raise UsageError(f"small_cnn needs images of at least 4x4, got {data.input_shape[1:]}")
    try:  # built once here, so a model or weights that do not fit fail before Ray starts
        check_model(spec.train.model, input_shape=tuple(data.input_shape),
                    num_classes=data.num_classes, weights=spec.train.weights)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    actor_shards(len(data), spec.curvature.actors, spec.curvature.batch_size)
    if spec.curvature.from_epoch >= spec.train.epochs:
        raise UsageError(f"--score-from {spec.curvature.from_epoch} leaves no epoch to score: "
                         f"epochs are 0..{spec.train.epochs - 1}")
    return data


def with_checkpoint_epochs(spec: ScoreSpec) -> tuple[ScoreSpec, list[str] | None]:
    """A spec scoring checkpoints (``train.checkpoints``) has one epoch per checkpoint file:
    (the spec with that many epochs, the files in epoch order); else (``spec``, None).
    Raises UsageError when the series is empty, has gaps or names other files."""
    if spec.train.checkpoints is None:
        return spec, None
    locations = find_checkpoints(spec.train.checkpoints)
    train = spec.train.model_copy(update={"epochs": len(locations)})
    return spec.model_copy(update={"train": train}), locations


def validate_series(spec: ScoreSpec, data: Prepared, locations: list[str]) -> Series:
    """Every checkpoint read once and checked against the model and the dataset (before Ray)."""
    return check_series(locations, pattern=spec.train.checkpoints, model=spec.train.model,
                        input_shape=tuple(data.input_shape), num_classes=data.num_classes,
                        sample_ids=data.sample_ids, labels=data.labels)


def _without_score(metrics: dict[str, Any], score: str) -> dict[str, Any]:
    """Detection metrics without ``score``'s figures (csl of checkpoints without records)."""
    return {**metrics, "detection": {target: {name: figures for name, figures in by_score.items()
                                              if name != score}
                                     for target, by_score in metrics["detection"].items()}}


class _WarningsOnly(logging.Filter):
    """Drops records below WARNING, and Ray's known notices (on the console handlers of Ray's
    driver-side loggers: ray.init resets the logger's own level, not its handlers' filters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not _known_notice(record.getMessage())


_WARNINGS_ONLY = _WarningsOnly()
# Ray's token notice at every start (the README documents token authentication): errors only.
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_logs(*, verbose: bool) -> None:
    """Console output of a run: unless ``verbose``, Ray's driver-side INFO lines ("Started a local
    Ray instance ...") are dropped; worker lines forwarded to the driver carry no color codes when
    stdout is not a terminal (a log piped to a file stays plain text). Ray Train's own lines:
    raycurv.train.fit."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for handler in logging.getLogger("ray").handlers:
        (handler.removeFilter if verbose else handler.addFilter)(_WARNINGS_ONLY)
    logging.getLogger(_TOKEN_LOGGER).setLevel(logging.NOTSET if verbose else logging.ERROR)
    quiet_ray_data(verbose=verbose)


def quiet_ray_data(*, verbose: bool) -> None:
    """Unless ``verbose``, Ray Data's own console output is off: its progress bars, its "Starting
    execution of Dataset ..." lines (a dataset carries the DataContext it was created with, so the
    processes that run it, such as Ray Train's SplitCoordinator, follow these settings) and its
    driver-side INFO lines on the console (its session log file keeps them)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; not the session log file
            (handler.removeFilter if verbose else handler.addFilter)(_WARNINGS_ONLY)


# Lines of Ray's own processes that say nothing about the run, kept off the console unless
# verbose. Ray Train's controller starts its PreemptionWatcher actor with a constructor argument in
# the object store, and Ray logs an ERROR about restarting it (ray-project/ray#53727); Ray Data
# warns once per process that its progress bars are off (quiet_ray_data turns them off) and its
# SplitCoordinator (Ray Train's split of the prepared dataset) logs each epoch's execution time.
_KNOWN_NOTICES = (re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' "
                             r"and ID: '\w+' has constructor arguments in the object store"),
                  re.compile(r"Progress bars disabled\. To enable, set "
                             r"`ray\.data\.DataContext\.get_current\(\)\.enable_progress_bars"),
                  re.compile(r"Dataset train_\w+ execution finished in [\d.]+ seconds$"))
_PRINTER = "ray_print_logs"  # the handler that prints forwarded worker lines (ray._private.worker)


def _known_notice(line: str) -> bool:
    return any(notice.search(line) for notice in _KNOWN_NOTICES)


class _WithoutKnownNotices:
    """Prints the forwarded worker lines ``printer`` would print, less the known notices."""

    def __init__(self, printer):
        self.printer = printer

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [line for line in data["lines"] if not _known_notice(line)]
        if lines:
            self.printer({**data, "lines": lines})


def quiet_forwarded_lines(*, verbose: bool) -> None:
    """After ray.init: unless ``verbose``, the known notices of Ray's own actors (_KNOWN_NOTICES)
    are dropped from the worker lines Ray forwards to this process's console."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def swapped(name: str, handler):
        if name != _PRINTER:
            return handler
        printer = getattr(handler, "printer", handler)
        return printer if verbose else _WithoutKnownNotices(printer)

    dispatcher.handlers = [(name, swapped(name, handler)) for name, handler in dispatcher.handlers]


def score_run(spec: ScoreSpec, *, address: str | None = None,
              extra_config: dict[str, Any] | None = None, verbose: bool = False) -> RunResult:
    """Train and score (or, with ``train.checkpoints``, score the saved checkpoints without
    training); write the run folder; return the table and its detection metrics.
    Unless ``verbose``, Ray's and Ray Train's INFO lines stay off the console (quiet_ray_logs,
    quiet_forwarded_lines)."""
    started = time.perf_counter()
    quiet_ray_logs(verbose=verbose)
    spec, locations = with_checkpoint_epochs(spec)
    data = validate_spec(spec)
    series = None if locations is None else validate_series(spec, data, locations)
    resuming = check_run_dir(spec, data)
    t, c = spec.train, spec.curvature
    cpus = c.actors * c.actor_cpus
    if series is None:
        cpus += t.workers * t.cpus_per_worker
        cpus += plane.STREAM_CPUS if data.images is None else 0.0  # Ray Data's read tasks
    ensure_ray(address, cpus_needed=cpus)
    quiet_forwarded_lines(verbose=verbose)
    gpus = c.actors * c.actor_gpus + (t.workers * t.gpus_per_worker if series is None else 0.0)
    check_resources(cpus=cpus, gpus=gpus)
    folder = RunFolder(spec.run_dir)
    if not resuming:
        folder.write_record(_spec_record(spec, data) | ({} if series is None else {
            "checkpoint_files": list(series.locations),
            "training_records": series.training_records}))
    data = materialize(data, folder.data, seed=spec.seed)  # data-plane sources: written once
    pool = start_pool(spec, data)
    try:
        if series is None:
            train = dict(fit(spec, data, pool, extra_config=extra_config, verbose=verbose).metrics or {})
        else:
            score_series(pool, series, spec=spec, data=data)
            train = {}
        merged = merge_summaries(pool.summaries(), data)
    finally:
        pool.shutdown()
    tables = write_results(spec, data, merged,
                           extra_metadata=None if series is None else series_metadata(series))
    table = next(iter(tables.values()))
    records = series is None or series.training_records
    metrics = evaluate_table(table) if records else _without_score(evaluate_table(table), "csl")
    return RunResult(run_dir=spec.run_dir, table=table, metrics=metrics, train=train,
                     seconds=time.perf_counter() - started, tables=tables, epochs=t.epochs,
                     training_records=records)
