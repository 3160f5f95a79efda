"""Response bodies of the lookup API, built from a TableIndex; shared by the HTTP routes and by
``raycurv query`` reading a table directly, so both answer the same thing.

Scores: higher curvature = more memorized; rank 1 = highest curvature; "desc" = most memorized
first, "asc" = least memorized first.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from raycurv.serve.index import Order, TableIndex
from raycurv.serve.registry import RunRegistry, RunState, UnknownRun


class NotFound(LookupError):
    """An unknown run or sample; the message says what exists (HTTP 404)."""


def resolve(registry: RunRegistry, run: str) -> TableIndex:
    """The table serving ``run``; raises NotFound naming the known runs, or why it has none."""
    try:
        state = registry.get(run)
    except UnknownRun as exc:
        raise NotFound(str(exc)) from None
    if state.index is None:
        raise NotFound(f"run {run!r} has no table loaded: {state.last_error or 'not loaded yet'}")
    return state.index


def _describe_ids(index: TableIndex) -> str:
    span = index.id_range()
    if span is None:
        return "the table is empty"
    return f"its {index.rows} sample ids span {span[0]}..{span[1]}"


def _envelope(index: TableIndex, **fields: bytes) -> bytes:
    """``{"run": ..., field: raw JSON, ...}`` without re-encoding the raw JSON parts."""
    parts = [b'"run":' + json.dumps(index.run).encode()]
    parts += [json.dumps(name).encode() + b":" + raw for name, raw in fields.items()]
    return b"{" + b",".join(parts) + b"}"


def locate(index: TableIndex, sample_id: int) -> int:
    """Row position of ``sample_id``; raises NotFound naming the ids that exist."""
    position = index.position_of(sample_id)
    if position < 0:
        raise NotFound(f"run {index.run!r} has no sample {sample_id}; {_describe_ids(index)}")
    return position


def sample_payload(index: TableIndex, sample_id: int) -> bytes:
    """One row as JSON ``{"run", "sample"}``; raises NotFound when the table has no such sample."""
    return _envelope(index, sample=index.row_json(locate(index, sample_id)))


def lookup_payload(index: TableIndex, sample_ids: list[int]) -> tuple[bytes, int]:
    """JSON rows of the ids that exist, in request order, and the ids that do not; and the
    number of rows."""
    requested = np.asarray(sample_ids, dtype=np.int64)
    positions = index.positions(requested)
    found = positions >= 0
    body = _envelope(index, rows=index.rows_json(positions[found]),
                     missing=json.dumps(requested[~found].tolist()).encode())
    return body, int(found.sum())


def ranked(index: TableIndex, *, k: int, label: int | None = None, order: Order = "desc",
           offset: int = 0, corrupted: bool | None = None, injected: bool | None = None
           ) -> tuple[np.ndarray, int]:
    """Positions of the ``k`` samples after the first ``offset`` in rank order (desc: most
    memorized first), of those matching every filter given (label; corrupted label or not;
    injected copy or not); and how many match. Without the flag filters this reads only the
    first offset + k of the precomputed order; with them, every sample of the label."""
    if corrupted is None and injected is None:
        positions, total = index.top(offset + k, label=label, order=order)
        return positions[offset:], total
    positions, _ = index.top(index.rows, label=label, order=order)
    keep = np.ones(len(positions), dtype=bool)
    if corrupted is not None:
        keep &= index.columns["corrupted"][positions] == corrupted
    if injected is not None:
        keep &= (index.columns["duplicate_of"][positions] >= 0) == injected
    positions = positions[keep]
    return positions[offset:offset + k], len(positions)


def top_payload(index: TableIndex, *, k: int, label: int | None = None, order: Order = "desc",
                offset: int = 0, corrupted: bool | None = None, injected: bool | None = None
                ) -> tuple[bytes, int]:
    """JSON of the ``k`` most (desc) or least (asc) memorized samples after ``offset``, of those
    matching the filters (see :func:`ranked`); and the number of rows."""
    positions, total = ranked(index, k=k, label=label, order=order, offset=offset,
                              corrupted=corrupted, injected=injected)
    body = _envelope(index, order=json.dumps(order).encode(), label=json.dumps(label).encode(),
                     k=str(k).encode(), total=str(total).encode(),
                     rows=index.rows_json(positions))
    return body, len(positions)


def summary_payload(index: TableIndex) -> bytes:
    """Distribution, per-label counts and detection metrics (see TableIndex.summary) as JSON."""
    return json.dumps(_finite(index.summary()), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    """JSON-safe copy of metadata: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_info(state: RunState) -> dict[str, Any]:
    """What /v1/runs says about one run."""
    index = state.index
    return {
        "name": state.name,
        "path": str(index.path if index else state.file),
        "status": "serving" if index else "failed",
        "rows": index.rows if index else None,
        "loaded_at": index.loaded_at if index else None,
        "load_seconds": index.load_seconds if index else None,
        "loads": state.loads,
        "reload_failures": state.failures,
        "last_error": state.last_error,
        "metadata": _finite(index.metadata) if index else {},
    }


def runs_payload(registry: RunRegistry) -> bytes:
    """Every known run, by name, as JSON."""
    runs = registry.runs
    return json.dumps({"runs": [run_info(runs[name]) for name in sorted(runs)]},
                      allow_nan=False).encode()
