"""An in-memory index over one score table: O(1) lookups by sample_id, precomputed rank order.

Direction of the scores everywhere here: higher ``curvature`` means more memorized, ``rank`` 1 is
the highest curvature (the most memorized sample), and ``percentile`` is the share of samples with
strictly lower curvature. "desc" order lists the most memorized samples first, "asc" the least.

The table is read with :func:`raycurv.runfolder.read_run_scores` (memory-mapped Parquet, validated
against contract 1.x; an older table gets the later columns, all null); its columns become
dense numpy arrays by row position (a null count or epoch as -1, a null float as NaN, a category
as its int8 code in raycurv.table.CATEGORIES, -1 for null), and rows
are sorted by sample_id, so a lookup is an index or a binary search and never a scan.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycurv.detection import detection_items, evaluate_columns
from raycurv.runfolder import read_run_scores, run_name, table_file
from raycurv.storage import FileStamp
from raycurv.table import (
    CATEGORIES,
    COLUMNS,
    NULLABLE_INT_COLUMNS,
    SCHEMA,
    rank_and_percentile,
    read_metadata,
    with_optional_columns,
)

Order = Literal["desc", "asc"]

FLOAT_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_floating(f.type))
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """One column as a contiguous numpy array (nulls of the integer columns become -1, of the
    float columns NaN; a category column becomes int8 codes, -1 for null)."""
    column = table.column(name)
    if name in CATEGORIES:
        codes = pc.index_in(column, value_set=pa.array(CATEGORIES[name], pa.string()))
        return np.ascontiguousarray(codes.fill_null(-1).to_numpy().astype(np.int8))
    if name in NULLABLE_INT_COLUMNS:
        column = column.fill_null(-1)
    array = column.to_numpy()
    if array.dtype == np.bool_ or not array.flags.writeable:
        return np.ascontiguousarray(array)
    return array


def _category_json(name: str) -> tuple[str, ...]:
    """JSON text of a category column's code + 1: null, then each value quoted."""
    return ("null", *(f'"{value}"' for value in CATEGORIES[name]))


def _rank_order(rank: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    """Row positions sorted by rank (rank 1, the highest curvature, first).

    The table's ``rank`` column is used when it is a permutation of 1..N (an O(N) scatter);
    otherwise the rank is recomputed from curvature by raycurv.table.rank_and_percentile (ties
    by row position), the rank every table is written with."""
    order = _scatter_ranks(rank)
    if order is None:
        order = _scatter_ranks(rank_and_percentile(curvature)[0])
    return order


def _scatter_ranks(rank: np.ndarray) -> np.ndarray | None:
    """Row positions by rank, or None when ``rank`` is not a permutation of 1..N."""
    n = len(rank)
    dtype = np.int32 if n < 2**31 - 1 else np.int64
    if not n:
        return np.empty(0, dtype=dtype)
    if rank.min() != 1 or rank.max() != n:
        return None
    order = np.full(n, -1, dtype=dtype)
    order[rank - 1] = np.arange(n, dtype=dtype)
    return order if (order >= 0).all() else None


def _group_by_label(order: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions grouped by label, each group in rank order, with the group boundaries.

    Returns (labels, starts, positions): the rows of ``labels[i]`` are
    ``positions[starts[i]:starts[i + 1]]``, most memorized first."""
    in_order = label[order]
    if len(in_order) and 0 <= in_order.min() and in_order.max() < 2**15:
        keys = in_order.astype(np.int16)  # numpy sorts 16-bit keys with a linear radix sort
    else:
        keys = in_order
    perm = np.argsort(keys, kind="stable")
    positions = order[perm]
    sorted_labels = in_order[perm]
    del perm, keys, in_order
    # group boundaries of the sorted labels (np.unique would sort again, and is slow in numpy 2.4)
    starts = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    starts = np.concatenate(([0], starts, [len(positions)])).astype(np.int64) if len(positions) \
        else np.zeros(1, dtype=np.int64)
    labels = sorted_labels[starts[:-1]].astype(np.int64)
    return labels, starts, positions


def _stats(values: np.ndarray, descending_order: np.ndarray | None = None) -> dict[str, Any] | None:
    """min/max/mean/std and quantiles of a float column (None for an empty table)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if len(finite) == 0:
        return None
    if descending_order is not None and len(finite) == len(values):
        sorted_values = values[descending_order][::-1].astype(np.float64)
    else:
        sorted_values = np.sort(finite)
    qs = {f"{q:g}": float(sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)])
          for q in QUANTILES}
    return {
        "min": float(sorted_values[0]),
        "max": float(sorted_values[-1]),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "quantiles": qs,
    }


