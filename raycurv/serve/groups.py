"""Duplicate groups of a served run, where they are known:

- ``injected``: a sample and the copies of it the run injected (the table's ``duplicate_of``);
- ``exact``: samples with identical pixel arrays (raycurv.duplicates' hashes), once the run's
  images are in memory.

Near duplicates need ``raycurv evaluate``'s neighbour search (seconds to minutes) and are not
searched here. A group whose members carry different labels is conflicting: the samples a network
can only fit by memorizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycurv.duplicates import exact_pairs, group_pairs, pixel_hashes
from raycurv.serve.index import TableIndex

INJECTED = "injected"
EXACT = "exact"


@dataclass(frozen=True)
class Groups:
    """Group id of every row position (-1: in no known group), and how they were found."""

    group: np.ndarray  # (N,) int64
    searched: tuple[str, ...]  # INJECTED, and EXACT where the images were at hand
    not_searched: str | None  # why EXACT was not searched

    def members(self, position: int) -> np.ndarray:
        """Row positions of the group of ``position`` (itself included); empty for none."""
        gid = self.group[position]
        return np.flatnonzero(self.group == gid) if gid >= 0 else np.empty(0, dtype=np.int64)


def injected_pairs(index: TableIndex) -> np.ndarray:
    """(P, 2) row positions (source, copy) of every injected copy whose source is in the table."""
    copies = np.flatnonzero(index.columns["duplicate_of"] >= 0)
    sources = index.positions(index.columns["duplicate_of"][copies])
    kept = sources >= 0
    return np.stack([sources[kept], copies[kept]], axis=1).astype(np.int64)


def find_groups(index: TableIndex, images: np.ndarray | None, why_not: str | None = None
                ) -> Groups:
    """The known groups of ``index``'s rows; exact copies among ``images`` (N, C, H, W, by row
    position) when given, else ``why_not`` says why they were not searched."""
    pairs = [injected_pairs(index)]
    searched = (INJECTED,)
    if images is not None:
        pairs.append(exact_pairs(pixel_hashes(images)))
        searched += (EXACT,)
    return Groups(group_pairs(index.rows, np.concatenate(pairs)), searched,
                  None if images is not None else why_not)
