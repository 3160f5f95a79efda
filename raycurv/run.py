"""A scoring run, end to end: dataset -> curvature pool -> TorchTrainer -> score table.

See DESIGN.md "Data flow of a scoring run". Everything the user can get wrong is checked before
the run folder is touched, so bad input never leaves a partial folder behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

import raycurv
from raycurv import storage
from raycurv.config import EstimatorSpec, ScoreSpec
from raycurv.data import Prepared, prepare_dataset
from raycurv.data.sharding import actor_shards
from raycurv.errors import UsageError
from raycurv.evaluate import evaluate_table
from raycurv.models import MODELS
from raycurv.rundata import RUN_FILE, read_run_record
from raycurv.table import BY_EPOCH_FILE, BY_EPOCH_SCHEMA, SCORES_FILE, build_table


@dataclass
class RunResult:
    run_dir: str
    table: pa.Table
    metrics: dict[str, Any]  # detection metrics (raycurv.evaluate)
    train: dict[str, Any]  # last epoch's training metrics
    seconds: float
    tables: dict[str, pa.Table]  # every estimator's table by name, the primary (``table``) first


def _spec_record(spec: ScoreSpec, data: Prepared) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "dataset_fingerprint": data.fingerprint,
            "samples": len(data), "raycurv_version": raycurv.__version__}


# Settings that change where or how fast a run goes, not its results: a resumed run may differ in them.
# run_dir: the record is read from the folder itself, so how the folder is spelled (relative,
# absolute, file://) is not a setting.
_PLACEMENT = {"run_dir", "data.max_classes", "train.cpus_per_worker", "train.gpus_per_worker", "train.max_failures",
              "curvature.actor_cpus", "curvature.actor_gpus", "curvature.max_lag", "name",
              "curvature.optimize", "curvature.compile"}  # speed and rounding only


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
    record = read_run_record(spec.run_dir)
    if record is None:
        if storage.exists(storage.join(spec.run_dir, SCORES_FILE)):
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
    if spec.train.model not in MODELS:
        raise UsageError(f"unknown model {spec.train.model!r}; valid: {', '.join(MODELS)}")
    data = prepare_dataset(spec.data, seed=spec.seed)
    min_side = min(data.input_shape[1:])
    if spec.train.model == "small_cnn" and min_side < 4:
        raise UsageError(f"small_cnn needs images of at least 4x4, got {data.input_shape[1:]}")
    actor_shards(len(data), spec.curvature.actors, spec.curvature.batch_size)
    if spec.curvature.from_epoch >= spec.train.epochs:
        raise UsageError(f"--score-from {spec.curvature.from_epoch} leaves no epoch to score: "
                         f"epochs are 0..{spec.train.epochs - 1}")
    return data


def _dataset_payload(data: Prepared) -> dict[str, Any]:
    return {"images": data.images, "labels": data.labels, "scale": data.scale, "mean": data.mean,
            "std": data.std, "augment": data.augment, "flip": data.flip,
            "num_classes": data.num_classes}


def shard_specs(spec: ScoreSpec, data: Prepared) -> list:
    """What each curvature actor is told: its shard of positions, the model, the estimators."""
    from raycurv.actors import ShardSpec

    c = spec.curvature
    return [ShardSpec(
        index=index, start=start, stop=stop, epochs=spec.train.epochs, model=spec.train.model,
        in_channels=data.input_shape[0], num_classes=data.num_classes, scale=data.scale,
        mean=data.mean, std=data.std, seed=spec.seed,
        estimators=tuple((e.h, e.probes, e.variant) for e in c.estimators),
        batch_size=c.batch_size, method=c.method,
        precision=None if c.precision == "fp32" else c.precision, optimize=c.optimize,
        compile=c.compile, state_uri=storage.join(spec.run_dir, "shards", f"shard-{index:04d}.npz"))
        for index, (start, stop) in enumerate(actor_shards(len(data), c.actors, c.batch_size))]


def start_pool(spec: ScoreSpec, data: Prepared):
    """Create the curvature actors, each with only its shard's images in the object store."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raycurv.actors import CurvatureActor, CurvaturePool

    # on the cluster, not inside the caller's placement group (a Tune trial's)
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    c = spec.curvature
    actors, refs = [], []
    for shard_spec in shard_specs(spec, data):
        start, stop = shard_spec.start, shard_spec.stop
        shard = ray.put({"images": data.images[start:stop], "labels": data.labels[start:stop],
                         "sample_ids": data.sample_ids[start:stop]})
        refs.append(shard)
        actors.append(CurvatureActor.options(num_cpus=c.actor_cpus, num_gpus=c.actor_gpus,
                                             scheduling_strategy=outside)
                      .remote(shard_spec, shard, spec.run_name))
    return CurvaturePool(actors=actors, max_lag=c.max_lag, shard_refs=refs)


