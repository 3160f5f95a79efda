"""Sweeps on Ray Tune: label-noise rates x perturbation sizes (x probes, variants, seeds, training
settings). One Tune trial trains once per combination of the *training* axes; the scoring-only
axes (h, probes, variant) are scored together on each epoch's model by the trial's actors.

Results: ``<sweep_dir>/sweep.parquet`` (and .csv), one row per (trial, estimator), with the
detection metrics (raycurv.detection) of curvature, csl and final loss for the corrupted labels,
as ``{score}_{metric}`` columns (``curvature_auroc``, ``csl_average_precision``, ...);
``best.json``; ``auroc_vs_noise.png``.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import tune

from raycurv import storage
from raycurv.cluster import ensure_ray
from raycurv.config import EstimatorSpec, ScoreSpec, load_yaml, merge
from raycurv.detection import METRICS, SCORES, Metric, evaluate_table
from raycurv.errors import UsageError
from raycurv.report import pyplot
from raycurv.results import estimator_folder
from raycurv.run import score_run
from raycurv.runfolder import RunFolder

# axis name -> dotted path in ScoreSpec; "train.*" settings are axes too, by their field name
SCORING_AXES = {"h": "curvature.h", "probes": "curvature.probes", "variant": "curvature.variant"}
TRAINING_AXES = {
    "noise": "data.noise", "noise_kind": "data.noise_kind", "duplicates": "data.duplicates",
    "limit": "data.limit", "dataset": "data.dataset", "seed": "seed",
    **{name: f"train.{name}" for name in ("model", "epochs", "batch_size", "lr", "momentum",
                                           "weight_decay", "schedule", "workers")},
}

class SweepSpec(BaseModel):
    """A sweep file: a base run spec and the axes to vary."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: dict[str, Any] = Field(default_factory=dict)  # a `raycurv score --config` spec
    grid: dict[str, list[Any]]  # axis -> values
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(default=4, ge=1)  # random search: trials drawn from the training axes
    metric: Metric = "auroc"  # of curvature for the corrupted labels: the trial's score and best.json
    max_concurrent: int = Field(default=1, ge=1)
    max_failures: int = Field(default=1, ge=0)
    seed: int = 0  # of the random search


def _axis_path(axis: str) -> str:
    path = SCORING_AXES.get(axis) or TRAINING_AXES.get(axis)
    if path is None:
        valid = ", ".join([*SCORING_AXES, *TRAINING_AXES])
        raise UsageError(f"unknown sweep axis {axis!r}; valid: {valid}")
    return path


def _set(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    section, _, field = path.rpartition(".")
    return merge(spec, {section: {field: value}} if section else {field: value})


def trial_name(point: dict[str, Any]) -> str:
    """A stable folder name for a trial: its training-axis values, e.g. 'noise=0.1-seed=0'."""
    text = "-".join(f"{axis}={point[axis]}" for axis in sorted(point)) or "base"
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", text)


def trial_spec(sweep: SweepSpec, point: dict[str, Any], sweep_dir: str) -> ScoreSpec:
    """The run spec of one trial: base + training-axis values, every scoring combination."""
    spec = dict(sweep.base)
    for axis, value in point.items():
        spec = _set(spec, _axis_path(axis), value)
    base_curv = ScoreSpec.model_validate(spec).curvature
    values = {axis: sweep.grid.get(axis, [getattr(base_curv, axis)]) for axis in SCORING_AXES}
    combos = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    spec = merge(spec, {"curvature": {**combos[0], "also": combos[1:]},
                        "run_dir": storage.join(sweep_dir, "trials", trial_name(point))})
    return ScoreSpec.model_validate(spec)


def training_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """The grid's training-axis combinations (random search draws from these)."""
    axes = {a: v for a, v in sweep.grid.items() if a not in SCORING_AXES}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def load_sweep(data: dict[str, Any], sweep_dir: str) -> SweepSpec:
    """Validate a sweep spec fully (every trial's spec too) before anything starts."""
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if not sweep.grid:
        raise UsageError("the sweep grid is empty; give at least one axis with values")
    for axis, values in sweep.grid.items():
        _axis_path(axis)
        if not isinstance(values, list) or not values:
            raise UsageError(f"sweep axis {axis!r} has no values")
        for value in values if axis in SCORING_AXES else ():
            try:
                EstimatorSpec(**{axis: value})
            except ValidationError as exc:
                raise UsageError(f"sweep axis {axis!r}, value {value!r}: {exc.errors()[0]['msg']}") from None
    for point in training_points(sweep):
        try:
            trial_spec(sweep, point, sweep_dir)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))
            raise UsageError(f"trial {trial_name(point)}: {where}: {err['msg']}") from None
    return sweep


def load_sweep_file(path: str | Path, sweep_dir: str, overrides: dict[str, Any] | None = None) -> SweepSpec:
    return load_sweep(merge(load_yaml(path), overrides or {}), sweep_dir)


# --- running a sweep on Ray Tune -------------------------------------------------------------

