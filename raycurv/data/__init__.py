"""Datasets as raycurv sees them: (sample_id, image, label) in canonical order, with injected
label noise and duplicates recorded per sample. See `prepare_dataset`.

The built-in datasets (digits, IDX, CIFAR) are small and held in memory. Image folders and
Parquet datasets go through the data plane (raycurv.data.plane): ``prepare_dataset`` lists them
without decoding a pixel, and ``materialize`` writes the prepared dataset to storage through Ray
Data, from where training and the curvature actors stream it."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raycurv.config import MAX_CLASSES, DataSpec
from raycurv.data import plane
from raycurv.data.noise import apply_noise, pick_duplicates
from raycurv.data.sources import SOURCES, RawImages, load_source
from raycurv.errors import UsageError
from raycurv.progress import counted

PLANE_SOURCES = ("imagefolder", "parquet")  # streamed through the data plane, never held whole

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
    images: np.ndarray | None  # (N, C, H, W) uint8 or float32; None: in ``store``
    labels: np.ndarray  # (N,) int64: the labels trained on (after noise)
    original_labels: np.ndarray  # (N,) int64: before noise (a duplicate: its source's label)
    corrupted: np.ndarray  # (N,) bool: label changed by injected noise
    duplicate_of: np.ndarray  # (N,) int64: sample_id an injected duplicate copies, else -1
    num_classes: int
    norm: Normalization | None  # raw images -> network input (None until materialized)
    augment: bool
    flip: bool
    fingerprint: str
    # the data plane: where each image comes from, and the prepared dataset once written
    refs: pa.Table | None = None  # N rows (raycurv.data.plane.SourceIndex.refs)
    shape: tuple[int, int, int] | None = None  # (C, H, W) after resizing
    image_size: tuple[int, int] | None = None
    image_column: str = "image"
    store: plane.Store | None = None
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:]) if self.images is not None else tuple(self.shape)

    @property
    def paths(self) -> list[str] | None:
        """The source file (or Parquet row, or path column) of each sample, where there is one."""
        if self.refs is not None:
            return plane.ref_paths(self.refs).to_pylist()
        return None if self.store is None else list(self.store.read_rows(0, len(self), columns=("path",))["path"])

    def image_at(self, position: int) -> np.ndarray:
        """One image (C, H, W), reading only its part of a prepared dataset."""
        if self.images is not None:
            return self.images[position]
        return (self.store.read_rows(position, position + 1)["image"][0] if self.store is not None
                else self.load_images()[position])

    def load_images(self) -> np.ndarray:
        """(N, C, H, W) images in memory: the in-memory array, or the whole prepared dataset
        read back (for small-data tools: duplicate search, reports of small runs)."""
        if self.images is not None:
            return self.images
        if self.store is None:  # not prepared yet: decoded here, in this process
            return np.stack(plane.decode_refs(self.refs, image_column=self.image_column,
                                              size=self.image_size))
        return self.store.read_rows(0, len(self))["image"]


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


@dataclass(frozen=True)
class _Selection:
    """Which source positions a run uses, and its labels: the seeded ``limit`` subset (``keep``),
    then ``duplicates`` copies of kept samples (``copies``: positions into ``keep``)."""

    keep: np.ndarray  # (M,) source positions, increasing
    copies: np.ndarray  # (D,) positions into keep
    sample_ids: np.ndarray  # (M + D,)
    labels: np.ndarray  # (M + D,) after noise; copies carry a conflicting label
    original: np.ndarray  # (M + D,)
    corrupted: np.ndarray  # (M + D,)
    duplicate_of: np.ndarray  # (M + D,) sample_id a copy copies, else -1


def _select(labels: np.ndarray, spec: DataSpec, *, seed: int, num_classes: int) -> _Selection:
    """Limit, noise and duplicates, decided from the labels and the seed alone."""
    n = len(labels)
    if spec.limit is not None and spec.limit > n:
        raise UsageError(f"--limit {spec.limit} exceeds the {n} samples of {spec.dataset}")
    keep = np.arange(n, dtype=np.int64)
    if spec.limit is not None and spec.limit < n:
        keep = np.sort(np.random.default_rng([seed, 0x6C696D]).choice(n, spec.limit, replace=False))
    kept = labels[keep]
    noisy = apply_noise(kept, rate=spec.noise, kind=spec.noise_kind, num_classes=num_classes,
                        seed=seed)
    copies = np.empty(0, dtype=np.int64)
    conflicting = np.empty(0, dtype=np.int64)
    if spec.duplicates:
        if spec.duplicates > len(kept):
            raise UsageError(f"--duplicates {spec.duplicates} exceeds the {len(kept)} samples")
        copies, conflicting = pick_duplicates(noisy, count=spec.duplicates,
                                              num_classes=num_classes, seed=seed)
    new_ids = keep.max() + 1 + np.arange(len(copies), dtype=np.int64)
    corrupted = np.concatenate([noisy != kept, np.zeros(len(copies), dtype=bool)])
    return _Selection(
        keep=keep, copies=copies, sample_ids=np.concatenate([keep, new_ids]),
        labels=np.concatenate([noisy, conflicting]).astype(np.int64),
        original=np.concatenate([kept, kept[copies]]).astype(np.int64), corrupted=corrupted,
        duplicate_of=np.concatenate([np.full(len(keep), -1, dtype=np.int64), keep[copies]]))


def prepare_dataset(spec: DataSpec, *, seed: int) -> Prepared:
    """Load ``spec.dataset``, keep a seeded ``limit`` subset, inject noise and duplicates.

    Deterministic in (spec, seed). Raises UsageError for anything the user can fix, including
    more than ``spec.max_classes`` classes and a ``limit`` above the dataset's size. A data-plane
    source (image folder, Parquet) is listed, not decoded: ``materialize`` writes its images.
    """
    if spec.dataset in PLANE_SOURCES:
        return _prepare_indexed(spec, seed=seed)
    raw = load_source(spec.dataset, root=spec.data_root, download=spec.download,
                      image_column=spec.image_column, label_column=spec.label_column)
    validate_raw(raw, spec.dataset, max_classes=spec.max_classes)
    chosen = _select(raw.labels, spec, seed=seed, num_classes=raw.num_classes)
    images = raw.images[chosen.keep]
    mean, std = (raw.mean, raw.std) if raw.mean is not None else _channel_stats(images, raw.scale)
    return Prepared(
        name=spec.dataset, sample_ids=chosen.sample_ids,
        images=np.ascontiguousarray(np.concatenate([images, images[chosen.copies]])),
        labels=chosen.labels, original_labels=chosen.original, corrupted=chosen.corrupted,
        duplicate_of=chosen.duplicate_of, num_classes=raw.num_classes,
        norm=Normalization(scale=raw.scale, mean=tuple(mean), std=tuple(std)),
        augment=raw.augment if spec.augment is None else spec.augment, flip=raw.flip,
        fingerprint=_fingerprint(images, raw.labels[chosen.keep], chosen.keep),
    )


def _prepare_indexed(spec: DataSpec, *, seed: int) -> Prepared:
    """A data-plane source: listed and checked (sizes, labels) before anything is written."""
    index = plane.index_source(spec.dataset, spec.data_root, image_column=spec.image_column,
                               label_column=spec.label_column, path_column=spec.path_column)
    raw = RawImages(np.empty((len(index.labels), 1, 1, 1), np.uint8), index.labels,
                    index.num_classes, 255.0)
    validate_raw(raw, spec.dataset, max_classes=spec.max_classes)
    chosen = _select(index.labels, spec, seed=seed, num_classes=index.num_classes)
    rows = np.concatenate([chosen.keep, chosen.keep[chosen.copies]])
    refs = index.refs.take(pa.array(rows))
    size = plane.parse_image_size(spec.image_size)
    plane.check_images(refs, image_column=spec.image_column, size=size)
    shape = plane.probe_shape(refs, image_column=spec.image_column, size=size)
    digest = hashlib.sha256(f"{index.fingerprint}/{spec.image_size}".encode())
    digest.update(chosen.keep.tobytes())
    return Prepared(
        name=spec.dataset, sample_ids=chosen.sample_ids, images=None, labels=chosen.labels,
        original_labels=chosen.original, corrupted=chosen.corrupted,
        duplicate_of=chosen.duplicate_of, num_classes=index.num_classes, norm=None,
        # crop + flip by default for photos in folders; Parquet data may be anything (digits...)
        augment=(spec.dataset == "imagefolder") if spec.augment is None else spec.augment, flip=True,
        fingerprint=digest.hexdigest()[:16], refs=refs, shape=shape, image_size=size,
        image_column=spec.image_column, class_names=index.class_names)


def in_memory(data: Prepared) -> Prepared:
    """``data`` with every image in memory and normalization measured on all of them, as the
    built-ins are: for tools that work on small datasets only (the Feldman-Zhang reference)."""
    if data.images is not None:
        return data
    images = data.load_images()
    mean, std = _channel_stats(images, 255.0)
    return dataclasses.replace(data, images=images, store=None,
                               norm=Normalization(scale=255.0, mean=mean, std=std))


def materialize(data: Prepared, location: str, *, seed: int) -> Prepared:
    """``data`` with its prepared dataset at ``location``: written there through Ray Data unless
    a complete one is there already (a resumed run). In-memory datasets are returned as they are."""
    if data.images is not None or data.store is not None:
        return data
    store = plane.Store.open(location)
    if store is None:
        parts = plane.part_count(len(data))
        with counted(f"dataset preparation ({len(data)} images)", parts, unit="part") as done:
            store = plane.write_store(location, sample_ids=data.sample_ids, labels=data.labels,
                                      refs=data.refs, image_column=data.image_column,
                                      size=data.image_size, seed=seed, on_part=done)
    return attach_store(data, store)


def attach_store(data: Prepared, store: plane.Store) -> Prepared:
    """``data`` reading its images from ``store`` (normalized by the store's statistics). The
    listing (``refs``) is dropped: the store holds each sample's path, and the driver keeps N
    rows less."""
    if len(store) != len(data):
        raise UsageError(f"the prepared dataset at {store.location} holds {len(store)} samples, "
                         f"the run {len(data)}")
    return dataclasses.replace(data, store=store, refs=None,
                               norm=Normalization(scale=255.0, mean=store.mean, std=store.std))