def fit(spec: ScoreSpec, data: Prepared, pool, *, extra_config: dict[str, Any] | None = None):
    """Run the TorchTrainer; returns Ray Train's Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycurv.train import train_loop_per_worker

    t = spec.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})}
    storage_path = spec.run_dir if storage.is_uri(spec.run_dir) else str(Path(spec.run_dir).absolute())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "data": ray.put(_dataset_payload(data)),
                           "pool": pool, **(extra_config or {})},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def merge_states(states: list[dict[str, np.ndarray]], data: Prepared) -> dict[str, np.ndarray]:
    """Per-shard actor states -> per-sample arrays in dataset order, and ``by_epoch``, the
    (estimators, epochs, N) per-epoch curvature, NaN where an epoch was not scored."""
    ordered = sorted(states, key=lambda s: int(s["start"]))
    by_epoch = np.concatenate([s["curvature"] for s in ordered], axis=2)
    train_loss = np.concatenate([s["train_loss"] for s in ordered], axis=1)
    if not (~np.isnan(by_epoch)).any(axis=1).all():
        missing = int((~(~np.isnan(by_epoch)).any(axis=1)).sum())
        raise RuntimeError(f"{missing} (estimator, sample) pairs were never scored")
    return {
        "sample_id": data.sample_ids, "label": data.labels, "original_label": data.original_labels,
        "corrupted": data.corrupted, "duplicate_of": data.duplicate_of,
        "csl": np.nansum(train_loss, axis=0),
        "final_loss": np.concatenate([s["final_loss"] for s in ordered]),
        "final_confidence": np.concatenate([s["final_confidence"] for s in ordered]),
        "final_pred": np.concatenate([s["final_pred"] for s in ordered]),
        "by_epoch": by_epoch,
    }


def table_metadata(spec: ScoreSpec, data: Prepared, estimator: EstimatorSpec,
                   epochs: list[int]) -> dict[str, Any]:
    return {
        "raycurv_version": raycurv.__version__, "run": spec.run_name,
        "dataset": data.name, "dataset_fingerprint": data.fingerprint, "n": len(data),
        "classes": data.num_classes, "input_shape": list(data.input_shape),
        "noise": {"rate": spec.data.noise, "kind": spec.data.noise_kind,
                  "duplicates": spec.data.duplicates, "limit": spec.data.limit},
        "model": spec.train.model, "variant": estimator.variant, "h": estimator.h,
        "probes": estimator.probes, "epochs": epochs, "seed": spec.seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def estimator_dir(run_dir: str, estimator: EstimatorSpec, *, primary: bool) -> str:
    """The primary estimator's table lives in the run folder; others under estimators/<name>/."""
    return run_dir if primary else storage.join(run_dir, "estimators", estimator.name)


def _write_parquet(table: pa.Table, location: str) -> None:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(location, sink.getvalue().to_pybytes())


def write_run(spec: ScoreSpec, data: Prepared, merged: dict[str, np.ndarray]) -> dict[str, pa.Table]:
    """Write each estimator's scores.parquet and curvature_by_epoch.parquet, each atomically.
    Returns the tables by estimator name, the primary first."""
    merged = dict(merged)
    by_epoch = merged.pop("by_epoch")
    tables = {}
    for k, estimator in enumerate(spec.curvature.estimators):
        values = by_epoch[k]  # (epochs, N)
        scored = ~np.isnan(values)
        epochs = [int(e) for e in np.flatnonzero(scored.any(axis=1))]
        columns = {**merged, "curvature": np.nanmean(values, axis=0), "epochs_scored": scored.sum(axis=0)}
        table = build_table(columns, table_metadata(spec, data, estimator, epochs))
        long_epoch, long_pos = np.nonzero(scored)
        per_epoch = pa.Table.from_arrays(
            [pa.array(data.sample_ids[long_pos]), pa.array(long_epoch.astype(np.int32)),
             pa.array(values[long_epoch, long_pos].astype(np.float32))], schema=BY_EPOCH_SCHEMA)
        folder = estimator_dir(spec.run_dir, estimator, primary=k == 0)
        _write_parquet(per_epoch, storage.join(folder, BY_EPOCH_FILE))
        _write_parquet(table, storage.join(folder, SCORES_FILE))
        tables[estimator.name] = table
    return tables


def score_run(spec: ScoreSpec, *, address: str | None = None,
              extra_config: dict[str, Any] | None = None) -> RunResult:
    """Train and score; write the run folder; return the table and its detection metrics."""
    from raycurv.cluster import check_resources, ensure_ray

    started = time.perf_counter()
    data = validate_spec(spec)
    resuming = check_run_dir(spec, data)
    t, c = spec.train, spec.curvature
    cpus = t.workers * t.cpus_per_worker + c.actors * c.actor_cpus
    ensure_ray(address, cpus_needed=cpus)
    check_resources(cpus=cpus, gpus=t.workers * t.gpus_per_worker + c.actors * c.actor_gpus)
    if not resuming:
        storage.write_bytes(storage.join(spec.run_dir, RUN_FILE),
                            json.dumps(_spec_record(spec, data), indent=2).encode())
    pool = start_pool(spec, data)
    try:
        result = fit(spec, data, pool, extra_config=extra_config)
        merged = merge_states(pool.states(), data)
    finally:
        pool.shutdown()
    tables = write_run(spec, data, merged)
    table = next(iter(tables.values()))
    return RunResult(run_dir=spec.run_dir, table=table, metrics=evaluate_table(table),
                     train=dict(result.metrics or {}), seconds=time.perf_counter() - started,
                     tables=tables)

