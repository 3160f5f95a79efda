"""A small client of the lookup service, and the same answers read straight from a table file.

Both return the API's JSON bodies (see raycurv.serve.schemas). Higher curvature = more
memorized; rank 1 = highest curvature; "desc" lists the most memorized first.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from raycurv.serve import payloads
from raycurv.serve.index import Order, TableIndex
from raycurv.table import TableError

DEFAULT_URL = "http://127.0.0.1:8000"
TABLE_COLUMNS = ("sample_id", "label", "original_label", "corrupted", "duplicate_of",
                 "curvature", "rank", "percentile", "csl", "final_pred", "final_confidence",
                 "suspected")


class QueryError(Exception):
    """The service or the table could not answer; the message is one line."""


def _request(url: str, *, token: str | None, body: dict[str, Any] | None = None,
             timeout_s: float = 30.0) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise QueryError(f"HTTP {exc.code}: {detail or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueryError(f"cannot reach {url}: {reason}") from None
    except ValueError as exc:
        raise QueryError(f"{url} did not answer JSON: {exc}") from None


def _run_url(url: str, run: str) -> str:
    return f"{url.rstrip('/')}/v1/runs/{urllib.parse.quote(run, safe='')}"


def fetch_sample(*, url: str, run: str, sample_id: int, token: str | None = None) -> dict[str, Any]:
    """GET /v1/runs/{run}/samples/{sample_id} from the service at ``url``."""
    return _request(f"{_run_url(url, run)}/samples/{sample_id}", token=token)


def fetch_top(*, url: str, run: str, k: int, label: int | None = None, order: Order = "desc",
              token: str | None = None) -> dict[str, Any]:
    """GET /v1/runs/{run}/top from the service at ``url``."""
    params = {"k": k, "order": order, **({"label": label} if label is not None else {})}
    return _request(f"{_run_url(url, run)}/top?{urllib.parse.urlencode(params)}", token=token)


def _load(path: str | Path) -> TableIndex:
    try:
        return TableIndex.load(path)
    except TableError as exc:
        raise QueryError(str(exc)) from None


def read_sample(path: str | Path, *, sample_id: int) -> dict[str, Any]:
    """The answer of the sample route, read from the table at ``path`` without the service."""
    try:
        return json.loads(payloads.sample_payload(_load(path), sample_id))
    except payloads.NotFound as exc:
        raise QueryError(str(exc)) from None


def read_top(path: str | Path, *, k: int, label: int | None = None, order: Order = "desc"
             ) -> dict[str, Any]:
    """The answer of the top route, read from the table at ``path`` without the service."""
    return json.loads(payloads.top_payload(_load(path), k=k, label=label, order=order)[0])


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table of the most useful columns."""
    if not rows:
        return "(no rows)"

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    table = [list(TABLE_COLUMNS)] + [[cell(row.get(c)) for c in TABLE_COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in table)
