"""Datasets as raycurv sees them: (sample_id, image, label) in canonical order, with injected
label noise and duplicates recorded per sample. See `prepare_dataset`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raycurv.config import MAX_CLASSES, DataSpec
from raycurv.data.noise import apply_noise, pick_duplicates
from raycurv.data.sources import SOURCES, RawImages, load_source
from raycurv.errors import UsageError

__all__ = ["SOURCES", "Normalization", "Prepared", "prepare_dataset", "validate_raw"]


@dataclass(frozen=True)
class Normalization:
    """How raw images become network input: ``(images / scale - mean) / std`` per channel.

    ``scale`` is the value of full intensity (255 for uint8 images, 16 for digits); ``mean`` and
    ``std`` (one per channel) are of ``images / scale``, so the input has mean 0 and std 1."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Prepared:
    """A dataset ready to train on and score. Arrays are aligned by position; ``sample_ids``
    are the canonical indices (kept through ``limit``; injected duplicates get new ids past the
    largest)."""

    name: str
    sample_ids: np.ndarray  # (N,) int64, increasing
    images: np.ndarray  # (N, C, H, W) uint8 or float32; images / norm.scale in [0, 1]
    labels: np.ndarray  # (N,) int64: the labels trained on (after noise)
    original_labels: np.ndarray  # (N,) int64: before noise (a duplicate: its source's label)
    corrupted: np.ndarray  # (N,) bool: label changed by injected noise
    duplicate_of: np.ndarray  # (N,) int64: sample_id an injected duplicate copies, else -1
    num_classes: int
    norm: Normalization  # raw images -> network input
    augment: bool
    flip: bool
    fingerprint: str

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # (C, H, W)


def validate_raw(raw: RawImages, name: str, *, max_classes: int = MAX_CLASSES) -> None:
    """Reject data the estimator cannot use: wrong shapes, labels out of range, non-finite pixels,
    more than ``max_classes`` classes (the model's output layer has one unit per class)."""
    if raw.images.ndim != 4 or len(raw.images) != len(raw.labels):
        raise UsageError(f"{name}: expected N images (N, C, H, W) and N labels, got "
                         f"{raw.images.shape} and {raw.labels.shape}")
    if len(raw.labels) == 0:
        raise UsageError(f"{name}: the dataset is empty")
    if raw.num_classes < 2:
        raise UsageError(f"{name}: need at least 2 classes, found {raw.num_classes}")
    if raw.num_classes > max_classes:
        raise UsageError(f"{name}: the labels make {raw.num_classes} classes (0..largest label), "
                         f"more than the {max_classes} allowed; number the classes 0..C-1 or "
                         "raise --max-classes")
    low, high = int(raw.labels.min()), int(raw.labels.max())
    if low < 0 or high >= raw.num_classes:
        raise UsageError(f"{name}: labels out of range: found {low}..{high}, expected "
                         f"0..{raw.num_classes - 1}")
    if raw.images.dtype.kind == "f" and not np.all(np.isfinite(raw.images)):
        bad = int(np.argmax(~np.isfinite(raw.images).reshape(len(raw.images), -1).all(axis=1)))
        raise UsageError(f"{name}: non-finite pixel values (first in sample {bad})")


def _fingerprint(images: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, labels, sample_ids):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / scale
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def prepare_dataset(spec: DataSpec, *, seed: int) -> Prepared:
    """Load ``spec.dataset``, keep a seeded ``limit`` subset, inject noise and duplicates.

    Deterministic in (spec, seed). Raises UsageError for anything the user can fix, including
    more than ``spec.max_classes`` classes and a ``limit`` above the dataset's size.
    """
    raw = load_source(spec.dataset, root=spec.data_root, download=spec.download,
                      image_column=spec.image_column, label_column=spec.label_column)
    validate_raw(raw, spec.dataset, max_classes=spec.max_classes)
    if spec.limit is not None and spec.limit > len(raw.labels):
        raise UsageError(f"--limit {spec.limit} exceeds the {len(raw.labels)} samples of "
                         f"{spec.dataset}")
    sample_ids = np.arange(len(raw.labels), dtype=np.int64)
    images, labels = raw.images, raw.labels
    if spec.limit is not None and spec.limit < len(labels):
        keep = np.sort(np.random.default_rng([seed, 0x6C696D]).choice(len(labels), spec.limit,
                                                                        replace=False))
        sample_ids, images, labels = sample_ids[keep], images[keep], labels[keep]
    fingerprint = _fingerprint(images, labels, sample_ids)
    mean, std = (raw.mean, raw.std) if raw.mean is not None else _channel_stats(images, raw.scale)

    noisy = apply_noise(labels, rate=spec.noise, kind=spec.noise_kind,
                        num_classes=raw.num_classes, seed=seed)
    original = labels
    duplicate_of = np.full(len(labels), -1, dtype=np.int64)
    if spec.duplicates:
        if spec.duplicates > len(labels):
            raise UsageError(f"--duplicates {spec.duplicates} exceeds the {len(labels)} samples")
        sources, conflicting = pick_duplicates(noisy, count=spec.duplicates,
                                               num_classes=raw.num_classes, seed=seed)
        new_ids = sample_ids.max() + 1 + np.arange(spec.duplicates, dtype=np.int64)
        duplicate_of = np.concatenate([duplicate_of, sample_ids[sources]])
        sample_ids = np.concatenate([sample_ids, new_ids])
        images = np.concatenate([images, images[sources]])
        original = np.concatenate([original, labels[sources]])
        noisy = np.concatenate([noisy, conflicting])
    corrupted = np.zeros(len(noisy), dtype=bool)
    corrupted[: len(labels)] = noisy[: len(labels)] != labels
    return Prepared(
        name=spec.dataset, sample_ids=sample_ids, images=np.ascontiguousarray(images),
        labels=noisy.astype(np.int64), original_labels=original.astype(np.int64),
        corrupted=corrupted, duplicate_of=duplicate_of, num_classes=raw.num_classes,
        norm=Normalization(scale=raw.scale, mean=tuple(mean), std=tuple(std)),
        augment=raw.augment if spec.augment is None else spec.augment, flip=raw.flip,
        fingerprint=fingerprint,
    )
