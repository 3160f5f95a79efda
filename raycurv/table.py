"""The score table: Arrow schema (contract 1.2), building and validation. Where it is stored, and
how it is read and written, is raycurv.runfolder's business.

One row per training sample, sorted by ``sample_id``. Higher ``curvature`` means more memorized; ``rank`` 1 is the highest curvature and
``percentile`` is the share of samples with strictly lower curvature, in [0, 1].

Versions: the metadata's ``table_version`` is the contract's major version (1) and
``table_minor_version`` its minor one. Minor versions only add nullable columns at the end, so
a reader of version 1 reads every 1.x table, and this module reads 1.0 tables (written without
a minor version): :func:`with_optional_columns` gives them the later columns, all null.
1.1 added the training-dynamics co-scores (raycurv.dynamics): ``aum``, ``margin`` (lower = more
likely mislabeled), ``forgetting_events``, ``learned_epoch`` (higher = harder; null = not learned
for good by the last epoch), null where the run has no complete training record of a sample.
1.2 added ``suspected`` (string: conflicting_duplicate, mislabel, atypical, or null; the rule is
raycurv.suspected's, stored in the metadata's ``suspected`` entry).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from raycurv.suspected import KINDS

TABLE_VERSION = 1  # the major version: changes only when a version-1 reader would misread
TABLE_MINOR_VERSION = 2  # 1.1: the training-dynamics co-scores; 1.2: suspected
METADATA_KEY = b"raycurv"

V1_FIELDS = [
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
CO_SCORE_FIELDS = [  # 1.1; raycurv.dynamics defines them
    pa.field("aum", pa.float32(), nullable=True),
    pa.field("margin", pa.float32(), nullable=True),
    pa.field("forgetting_events", pa.int32(), nullable=True),
    pa.field("learned_epoch", pa.int32(), nullable=True),
]
SUSPECTED_FIELDS = [  # 1.2; raycurv.suspected defines the values
    pa.field("suspected", pa.string(), nullable=True),
]
MINOR_FIELDS = {1: CO_SCORE_FIELDS, 2: SUSPECTED_FIELDS}  # minor version -> the columns it added
SCHEMA = pa.schema(V1_FIELDS + [f for minor in sorted(MINOR_FIELDS) for f in MINOR_FIELDS[minor]])
COLUMNS = tuple(SCHEMA.names)
OPTIONAL_COLUMNS = COLUMNS[len(V1_FIELDS):]  # absent from a 1.0 table
CATEGORIES = {"suspected": KINDS}  # string columns: their values besides null
STRING_COLUMNS = tuple(CATEGORIES)
# integer columns whose null is written as a negative number in numpy arrays
NULLABLE_INT_COLUMNS = ("duplicate_of", "forgetting_events", "learned_epoch")

BY_EPOCH_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("curvature", pa.float32(), nullable=False),
    ]
)
# What a scoring run writes: the columns above, then the loss (cross entropy on the label) of the
# model scored at that epoch, null where a shard did not record it. Readers of curvature select
# BY_EPOCH_SCHEMA's columns, so a file written before the loss column reads the same.
BY_EPOCH_WRITE_SCHEMA = BY_EPOCH_SCHEMA.append(pa.field("loss", pa.float32(), nullable=True))


class TableError(ValueError):
    """A file that is not a valid raycurv score table (the message says why)."""


def rank_and_percentile(curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank 1 = highest curvature (ties broken by lower sample position); percentile = share
    of samples with strictly lower curvature, in [0, 1]. The same of any other score (N,)."""
    curvature = np.asarray(curvature, dtype=np.float64)
    order = np.lexsort((np.arange(len(curvature)), -curvature))
    rank = np.empty(len(curvature), dtype=np.int64)
    rank[order] = np.arange(1, len(curvature) + 1)
    lower = np.searchsorted(np.sort(curvature), curvature, side="left")
    percentile = (lower / max(len(curvature), 1)).astype(np.float32)
    return rank, percentile


