"""A run's per-epoch curvature (the run folder's per-epoch table) for the lookup service: one
sample's curve, and the run's median and 10-90 % band of every scored epoch. Higher curvature =
more memorized; a sample's score is the mean of its curve over the scored epochs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycurv.errors import UsageError
from raycurv.runfolder import BY_EPOCH_FILE, RunFolder

BAND = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class EpochCurves:
    """Every (sample_id, epoch, curvature) row of a run, sorted by sample_id then epoch, and the
    per-epoch quantiles ``BAND`` over all samples."""

    sample_ids: np.ndarray  # (M,) int64
    epochs: np.ndarray  # (M,) int32
    values: np.ndarray  # (M,) float32
    band_epochs: np.ndarray  # (E,) the scored epochs
    band: np.ndarray  # (len(BAND), E) quantiles of the finite values of each epoch

    @classmethod
    def load(cls, folder: RunFolder) -> EpochCurves:
        """Read and sort the per-epoch table of ``folder``. Raises UsageError when the run has
        none (raycurv.table.TableError when it is unreadable)."""
        table = folder.read_by_epoch()
        if table is None:
            raise UsageError(f"it has no per-epoch table ({BY_EPOCH_FILE})")
        ids = table.column("sample_id").to_numpy()
        epochs = table.column("epoch").to_numpy().astype(np.int32)
        values = table.column("curvature").to_numpy().astype(np.float32)
        order = np.lexsort((epochs, ids))
        ids, epochs, values = ids[order], epochs[order], values[order]
        band_epochs = np.unique(epochs)
        band = np.full((len(BAND), len(band_epochs)), np.nan)
        finite = np.isfinite(values)
        for j, epoch in enumerate(band_epochs):
            chosen = values[(epochs == epoch) & finite]
            if len(chosen):
                band[:, j] = np.quantile(chosen.astype(np.float64), BAND)
        return cls(ids, epochs, values, band_epochs, band)

    def curve(self, sample_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, curvature) of one sample, by epoch; empty when it has no rows."""
        start, stop = np.searchsorted(self.sample_ids, [sample_id, sample_id + 1])
        return self.epochs[start:stop], self.values[start:stop]
