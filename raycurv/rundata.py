"""The images behind a stored run: the dataset is prepared again from the run's run.json (same
spec, same seed: the same samples, labels and injected duplicates) and checked against the table.
Evaluation and the report need the pixels for duplicate detection and the gallery."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from raycurv import storage
from raycurv.errors import UsageError

RUN_FILE = "run.json"  # written by raycurv.run.score_run



def _record_location(run_dir: str) -> str:
    """run.json of a run folder; an extra estimator's folder (<run>/estimators/<name>) uses its run's."""
    parts = str(run_dir).rstrip("/").split("/")
    if len(parts) > 2 and parts[-2] == "estimators" and storage.read_bytes(
            storage.join(str(run_dir), RUN_FILE)) is None:
        return storage.join("/".join(parts[:-2]), RUN_FILE)
    return storage.join(str(run_dir), RUN_FILE)


def read_run_record(run_dir: str) -> dict[str, Any] | None:
    """run.json of a run folder, or None when there is none."""
    raw = storage.read_bytes(_record_location(run_dir))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("spec"), dict)
            and isinstance(record["spec"].get("data"), dict)):
        raise UsageError(f"{run_dir}/{RUN_FILE} does not hold a run spec")
    return record


def load_run_data(run_dir: str, table: pa.Table):
    """The run's Prepared dataset, aligned with ``table`` row by row (sample_id order).

    Raises UsageError when run.json is missing or the data no longer matches the table.
    """
    from raycurv.config import ScoreSpec
    from raycurv.data import prepare_dataset

    record = read_run_record(run_dir)
    if record is None:
        raise UsageError(f"no {RUN_FILE} in {run_dir}: cannot find the run's images")
    spec = ScoreSpec.model_validate(record["spec"])
    data = prepare_dataset(spec.data, seed=spec.seed)
    if record.get("dataset_fingerprint") not in (None, data.fingerprint):
        raise UsageError(f"the data of {run_dir} changed since the run (fingerprint "
                         f"{data.fingerprint}, run {record['dataset_fingerprint']})")
    ids = table.column("sample_id").to_numpy()
    if not np.array_equal(ids, data.sample_ids):
        raise UsageError(f"the samples of {run_dir}/scores.parquet do not match its run.json")
    if not np.array_equal(table.column("label").to_numpy(), data.labels):
        raise UsageError(f"the labels of {run_dir}/scores.parquet do not match its run.json")
    return data
