"""What the service shows of a run beyond its score table: images, per-epoch curves, duplicate
groups, the curvature histogram. Each is loaded on first use, once per served table (a reloaded
table gets fresh extras), by the caller's worker thread, never on the event loop. A load that
fails is remembered with its reason and tried again after ``RETRY_S`` seconds (data may come
back); the reason is what a client is told.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from raycurv.runfolder import RunFolder
from raycurv.serve.epochs import EpochCurves
from raycurv.serve.groups import Groups, find_groups
from raycurv.serve.images import PngCache, RunImages, load_images
from raycurv.serve.index import TableIndex

T = TypeVar("T")
RETRY_S = 30.0
HISTOGRAM_BINS = 40
KINDS = ("clean", "corrupted", "duplicate")
_SERIAL = itertools.count()  # keys PNGs by extras, never reused (unlike id())


class Unavailable(LookupError):
    """A run's data of some kind cannot be had; the message says what and why (HTTP 404)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Lazy(Generic[T]):
    """A value loaded once by ``load`` on first :meth:`get`; failures are remembered."""

    def __init__(self, load: Callable[[], T], what: str, *, retry_s: float = RETRY_S) -> None:
        self._load = load
        self._what = what
        self._retry_s = retry_s
        self._value: T | None = None
        self._failure: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """The value, loading it if needed; raises Unavailable naming what and why."""
        with self._lock:
            if self._value is not None:
                return self._value
            if self._failure is not None and time.monotonic() < self._failure[1]:
                raise Unavailable(self._failure[0])
            try:
                self._value = self._load()
            except Exception as exc:  # noqa: BLE001 - any failure makes the data unavailable
                reason = f"{self._what} {one_line(exc)}"
                self._failure = (reason, time.monotonic() + self._retry_s)
                raise Unavailable(reason) from None
            return self._value


def histogram(index: TableIndex, bins: int = HISTOGRAM_BINS) -> dict:
    """Curvature counts per kind of sample (clean, corrupted label, injected copy) in ``bins``
    log-spaced bins over the positive finite values (a value <= 0 falls in the first bin)."""
    curvature = index.columns["curvature"].astype(np.float64)
    finite = np.isfinite(curvature)
    positive = curvature[finite & (curvature > 0)]
    low = float(positive.min()) if len(positive) else 1e-6
    high = max(float(positive.max()) if len(positive) else 1.0, low * 10)
    edges = np.geomspace(low, high, bins + 1)
    where = np.clip(np.searchsorted(edges, curvature, side="right") - 1, 0, bins - 1)
    copy = index.columns["duplicate_of"] >= 0
    corrupted = index.columns["corrupted"]
    masks = dict(zip(KINDS, (~corrupted & ~copy, corrupted, copy), strict=True))
    counts = {kind: np.bincount(where[mask & finite], minlength=bins).tolist()
              for kind, mask in masks.items()}
    return {"edges": edges.tolist(), "counts": counts}


class RunExtras:
    """The lazily loaded extras of one served table."""

    def __init__(self, index: TableIndex, *, pngs: PngCache) -> None:
        folder = RunFolder.of(index.path)
        self.index = index
        self.pngs = pngs
        self.serial = next(_SERIAL)
        run = repr(index.run)
        self.images: Lazy[RunImages] = Lazy(
            lambda: load_images(folder, index.sample_ids_at(np.arange(index.rows)),
                                index.columns["label"]),
            f"the images of run {run} are not reachable:")
        self.epochs: Lazy[EpochCurves] = Lazy(lambda: EpochCurves.load(folder),
                                              f"run {run} has no per-epoch curvature:")
        self.groups: Lazy[Groups] = Lazy(self._groups, f"run {run}: duplicate groups failed:")
        self.histogram: Lazy[dict] = Lazy(lambda: histogram(index),
                                          f"run {run}: the histogram failed:")

    def _groups(self) -> Groups:
        try:
            images = self.images.get()
        except Unavailable as exc:
            return find_groups(self.index, None, str(exc))
        if images.array is None:
            return find_groups(self.index, None, "the images are read one at a time")
        return find_groups(self.index, images.array)

    def cached_png(self, position: int, side: int | None) -> bytes | None:
        """The PNG of one row's image if the cache has it (never loads anything)."""
        return self.pngs.get((self.serial, position, side))

    def png(self, position: int, side: int | None) -> bytes:
        """The PNG of one row's image, made (loading the images if needed) and cached."""
        body = self.cached_png(position, side)
        if body is None:
            body = self.images.get().png(position, side)
            self.pngs.put((self.serial, position, side), body)
        return body


class Extras:
    """The extras of every served table, created on first use and dropped with their table."""

    def __init__(self, *, pngs: PngCache | None = None) -> None:
        self._pngs = pngs or PngCache()
        self._by_index: weakref.WeakKeyDictionary[TableIndex, RunExtras] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of(self, index: TableIndex) -> RunExtras:
        with self._lock:
            extras = self._by_index.get(index)
            if extras is None:
                extras = self._by_index[index] = RunExtras(index, pngs=self._pngs)
            return extras
