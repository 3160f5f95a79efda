"""The images behind a stored run: the dataset is prepared again from the run's record (same
spec, same seed: the same samples, labels and injected duplicates) and checked against the table.
Evaluation and the report need the pixels for duplicate detection and the gallery."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raycurv.config import ScoreSpec
from raycurv.data import Prepared, attach_store, plane, prepare_dataset
from raycurv.errors import UsageError
from raycurv.runfolder import RUN_FILE, RunFolder


def load_run_data(folder: RunFolder, table: pa.Table) -> Prepared:
    """The run's Prepared dataset, aligned with ``table`` row by row (sample_id order).

    Raises UsageError when the record is missing or the data no longer matches the table.
    """
    record = folder.read_record()
    if record is None:
        raise UsageError(f"no {RUN_FILE} in {folder.location}: cannot find the run's images")
    spec = ScoreSpec.model_validate(record["spec"])
    data = prepare_dataset(spec.data, seed=spec.seed)
    if data.images is None:  # a data-plane source: its images are the run's prepared dataset
        store = plane.Store.open(folder.data)
        if store is None:
            raise UsageError(f"no prepared dataset in {folder.data}: the run did not get that far")
        data = attach_store(data, store)
    if record.get("dataset_fingerprint") not in (None, data.fingerprint):
        raise UsageError(f"the data of {folder.location} changed since the run (fingerprint "
                         f"{data.fingerprint}, run {record['dataset_fingerprint']})")
    if not np.array_equal(table.column("sample_id").to_numpy(), data.sample_ids):
        raise UsageError(f"the samples of {folder.scores} do not match its {RUN_FILE}")
    if not np.array_equal(table.column("label").to_numpy(), data.labels):
        raise UsageError(f"the labels of {folder.scores} do not match its {RUN_FILE}")
    return data
