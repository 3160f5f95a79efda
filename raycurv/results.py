"""A run's results: the merged actor states (raycurv.actors.merge_states) turned into each
estimator's score table (contract 1.1, with its metadata: curvature, csl, the final model's
columns and the training-dynamics co-scores) and per-epoch table, written to the run folder.
Higher curvature = more memorized."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

import raycurv
from raycurv.config import EstimatorSpec, ScoreSpec
from raycurv.data import Prepared
from raycurv.runfolder import RunFolder
from raycurv.table import BY_EPOCH_SCHEMA, build_table


def table_metadata(spec: ScoreSpec, data: Prepared, estimator: EstimatorSpec,
                   epochs: list[int]) -> dict[str, Any]:
    """The score table's metadata (contract 1.1) for ``estimator`` scored on ``epochs``;
    ``train_epochs``: the epochs trained, over which csl and the co-scores run."""
    return {
        "raycurv_version": raycurv.__version__, "run": spec.run_name,
        "dataset": data.name, "dataset_fingerprint": data.fingerprint, "n": len(data),
        "classes": data.num_classes, "input_shape": list(data.input_shape),
        "noise": {"rate": spec.data.noise, "kind": spec.data.noise_kind,
                  "duplicates": spec.data.duplicates, "limit": spec.data.limit},
        "model": spec.train.model, "variant": estimator.variant, "h": estimator.h,
        "probes": estimator.probes, "epochs": epochs, "train_epochs": spec.train.epochs,
        "seed": spec.seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        # names of labels 0..C-1 where the source has them (image folders); raycurv.class_names
        **({"class_names": list(data.class_names)} if data.class_names else {}),
    }


def estimator_folder(spec: ScoreSpec, estimator: EstimatorSpec, *, primary: bool) -> RunFolder:
    """The primary estimator's tables live in the run folder; others under estimators/<name>/."""
    folder = RunFolder(spec.run_dir)
    return folder if primary else folder.estimator(estimator.name)


def write_results(spec: ScoreSpec, data: Prepared, merged: dict[str, np.ndarray]) -> dict[str, pa.Table]:
    """Write each estimator's per-epoch table, then its score table (each atomically, the score
    table last: its presence means the run is complete). Returns the score tables by estimator
    name, the primary first."""
    merged = dict(merged)
    by_epoch = merged.pop("by_epoch")  # (estimators, epochs, N), NaN where not scored
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
        folder = estimator_folder(spec, estimator, primary=k == 0)
        folder.write_by_epoch(per_epoch)
        folder.write_scores(table)
        tables[estimator.name] = table
    return tables
