"""The score table: Arrow schema (contract v1), building and validation. Where it is stored, and
how it is read and written, is raycurv.runfolder's business.

One row per training sample, sorted by ``sample_id``. Higher ``curvature`` means more memorized; ``rank`` 1 is the highest curvature and
``percentile`` is the share of samples with strictly lower curvature, in [0, 1].
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

TABLE_VERSION = 1
METADATA_KEY = b"raycurv"

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("original_label", pa.int32(), nullable=False),
        pa.field("corrupted", pa.bool_(), nullable=False),
        pa.field("duplicate_of", pa.int64(), nullable=True),
        pa.field("curvature", pa.float32(), nullable=False),
        pa.field("epochs_scored", pa.int32(), nullable=False),
        pa.field("csl", pa.float32(), nullable=False),
        pa.field("final_loss", pa.float32(), nullable=False),
        pa.field("final_confidence", pa.float32(), nullable=False),
        pa.field("final_pred", pa.int32(), nullable=False),
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("percentile", pa.float32(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)

BY_EPOCH_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("curvature", pa.float32(), nullable=False),
    ]
)


class TableError(ValueError):
    """A file that is not a valid raycurv score table (the message says why)."""


def rank_and_percentile(curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank 1 = highest curvature (ties broken by lower sample position); percentile = share
    of samples with strictly lower curvature, in [0, 1]."""
    curvature = np.asarray(curvature, dtype=np.float64)
    order = np.lexsort((np.arange(len(curvature)), -curvature))
    rank = np.empty(len(curvature), dtype=np.int64)
    rank[order] = np.arange(1, len(curvature) + 1)
    lower = np.searchsorted(np.sort(curvature), curvature, side="left")
    percentile = (lower / max(len(curvature), 1)).astype(np.float32)
    return rank, percentile


def build_table(columns: dict[str, Any], metadata: dict[str, Any]) -> pa.Table:
    """Assemble a contract-v1 table from per-sample arrays (all but ``rank`` and
    ``percentile``, which are derived from ``curvature``), sorted by sample_id."""
    n = len(columns["sample_id"])
    order = np.argsort(np.asarray(columns["sample_id"]), kind="stable")
    data = {name: np.asarray(columns[name])[order] for name in columns}
    data["rank"], data["percentile"] = rank_and_percentile(data["curvature"])
    if "duplicate_of" not in data:
        data["duplicate_of"] = np.full(n, -1, dtype=np.int64)
    dup = np.asarray(data["duplicate_of"], dtype=np.int64)
    arrays = []
    for field in SCHEMA:
        if field.name == "duplicate_of":
            arrays.append(pa.array(dup, type=pa.int64(), mask=dup < 0))
        else:
            arrays.append(pa.array(np.asarray(data[field.name]).astype(field.type.to_pandas_dtype())))
    meta = {"table_version": TABLE_VERSION, **metadata}
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def read_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TableError("no raycurv metadata in the schema")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TableError(f"raycurv metadata is not JSON: {exc}") from None


def _unique(ids: np.ndarray) -> bool:
    """No repeated value; O(N) for the usual strictly increasing ids, else one sort."""
    if len(ids) < 2 or np.all(ids[1:] > ids[:-1]):
        return True
    ordered = np.sort(ids)
    return not np.any(ordered[1:] == ordered[:-1])


def validate_table(table: pa.Table) -> dict[str, Any]:
    """Check a table against contract v1; returns its metadata. Raises TableError."""
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise TableError(f"missing columns: {', '.join(missing)}")
    for field in SCHEMA:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise TableError(f"column {field.name} has type {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise TableError(f"column {field.name} has nulls")
    meta = read_metadata(table)
    if meta.get("table_version") != TABLE_VERSION:
        raise TableError(f"table version {meta.get('table_version')!r}, expected {TABLE_VERSION}")
    ids = table.column("sample_id").to_numpy()
    if not _unique(ids):
        raise TableError("sample_id values are not unique")
    if len(ids) and ids.min() < 0:
        raise TableError("negative sample_id")
    curvature = table.column("curvature").to_numpy()
    if not np.all(np.isfinite(curvature)):
        raise TableError("curvature has non-finite values")
    return meta
