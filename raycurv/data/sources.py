"""Dataset sources: each returns the training split in its canonical order.

A source returns a `RawImages`: ``images`` (N, C, H, W), uint8 or float32, with ``scale`` the value
of full intensity (so ``images / scale`` lies in [0, 1]), ``labels`` (N,) int64 in [0, classes).
sample_id is the index in this order. No source downloads anything unless asked to (``download``).
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycurv.errors import UsageError


@dataclass
class RawImages:
    images: np.ndarray  # (N, C, H, W) uint8 or float32
    labels: np.ndarray  # (N,) int64
    num_classes: int
    scale: float  # images / scale lies in [0, 1]
    mean: tuple[float, ...] | None = None  # per channel, of images / scale; None: measure it
    std: tuple[float, ...] | None = None
    augment: bool = False  # the dataset's default for training-time crop + flip
    flip: bool = True  # whether horizontal flips keep the class (not for digits)


def _digits(root: str | None, download: bool) -> RawImages:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    return RawImages(images, bunch.target.astype(np.int64), 10, 16.0, (0.3053,), (0.3760,),
                     augment=False, flip=False)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic 0x0000TTDD, D big-endian int32 dims, data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UsageError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise UsageError(f"{path} is truncated")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _find_file(root: Path, stems: list[str], hint: str) -> Path:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise UsageError(f"no {stems[0]}[.gz] under {root}; {hint}")


def _idx_source(default_root: str | None, hint: str, mean: float, std: float):
    def load(root: str | None, download: bool) -> RawImages:
        if root is None and default_root is None:
            raise UsageError(f"--data-root is required; {hint}")
        folder = Path(root or default_root)
        images = read_idx(_find_file(folder, ["train-images-idx3-ubyte", "train-images.idx3-ubyte"], hint))
        labels = read_idx(_find_file(folder, ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"], hint))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(f"IDX files under {folder} do not hold N images and N labels")
        return RawImages(np.ascontiguousarray(images[:, None]), labels.astype(np.int64), 10, 255.0,
                         (mean,), (std,), augment=False)

    return load


# --- CIFAR python pickles -------------------------------------------------------------------

def _cifar_source(folder_name: str, files: list[str], label_key: bytes, classes: int,
                  mean: tuple[float, ...], std: tuple[float, ...], tv_name: str):
    def load(root: str | None, download: bool) -> RawImages:
        if root is None:
            raise UsageError(f"--data-root is required for {folder_name} (the folder holding "
                             f"{folder_name}/ or its batch files; --download fetches it)")
        base = Path(root)
        if download:
            import torchvision.datasets as tvd

            getattr(tvd, tv_name)(str(base), train=True, download=True)
        folder = base / folder_name if (base / folder_name).is_dir() else base
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} under {folder}; put the python-pickle "
                             f"{folder_name} there or pass --download")
        images, labels = [], []
        for name in files:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        return RawImages(np.concatenate(images), np.concatenate(labels), classes, 255.0,
                         mean, std, augment=True)

    return load


# --- image folders and Parquet --------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB"))
    except Exception as exc:
        raise UsageError(f"cannot decode image {where}: {exc}") from None
    return arr


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    """Stack (H, W) or (H, W, C) images into (N, C, H, W); all must share one shape."""
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UsageError(f"images in {where} differ in shape ({', '.join(map(str, sorted(shapes)[:3]))}); "
                         "resize them to one size first")
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]
    elif stacked.ndim == 4 and stacked.shape[-1] in (1, 3, 4) and stacked.shape[1] not in (1, 3):
        stacked = stacked.transpose(0, 3, 1, 2)
    if stacked.ndim != 4:
        raise UsageError(f"images in {where} have shape {stacked.shape[1:]}, expected (H, W[, C])")
    return np.ascontiguousarray(stacked)


def _imagefolder(root: str | None, download: bool) -> RawImages:
    """class-per-folder images: root/<class>/<file>; classes and files in sorted order."""
    if root is None:
        raise UsageError("--data-root is required for imagefolder (root/<class>/<image files>)")
    base = Path(root)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise UsageError(f"no class folders under {base} (expected {base}/<class>/<image files>)")
    arrays, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((base / cls).iterdir()):
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                arrays.append(_decode(path.read_bytes(), str(path)))
                labels.append(label)
    if not arrays:
        raise UsageError(f"no image files under {base}/<class>/")
    images = _stack(arrays, str(base))
    return RawImages(images, np.asarray(labels, dtype=np.int64), len(classes), 255.0,
                     augment=True)


def _parquet(root: str | None, download: bool, *, image_column: str = "image",
             label_column: str = "label") -> RawImages:
    """A Parquet file: an image column (encoded bytes, a struct with `bytes`, or nested arrays)
    and an integer label column. Arrays hold raw intensities: uint8 (0..255) or floats in [0, 1]."""
    import pyarrow.parquet as pq

    if root is None or not Path(root).is_file():
        raise UsageError(f"--data-root must name a Parquet file for the parquet source (got {root})")
    try:
        table = pq.read_table(root, columns=[image_column, label_column])
    except Exception as exc:
        raise UsageError(f"cannot read columns {image_column!r}, {label_column!r} from {root}: "
                         f"{str(exc).splitlines()[0]}") from None
    column = table.column(image_column).to_pylist()
    arrays = []
    for i, value in enumerate(column):
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, bytes | bytearray):
            arrays.append(_decode(bytes(value), f"{root} row {i}"))
        elif value is None:
            raise UsageError(f"{root} row {i}: image is null")
        else:
            arrays.append(np.asarray(value))
    images = _stack(arrays, root)
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    labels = table.column(label_column).to_numpy(zero_copy_only=False)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"label column {label_column!r} of {root} is not integer")
    labels = labels.astype(np.int64)
    classes = int(labels.max()) + 1 if len(labels) else 0
    return RawImages(images, labels, classes, 255.0 if images.dtype == np.uint8 else 1.0,
                     augment=False)


_FMNIST_HINT = ("on Debian: apt-get install dataset-fashion-mnist, or pass --data-root "
                "with the train-*-ubyte files")
_MNIST_HINT = "pass --data-root with MNIST's train-images-idx3-ubyte and train-labels-idx1-ubyte"

SOURCES: dict[str, Callable[..., RawImages]] = {
    "digits": _digits,
    "fashion-mnist": _idx_source("/usr/share/datasets/fashion-mnist", _FMNIST_HINT, 0.2860, 0.3530),
    "mnist": _idx_source(None, _MNIST_HINT, 0.1307, 0.3081),
    "cifar10": _cifar_source("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                             b"labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                             "CIFAR10"),
    "cifar100": _cifar_source("cifar-100-python", ["train"], b"fine_labels", 100,
                              (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100"),
    "imagefolder": _imagefolder,
    "parquet": _parquet,
}


def load_source(name: str, *, root: str | None = None, download: bool = False,
                image_column: str = "image", label_column: str = "label") -> RawImages:
    """Load a source by name; an unknown name is a UsageError listing the valid ones."""
    if name not in SOURCES:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")
    if name == "parquet":
        return _parquet(root, download, image_column=image_column, label_column=label_column)
    return SOURCES[name](root, download)