def build_table(columns: dict[str, Any], metadata: dict[str, Any]) -> pa.Table:
    """Assemble a score table from per-sample arrays (all but ``rank`` and ``percentile``, which
    are derived from ``curvature``), sorted by sample_id: the minor version is the newest whose
    columns ``columns`` holds any of (the later-added columns it lacks are then null); 1.0, the
    columns of version 1 only, when it holds none.

    Nulls: ``duplicate_of``, ``forgetting_events`` and ``learned_epoch`` are null where negative
    (or absent), ``aum`` and ``margin`` where NaN (or absent), ``suspected`` where None (or
    absent)."""
    n = len(columns["sample_id"])
    ids = np.asarray(columns["sample_id"])
    # columns arrive in sample_id order from a run: no reordered copy then
    order = None if n < 2 or np.all(ids[1:] > ids[:-1]) else np.argsort(ids, kind="stable")

    def column(name: str, default: Any, dtype) -> np.ndarray:
        """One column in sample_id order, as ``dtype`` (no copy where it already is)."""
        values = np.asarray(columns[name], dtype=dtype) if name in columns else default
        return values if order is None or name not in columns else values[order]

    rank, percentile = rank_and_percentile(column("curvature", None, np.float64))
    derived = {"rank": rank, "percentile": percentile}
    minor = max((m for m, added in MINOR_FIELDS.items() if any(f.name in columns for f in added)),
                default=0)
    fields = pa.schema(V1_FIELDS + [f for m in sorted(MINOR_FIELDS) if m <= minor
                                    for f in MINOR_FIELDS[m]])
    arrays = []
    for field in fields:  # pa.array wraps a numpy array of its own type without copying it
        dtype = field.type.to_pandas_dtype()
        if field.name in derived:
            arrays.append(pa.array(derived[field.name].astype(dtype, copy=False)))
        elif field.name in STRING_COLUMNS:
            arrays.append(pa.array(column(field.name, np.full(n, None, dtype=object), object),
                                   type=field.type))
        elif field.name in NULLABLE_INT_COLUMNS:
            values = column(field.name, np.full(n, -1), np.int64)
            arrays.append(pa.array(values.astype(dtype, copy=False), type=field.type, mask=values < 0))
        elif field.nullable:
            values = column(field.name, np.full(n, np.nan, dtype=dtype), dtype)
            arrays.append(pa.array(values, type=field.type, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(column(field.name, None, dtype)))
    meta = {**metadata, "table_version": TABLE_VERSION, "table_minor_version": minor}
    schema = fields.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
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


def has_training_records(metadata: dict[str, Any]) -> bool:
    """Whether a table's csl and co-scores come from training records: false only for a run that
    scored checkpoints without them (its metadata's ``training_records``; csl 0, co-scores null)."""
    return bool(metadata.get("training_records", True))


def _unique(ids: np.ndarray) -> bool:
    """No repeated value; O(N) for the usual strictly increasing ids, else one sort."""
    if len(ids) < 2 or np.all(ids[1:] > ids[:-1]):
        return True
    ordered = np.sort(ids)
    return not np.any(ordered[1:] == ordered[:-1])


def with_optional_columns(table: pa.Table) -> pa.Table:
    """``table`` with every column added after 1.0 that it lacks appended, all null (a 1.0 or
    1.1 table read as 1.2)."""
    for field in (SCHEMA.field(name) for name in OPTIONAL_COLUMNS):
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, type=field.type))
    return table


def validate_table(table: pa.Table) -> dict[str, Any]:
    """Check a table against contract 1.x: every 1.0 column present, the later (optional) ones
    where present, with their types; returns its metadata. Raises TableError."""
    missing = [name for name in COLUMNS if name not in table.column_names
               and name not in OPTIONAL_COLUMNS]
    if missing:
        raise TableError(f"missing columns: {', '.join(missing)}")
    for field in SCHEMA:
        if field.name not in table.column_names:
            continue
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise TableError(f"column {field.name} has type {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise TableError(f"column {field.name} has nulls")
    meta = read_metadata(table)
    if meta.get("table_version") != TABLE_VERSION:
        raise TableError(f"table version {meta.get('table_version')!r}, expected {TABLE_VERSION} "
                         f"(any 1.x)")
    ids = table.column("sample_id").to_numpy()
    if not _unique(ids):
        raise TableError("sample_id values are not unique")
    if len(ids) and ids.min() < 0:
        raise TableError("negative sample_id")
    for name, valid in CATEGORIES.items():
        if name in table.column_names:
            unknown = set(table.column(name).drop_null().unique().to_pylist()) - set(valid)
            if unknown:
                raise TableError(f"{name} has values {sorted(unknown)}; valid: {', '.join(valid)}")
    curvature = table.column("curvature").to_numpy()
    if not np.all(np.isfinite(curvature)):
        raise TableError("curvature has non-finite values")
    return meta
