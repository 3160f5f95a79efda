"""Seeded label noise and conflicting-label duplicates, recorded per sample."""

from __future__ import annotations

import numpy as np


def _choose(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(rate * N) distinct positions, chosen uniformly."""
    return rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)


def symmetric_noise(labels: np.ndarray, *, rate: float, num_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Flip exactly round(rate * N) labels, each to a uniformly chosen *different* class."""
    labels, chosen = labels.copy(), _choose(labels, rate, rng)
    # Adding 1..C-1 (mod C) reaches every other class with equal probability, never the same.
    labels[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return labels


def pairwise_noise(labels: np.ndarray, *, rate: float, num_classes: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Flip exactly round(rate * N) labels from class k to class k + 1 (mod C)."""
    labels, chosen = labels.copy(), _choose(labels, rate, rng)
    labels[chosen] = (labels[chosen] + 1) % num_classes
    return labels


NOISE_KINDS = {"symmetric": symmetric_noise, "pairwise": pairwise_noise}


def apply_noise(labels: np.ndarray, *, rate: float, kind: str, num_classes: int,
                seed: int) -> np.ndarray:
    """Return the noisy labels; the same (labels, rate, kind, seed) gives the same result."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    rng = np.random.default_rng([seed, 0x6E6F697365])  # a stream of its own: "noise"
    return NOISE_KINDS[kind](labels, rate=rate, num_classes=num_classes, rng=rng)


def pick_duplicates(labels: np.ndarray, *, count: int, num_classes: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``count`` distinct source positions and, for each, a label different from the
    source's: the copies are the same image carrying a conflicting label.

    Returns (source positions (count,), conflicting labels (count,)).
    """
    if count > len(labels):
        raise ValueError(f"cannot duplicate {count} samples out of {len(labels)}")
    rng = np.random.default_rng([seed, 0x647570])  # "dup"
    sources = np.sort(rng.choice(len(labels), size=count, replace=False))
    conflicting = (labels[sources] + rng.integers(1, num_classes, size=count)) % num_classes
    return sources, conflicting.astype(np.int64)
