"""A run's results: the shards' merged summaries (raycurv.actors.merge_summaries) turned into each
estimator's score table (contract 1.2, with its metadata: curvature, csl, the final model's
columns, the training-dynamics co-scores and the ``suspected`` kind of raycurv.suspected, for
which the run's images are searched for conflicting duplicates), and each estimator's per-epoch table streamed from
the shards' per-epoch records, written to the run folder. Higher curvature = more memorized."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

import raycurv
from raycurv import storage
from raycurv.cluster import outside_placement_groups
from raycurv.config import EstimatorSpec, ScoreSpec
from raycurv.data import Prepared
from raycurv.data.plane import StoreImages
from raycurv.progress import phase
from raycurv.runfolder import RunFolder, shard_epoch_file
from raycurv.suspected import DEFAULT_THRESHOLD, mislabel_score, rule_metadata, suspect
from raycurv.table import (
    BY_EPOCH_WRITE_SCHEMA,
    build_table,
    has_training_records,
    rank_and_percentile,
)

if TYPE_CHECKING:  # Ray and torch: not needed to write tables
    from raycurv.actors import Merged


def table_metadata(spec: ScoreSpec, data: Prepared, estimator: EstimatorSpec,
                   epochs: list[int]) -> dict[str, Any]:
    """The score table's metadata (contract 1.2) for ``estimator`` scored on ``epochs``;
    ``train_epochs``: the epochs trained, over which csl and the co-scores run."""
    return {
        "raycurv_version": raycurv.__version__, "run": spec.run_name,
        "dataset": data.name, "dataset_fingerprint": data.fingerprint, "n": len(data),
        "classes": data.num_classes, "input_shape": list(data.input_shape),
        "noise": {"rate": spec.data.noise, "kind": spec.data.noise_kind,
                  "duplicates": spec.data.duplicates, "limit": spec.data.limit},
        "model": str(spec.train.model), "variant": estimator.variant, "h": estimator.h,
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


def write_results(spec: ScoreSpec, data: Prepared, merged: Merged, *,
                  extra_metadata: dict[str, Any] | None = None) -> dict[str, pa.Table]:
    """Write each estimator's per-epoch table, then its score table (each atomically, the score
    tables last: their presence means the run is complete), ``extra_metadata`` added to every
    table's metadata. Returns the score tables by estimator name, the primary first."""
    estimators = spec.curvature.estimators
    folders = [estimator_folder(spec, e, primary=k == 0) for k, e in enumerate(estimators)]
    write_by_epoch(folders, merged, data.sample_ids, epochs=spec.train.epochs)
    conflicting, near = conflicting_duplicates(spec, data)
    mislabel, mislabel_percentile = mislabel_score(
        merged.columns, training_records=has_training_records(extra_metadata or {}))
    tables = {}
    for k, (estimator, folder) in enumerate(zip(estimators, folders, strict=True)):
        columns = {**merged.columns, "curvature": merged.curvature[k],
                   "epochs_scored": merged.epochs_scored[k]}
        columns["suspected"] = suspect(
            percentile=rank_and_percentile(merged.curvature[k])[1],
            mislabel_percentile=mislabel_percentile, label=data.labels,
            final_pred=merged.columns["final_pred"], conflicting=conflicting)
        epochs = [int(e) for e in np.flatnonzero(merged.scored[k])]
        metadata = table_metadata(spec, data, estimator, epochs) | {
            "suspected": rule_metadata(threshold=DEFAULT_THRESHOLD, duplicate_threshold=near,
                                       mislabel_score=mislabel),
            **(extra_metadata or {})}
        table = build_table(columns, metadata)
        folder.write_scores(table)
        tables[estimator.name] = table
    return tables


def conflicting_duplicates(spec: ScoreSpec, data: Prepared) -> tuple[np.ndarray | None, float | None]:
    """(N,) bool, in a group of exact or near-duplicate images whose labels disagree, and the
    near-duplicate distance used; (None, None) when the run does not search
    (``data.duplicate_search`` off). The search (raycurv.duplicates) runs as one Ray task on the
    run's images, streamed from a prepared dataset, so the driver never holds them."""
    if not spec.data.duplicate_search:
        return None, None
    import ray

    from raycurv.duplicates import NEAR_THRESHOLD

    images = data.images if data.images is not None else StoreImages(data.store, 0, len(data))
    search = ray.remote(num_cpus=1, scheduling_strategy=outside_placement_groups())(_conflicting)
    with phase(f"duplicate search ({len(data)} images)"):
        found = ray.get(search.remote(images, data.labels, data.norm.scale, NEAR_THRESHOLD))
    return found, NEAR_THRESHOLD


def _conflicting(images, labels: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    from raycurv.duplicates import find_duplicates  # faiss and torch: only in the task

    return find_duplicates(images, labels, scale=scale, threshold=threshold).in_conflicting_group()


def write_by_epoch(folders: list[RunFolder], merged: Merged, sample_ids: np.ndarray, *,
                   epochs: int, rows_per_group: int = 1 << 20) -> None:
    """Each estimator's (sample_id, epoch, curvature, loss) rows of every scored epoch, epoch by
    epoch and in sample order within one, read from the shards' per-epoch records and streamed
    into ``folders[k]``'s per-epoch table: one shard's epoch is in memory at a time. ``loss``:
    the scored model's loss on the sample (the same for every estimator)."""
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(storage.parquet_writer(f.by_epoch, BY_EPOCH_WRITE_SCHEMA))
                   for f in folders]
        pending: list[list[pa.Table]] = [[] for _ in folders]
        for epoch in range(epochs):
            if not merged.scored[:, epoch].any():
                continue
            for start, stop, state in merged.shards:
                record = storage.read_npz(shard_epoch_file(state, epoch))
                if record is None:
                    continue
                loss = record.get("final_loss")  # (n,): the model scored at this epoch
                for k, values in enumerate(record["curvature"]):  # (n,) per estimator
                    keep = np.flatnonzero(~np.isnan(values))
                    pending[k].append(pa.Table.from_arrays(
                        [pa.array(sample_ids[start:stop][keep]),
                         pa.array(np.full(len(keep), epoch, np.int32)),
                         pa.array(values[keep].astype(np.float32)),
                         pa.nulls(len(keep), pa.float32()) if loss is None else
                         pa.array(loss[keep].astype(np.float32))], schema=BY_EPOCH_WRITE_SCHEMA))
            for k, writer in enumerate(writers):
                if sum(len(t) for t in pending[k]) >= rows_per_group:
                    writer.write_table(pa.concat_tables(pending[k]), row_group_size=rows_per_group)
                    pending[k] = []
        for k, writer in enumerate(writers):
            if pending[k]:
                writer.write_table(pa.concat_tables(pending[k]), row_group_size=rows_per_group)