def _rows(spec: ScoreSpec, point: dict[str, Any], tables: dict, train: dict, seconds: float) -> list[dict]:
    """One row per estimator of a finished trial: axes, estimator, detection metrics of the
    corrupted labels (``{score}_{metric}``, higher = better), costs."""

    estimators = {e.name: e for e in spec.curvature.estimators}
    passes = {h: 1 + max(e.probes for e in estimators.values() if e.h == h)
              for h in {e.h for e in estimators.values()}}
    rows = []
    for k, (name, table) in enumerate(tables.items()):
        est = estimators[name]
        found = evaluate_table(table)["detection"].get("corrupted", {})
        row = {"trial": trial_name(point), "noise": spec.data.noise, **point,
               "h": est.h, "probes": est.probes, "variant": est.variant, "estimator": name,
               "table": estimator_folder(spec, est, primary=k == 0).scores}
        for score in SCORES:
            for metric in METRICS:
                row[f"{score}_{metric}"] = found.get(score, {}).get(metric, float("nan"))
        row.update(train_acc=train.get("train_acc", float("nan")), wall_s=seconds,
                   scoring_passes_per_sample_epoch=passes[est.h])
        rows.append(row)
    return rows


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train once, score every estimator, write the trial's rows, report."""

    sweep, point = SweepSpec.model_validate(config["sweep"]), config["point"]
    spec = trial_spec(sweep, point, config["sweep_dir"])
    rows_file = RunFolder(spec.run_dir).rows
    saved = storage.read_bytes(rows_file)
    if saved is None:  # a finished trial is not redone when an interrupted sweep runs again
        started = time.perf_counter()
        result = score_run(spec)
        rows = _rows(spec, point, result.tables, result.train, time.perf_counter() - started)
        storage.write_bytes(rows_file, json.dumps(rows, default=float).encode())
    else:
        rows = json.loads(saved)
    print(f"trial {trial_name(point)}: " + ", ".join(
        f"{r['estimator']} AUROC {r['curvature_auroc']:.4f}" for r in rows), flush=True)
    tune.report({sweep.metric: max(r[f"curvature_{sweep.metric}"] for r in rows)})


def _param_space(sweep: SweepSpec, sweep_dir: str) -> dict[str, Any]:
    points = training_points(sweep)
    if sweep.search == "random":
        rng = np.random.default_rng(sweep.seed)
        points = [points[i] for i in rng.integers(0, len(points), sweep.num_samples)]
    return {"sweep": sweep.model_dump(mode="json"), "sweep_dir": sweep_dir,
            "point": tune.grid_search(points)}


def run_sweep(sweep: SweepSpec, sweep_dir: str, *, address: str | None = None) -> list[dict]:
    """Run every trial on Ray Tune (``max_concurrent`` at a time), collect and write the results."""

    storage.check_writable_folder(sweep_dir)
    base = trial_spec(sweep, training_points(sweep)[0], sweep_dir)
    t, c = base.train, base.curvature
    ensure_ray(address, cpus_needed=sweep.max_concurrent * (0.1 + t.workers * t.cpus_per_worker
                                                            + c.actors * c.actor_cpus))
    storage_path = sweep_dir if storage.is_uri(sweep_dir) else str(Path(sweep_dir).absolute())
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 0.1}),
        param_space=_param_space(sweep, storage_path),
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    rows = []
    for result in grid:
        saved = storage.read_bytes(RunFolder(trial_spec(sweep, result.config["point"], storage_path).run_dir).rows)
        if saved is not None:
            rows.extend(json.loads(saved))
    write_results(rows, sweep, storage_path)
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed: {str(failed[0].error).splitlines()[0]}")
    return rows


def best_row(rows: list[dict], metric: str) -> dict | None:
    key = f"curvature_{metric}"
    scored = [r for r in rows if np.isfinite(r.get(key, float("nan")))]
    return max(scored, key=lambda r: r[key]) if scored else None


def write_results(rows: list[dict], sweep: SweepSpec, sweep_dir: str) -> None:
    """sweep.parquet and sweep.csv (one row per trial x estimator), best.json, the AUROC plot."""

    table = pa.Table.from_pylist(sorted(rows, key=lambda r: (r["trial"], r["estimator"])))
    storage.write_parquet(storage.join(sweep_dir, "sweep.parquet"), table)
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    storage.write_bytes(storage.join(sweep_dir, "sweep.csv"), sink.getvalue().to_pybytes())
    best = best_row(rows, sweep.metric)
    storage.write_bytes(storage.join(sweep_dir, "best.json"),
                        json.dumps({"metric": f"curvature_{sweep.metric}", "best": best}, indent=2).encode())
    storage.write_bytes(storage.join(sweep_dir, "auroc_vs_noise.png"), plot_auroc(rows))


def plot_auroc(rows: list[dict]) -> bytes:
    """PNG: mislabel AUROC of curvature against the noise rate, one line per (h, variant, n)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in sorted({r["estimator"] for r in rows}):
        points = sorted((r["noise"], r["curvature_auroc"]) for r in rows if r["estimator"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("label-noise rate")
    ax.set_ylabel("AUROC of curvature for corrupted labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
