"""A run's images for the lookup service, and a bounded cache of the PNGs made from them.

:func:`load_images` is the one place that knows where a served run's pixels come from: today the
dataset rebuilt from the run's record (raycurv.rundata.load_run_data: same spec and seed, checked
against the table), held in memory, or read row by row from the run's prepared dataset where the
run has one. Swap it, and nothing else changes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raycurv.data.plane import StoreImages
from raycurv.pixels import png_bytes
from raycurv.rundata import load_run_data
from raycurv.runfolder import RunFolder

CACHE_BYTES = 64 << 20  # PNGs kept per replica
CACHE_ENTRIES = 50_000


@dataclass(frozen=True)
class RunImages:
    """The images of a run's samples, by row position of its score table; ``scale`` is white."""

    scale: float
    array: np.ndarray | None = None  # (N, C, H, W), in memory
    store: StoreImages | None = None  # else the rows of a prepared dataset, read part by part

    def image(self, position: int) -> np.ndarray:
        """One (C, H, W) image."""
        if self.array is not None:
            return self.array[position]
        return self.store[position:position + 1][0]

    def png(self, position: int, side: int | None = None) -> bytes:
        """The PNG of one image, its longer side ``side`` pixels (native size when None)."""
        return png_bytes(self.image(position), self.scale, side)


def load_images(folder: RunFolder, sample_ids: np.ndarray, labels: np.ndarray) -> RunImages:
    """The images of the run in ``folder`` whose table rows hold ``sample_ids`` and ``labels``
    (in row order). Raises raycurv.errors.UsageError (one line) when they cannot be had: no run
    record, data moved or changed since the run, samples or labels that do not match."""
    data = load_run_data(folder, pa.table({"sample_id": sample_ids, "label": labels}))
    if data.store is not None:  # a prepared dataset: read row by row, never whole
        return RunImages(scale=float(data.norm.scale), store=StoreImages(data.store, 0, len(data)))
    return RunImages(scale=float(data.norm.scale), array=data.load_images())


class PngCache:
    """PNG bytes by key, least recently used dropped first past ``max_bytes`` or
    ``max_entries``. Thread-safe."""

    def __init__(self, *, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(value) - (len(old) if old is not None else 0)
            self._items[key] = value
            while self._items and (self._bytes > self.max_bytes
                                   or len(self._items) > self.max_entries):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
