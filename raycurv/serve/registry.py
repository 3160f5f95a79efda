"""The runs a service answers for, and hot reload of their tables.

``refresh()`` looks at every run folder; a new or replaced score table is loaded into a
fresh :class:`TableIndex` off to the side and swapped in by replacing one reference, so a request
sees the old table or the new one, never a mix. A file that fails to load (unreadable, truncated,
off-contract) is refused: logged, counted, reported, and the previous table keeps serving. The
same refused file is not retried until it changes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from raycurv import storage
from raycurv.runfolder import RunFolder, run_name
from raycurv.serve.index import TableIndex, release_freed_memory
from raycurv.storage import FileStamp
from raycurv.table import TableError

if TYPE_CHECKING:  # the service's metrics; `raycurv query` reads tables without loading Serve
    from raycurv.serve.prometheus import ServeMetrics

MISSING = "missing"


@dataclass(frozen=True)
class RunState:
    """What the service knows of one run; replaced as a whole, never mutated."""

    name: str
    file: str  # the table file: a local path or a URI
    index: TableIndex | None = None
    loads: int = 0
    failures: int = 0
    last_error: str | None = None
    refused: FileStamp | str | None = None  # the file version last refused, so it isn't retried


class UnknownRun(LookupError):
    """No run of that name; the message lists the runs that exist."""


def discover(sources: Sequence[str | os.PathLike], *, log: logging.Logger | None = None
             ) -> dict[str, str]:
    """Run name -> score table file for every run under ``sources`` (local paths or URIs).

    A source is a run folder (it holds a score table; the run is named after the folder), a
    folder of run folders, or a table file (named after its folder, or its stem if it has another
    name than the run folder's table). When two runs share a name, the first source wins."""
    found: dict[str, str] = {}

    def add(file: str) -> None:
        name = run_name(file)
        if name in found and found[name] != file:
            if log:
                log.warning("run name %r at %s is taken by %s; ignored", name, file, found[name])
            return
        found[name] = file

    for source in map(str, sources):
        if storage.is_file(source):
            add(source)
        elif RunFolder(source).has_scores():
            add(RunFolder(source).scores)
        else:
            for child in map(RunFolder, storage.list_dirs(source)):
                if child.has_scores():
                    add(child.scores)
    return found


class RunRegistry:
    """The served runs: an immutable snapshot readers take, and the refresh that replaces it."""

    def __init__(self, *, sources: Sequence[str | os.PathLike], metrics: ServeMetrics | None = None,
                 log: logging.Logger | None = None) -> None:
        self._sources = [os.fspath(s) for s in sources]
        self._metrics = metrics
        self._log = log or logging.getLogger("raycurv.serve")
        self._runs: Mapping[str, RunState] = MappingProxyType({})
        self._refresh_lock = threading.Lock()

    @property
    def runs(self) -> Mapping[str, RunState]:
        """The current snapshot: run name -> state. Take it once per request."""
        return self._runs

    def loaded(self) -> int:
        """How many runs have a table serving."""
        return sum(1 for state in self._runs.values() if state.index is not None)

    def get(self, name: str) -> RunState:
        """The state of run ``name``; raises UnknownRun naming the runs that exist."""
        runs = self._runs
        if name not in runs:
            known = ", ".join(sorted(runs)) or "none"
            raise UnknownRun(f"no run {name!r}; runs: {known}")
        return runs[name]

    def refresh(self) -> list[str]:
        """Load new or replaced tables and swap them in; returns one line per change."""
        with self._refresh_lock:
            changes: list[str] = []
            runs = dict(self._runs)
            found = discover(self._sources, log=self._log)
            for name, file in found.items():
                if name not in runs or runs[name].file != file:
                    runs[name] = RunState(name=name, file=file, index=None)
            for name, state in list(runs.items()):
                updated = self._check(state)
                if updated is not state:
                    runs[name] = updated
                    self._runs = MappingProxyType(dict(runs))  # publish each swap at once
                    changes.append(self._describe(updated))
                    if updated.index is not None and updated.index is not state.index:
                        self._warm(updated.index)
            self._runs = MappingProxyType(runs)
            if self._metrics:
                self._metrics.tables(self.loaded())
            return changes

    def _check(self, state: RunState) -> RunState:
        """The run's next state: unchanged, a freshly loaded table, or a refusal."""
        stamp = FileStamp.of(state.file)
        key = stamp if stamp is not None else MISSING
        if state.index is not None and state.index.stamp == stamp:
            return state
        if state.refused == key:
            return state
        if stamp is None:
            return self._refuse(state, key, f"no score table at {state.file}")
        try:
            index = TableIndex.load(state.file, run=state.name)
        except TableError as exc:
            return self._refuse(state, key, str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure to load refuses the file
            return self._refuse(state, key, f"cannot load {state.file}: {type(exc).__name__}: {exc}")
        finally:
            release_freed_memory()
        if self._metrics:
            self._metrics.table_loaded(state.name, index.rows)
        self._log.info("run %s: loaded %s (%d rows, %.2fs)", state.name, state.file, index.rows,
                       index.load_seconds)
        return replace(state, index=index, loads=state.loads + 1, last_error=None, refused=None)

    def _refuse(self, state: RunState, key: FileStamp | str, reason: str) -> RunState:
        """Record a refused file version; the previous table (if any) keeps serving."""
        reason = reason.splitlines()[0] if reason else "unknown error"
        keeps = "the previous table keeps serving" if state.index else "no table to serve"
        self._log.warning("run %s: refused %s: %s (%s)", state.name, state.file, reason, keeps)
        if self._metrics:
            self._metrics.reload_failed(state.name)
        return replace(state, failures=state.failures + 1, last_error=reason, refused=key)

    def _warm(self, index: TableIndex) -> None:
        """Compute the summary in the background, off the request path, so the first /summary
        is fast (a request arriving meanwhile waits for the same computation)."""

        def compute() -> None:
            try:
                index.summary()
            except Exception:  # noqa: BLE001 - a summary failure must not stop the service
                self._log.exception("run %s: summary failed", index.run)

        threading.Thread(target=compute, name=f"summary-{index.run}", daemon=True).start()

    @staticmethod
    def _describe(state: RunState) -> str:
        if state.last_error:
            return f"{state.name}: refused ({state.last_error})"
        return f"{state.name}: loaded {state.index.rows} rows from {state.file}"
