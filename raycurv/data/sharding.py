"""Deterministic partitions of a dataset's positions: training shards per epoch, scoring batches
cut at fixed boundaries, and contiguous actor shards made of whole scoring batches."""

from __future__ import annotations

import math

import numpy as np

from raycurv.errors import UsageError


def scoring_batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches [a, b) covering positions [start, stop), cut at multiples of ``batch_size``.

    Boundaries depend on the position alone, never on how positions were split among actors,
    so a sample is scored in the same batch (same kernel shapes, same float rounding) whatever
    the number of actors.
    """
    edges = [start, *range((start // batch_size + 1) * batch_size, stop, batch_size), stop]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def actor_shards(n: int, actors: int, batch_size: int) -> list[tuple[int, int]]:
    """Split positions [0, n) into ``actors`` contiguous shards of whole scoring batches,
    as even as possible. Raises UsageError when there are more actors than batches."""
    batches = math.ceil(n / batch_size)
    if actors > batches:
        raise UsageError(f"--actors {actors} exceeds the {batches} scoring batches of {n} samples "
                         f"(batch size {batch_size}); use at most {batches} actors")
    cuts = np.linspace(0, batches, actors + 1).round().astype(int)
    return [(int(a) * batch_size, min(int(b) * batch_size, n)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def epoch_batches(n: int, *, world_size: int, rank: int, batch_size: int, seed: int,
                  epoch: int) -> list[np.ndarray]:
    """This worker's training batches (arrays of positions) for one epoch.

    A seeded permutation per epoch (like a distributed sampler with set_epoch) is dealt round-robin
    to the workers: every sample is trained on exactly once per epoch, and every worker gets the
    same number of batches, as DDP's all-reduce requires.
    """
    perm = np.random.default_rng([seed, epoch, 0x747261696E]).permutation(n)  # "train"
    share = perm[rank::world_size]
    num_batches = max(1, math.ceil(math.ceil(n / world_size) / batch_size))
    return [b for b in np.array_split(share, num_batches)]