@dataclass(frozen=True, eq=False)
class TableIndex:
    """A loaded, validated score table with dense columns and its rank order.

    Immutable once built: a reload builds a new index and swaps the reference."""

    run: str
    path: str  # the table file: a local path or a URI
    stamp: FileStamp | None
    metadata: dict[str, Any]
    arrow_bytes: int
    columns: dict[str, np.ndarray]
    identity_ids: bool
    sorted_ids: np.ndarray | None
    sorted_positions: np.ndarray | None
    order: np.ndarray
    label_values: np.ndarray
    label_starts: np.ndarray
    label_positions: np.ndarray
    nonfinite: frozenset[str]
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    _summary: dict[str, Any] = field(default_factory=dict, repr=False)
    _summary_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, location: str, *, run: str | None = None) -> TableIndex:
        """Read, validate and index the score table at ``location`` (a run folder or its table
        file; a local path or a URI). Raises raycurv.table.TableError with a one-line reason."""
        started = time.perf_counter()
        file = table_file(str(location))
        stamp = FileStamp.of(file)
        _, table = read_run_scores(file)
        index = cls.from_table(table, run=run or run_name(file), path=file, stamp=stamp,
                               started=started)
        del table
        release_freed_memory()
        return index

    @classmethod
    def from_table(cls, table: pa.Table, *, run: str, path: str, stamp: FileStamp | None = None,
                   started: float | None = None) -> TableIndex:
        """Index an already validated contract-1.x table."""
        started = time.perf_counter() if started is None else started
        table = with_optional_columns(table)
        metadata = read_metadata(table)
        arrow_bytes = int(table.nbytes)
        columns = {name: _column_numpy(table, name) for name in COLUMNS}
        del table  # the numpy arrays are the only copy from here on
        ids = columns["sample_id"]
        n = len(ids)
        is_sorted = bool(n < 2 or np.all(ids[1:] > ids[:-1]))
        identity = is_sorted and (n == 0 or (ids[0] == 0 and ids[-1] == n - 1))
        sorted_ids = sorted_positions = None
        if identity:
            del columns["sample_id"]  # position == sample_id
        elif is_sorted:
            sorted_ids = ids
        else:
            sorted_positions = np.argsort(ids, kind="stable")
            sorted_ids = ids[sorted_positions]
        order = _rank_order(columns["rank"], columns["curvature"])
        labels, starts, positions = _group_by_label(order, columns["label"])
        nonfinite = frozenset(
            name for name in FLOAT_COLUMNS if n and not np.isfinite(columns[name]).all()
        )
        return cls(
            run=run, path=path, stamp=stamp, metadata=metadata, arrow_bytes=arrow_bytes,
            columns=columns, identity_ids=identity, sorted_ids=sorted_ids,
            sorted_positions=sorted_positions, order=order, label_values=labels,
            label_starts=starts, label_positions=positions, nonfinite=nonfinite,
            load_seconds=time.perf_counter() - started,
        )

    @property
    def rows(self) -> int:
        """Number of samples in the table."""
        return len(self.order)

    def positions(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row position of each sample_id, -1 where the table has no such sample."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if not self.rows:
            return np.full(len(sample_ids), -1, dtype=np.int64)
        if self.identity_ids:
            return np.where((sample_ids >= 0) & (sample_ids < self.rows), sample_ids, -1)
        where = np.searchsorted(self.sorted_ids, sample_ids)
        clipped = np.minimum(where, self.rows - 1)
        found = (where < self.rows) & (self.sorted_ids[clipped] == sample_ids)
        if self.sorted_positions is not None:
            clipped = self.sorted_positions[clipped]
        return np.where(found, clipped, -1)

    def position_of(self, sample_id: int) -> int:
        """Row position of one sample_id (-1 when absent), without array round trips."""
        if self.identity_ids:
            return sample_id if 0 <= sample_id < self.rows else -1
        if not self.rows:
            return -1
        where = int(np.searchsorted(self.sorted_ids, sample_id))
        if where >= self.rows or int(self.sorted_ids[where]) != sample_id:
            return -1
        return where if self.sorted_positions is None else int(self.sorted_positions[where])

    def sample_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """sample_id of each row position."""
        if self.identity_ids:
            return np.asarray(positions, dtype=np.int64)
        ids = self.sorted_ids if self.sorted_positions is None else self.columns["sample_id"]
        return ids[positions]

    def id_range(self) -> tuple[int, int] | None:
        """Smallest and largest sample_id (None for an empty table), for error messages."""
        if not self.rows:
            return None
        if self.identity_ids:
            return 0, self.rows - 1
        return int(self.sorted_ids[0]), int(self.sorted_ids[-1])

    def row_json(self, position: int) -> bytes:
        """One row as a JSON object (floats in their shortest float32 form, like rows_json)."""
        parts = []
        for name in COLUMNS:
            if name == "sample_id":
                text = str(position if self.identity_ids else
                           int(self.sample_ids_at(np.array([position]))[0]))
            else:
                value = self.columns[name][position]
                if name in FLOAT_COLUMNS:
                    text = str(value) if math.isfinite(value) else "null"
                elif name in CATEGORIES:
                    text = _category_json(name)[value + 1]
                elif name == "corrupted":
                    text = "true" if value else "false"
                elif name in NULLABLE_INT_COLUMNS and value < 0:
                    text = "null"
                else:
                    text = str(int(value))
            parts.append(f'"{name}":{text}')
        return ("{" + ",".join(parts) + "}").encode()

    def rows_json(self, positions: np.ndarray) -> bytes:
        """Rows at ``positions`` as a JSON array, in the order given, built column-wise by Arrow
        (no Python object per value). Non-finite floats and a null duplicate_of are null."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return b"[]"
        fields = []
        for name in COLUMNS:
            values = (self.sample_ids_at(positions) if name == "sample_id"
                      else self.columns[name][positions])
            array = pa.array(values)
            if name in CATEGORIES:
                text = pa.array(_category_json(name)).take(pa.array(values.astype(np.int64) + 1))
            elif name == "corrupted":
                text = pc.if_else(array, "true", "false")
            else:
                text = pc.cast(array, pa.string())
                if name in NULLABLE_INT_COLUMNS:
                    text = pc.if_else(pc.less(array, 0), "null", text)
                elif name in self.nonfinite:
                    text = pc.if_else(pc.is_finite(array), text, "null")
            fields.append(pc.binary_join_element_wise(f'"{name}":', text, ""))
        rows = pc.binary_join_element_wise(*fields, ",")
        return ("[{" + "},{".join(rows.to_pylist()) + "}]").encode()

    def top(self, k: int, *, label: int | None = None, order: Order = "desc") -> tuple[np.ndarray, int]:
        """Positions of the ``k`` most ("desc", rank 1 first) or least ("asc") memorized samples,
        optionally only those trained with ``label``; also returns how many samples matched."""
        if label is None:
            ranked = self.order
        else:
            i = int(np.searchsorted(self.label_values, label))
            if i >= len(self.label_values) or self.label_values[i] != label:
                return np.empty(0, dtype=np.int64), 0
            ranked = self.label_positions[self.label_starts[i]:self.label_starts[i + 1]]
        total = len(ranked)
        chosen = ranked[:k] if order == "desc" else ranked[max(total - k, 0):][::-1]
        return chosen.astype(np.int64), total

    def summary(self) -> dict[str, Any]:
        """Distribution of the scores, per-label counts, and detection metrics where the table
        knows the truth (injected label noise: ``corrupted``; injected duplicates:
        ``duplicate_of``), those of ``raycurv evaluate`` (raycurv.detection: targets, scores and
        figures defined there). Computed once, on first use."""
        with self._summary_lock:
            if not self._summary:
                self._summary.update(self._compute_summary())
            return dict(self._summary)

    def _compute_summary(self) -> dict[str, Any]:
        c = self.columns
        n = self.rows
        corrupted = c["corrupted"]
        counts = np.diff(self.label_starts)
        by_label = []
        for i, value in enumerate(self.label_values.tolist()):
            rows = self.label_positions[self.label_starts[i]:self.label_starts[i + 1]]
            by_label.append({
                "label": value,
                "count": int(counts[i]),
                "corrupted": int(corrupted[rows].sum()),
                "mean_curvature": float(c["curvature"][rows].astype(np.float64).mean()),
            })
        metrics = evaluate_columns(c)
        epochs = c["epochs_scored"]
        return {
            "run": self.run,
            "rows": n,
            "classes": len(self.label_values),
            "epochs_scored": int(epochs.max()) if n else None,
            "corrupted": metrics["corrupted"],
            "duplicates": metrics["duplicates"],
            "curvature": _stats(c["curvature"], self.order),
            "csl": _stats(c["csl"]),
            "aum": _stats(c["aum"]),
            "by_label": by_label,
            "detection": detection_items(metrics),
        }


def release_freed_memory() -> None:
    """Hand memory freed after a load (Arrow's decoded table, validation temporaries) back to
    the operating system, so a replica's resident size tracks the index, not the load's peak."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
