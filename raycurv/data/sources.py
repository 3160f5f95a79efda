"""Dataset sources: each returns the training split in its canonical order.

A source returns a `RawImages`: ``images`` (N, C, H, W), uint8 or float32, with ``scale`` the value
of full intensity (so ``images / scale`` lies in [0, 1]), ``labels`` (N,) int64 in [0, classes).
sample_id is the index in this order. No source downloads anything unless asked to (``download``).

Every file under ``--data-root`` is untrusted input: nothing here runs code from it (CIFAR's pickles
go through an unpickler that admits numpy arrays and nothing else), and malformed files are one-line
UsageErrors, not tracebacks.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from raycurv.errors import UsageError


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name if it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
    from sklearn.datasets import load_digits  # seconds to import; only the digits source needs it

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    return RawImages(images, bunch.target.astype(np.int64), 10, 16.0, (0.3053,), (0.3760,),
                     augment=False, flip=False)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UsageError(f"{path} is not a valid gzip file: {_first_line(exc)}") from None


def _idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(element dtype, dims) from the header: magic 0x0000TTDD, then D big-endian int32 dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UsageError(f"{path} is not an IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UsageError(f"{path} has a truncated IDX header: {ndim} dims need {4 + 4 * ndim} "
                         f"bytes, the file holds {len(raw)}")
    dims = struct.unpack_from(f">{ndim}i", raw, 4)
    if any(d < 0 for d in dims):
        raise UsageError(f"{path} has negative IDX dims {dims}")
    return np.dtype(_IDX_DTYPES[raw[2]]), dims


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into an array of its dims; the data after the header
    must be exactly what the dims describe (short: truncated; long: dims that do not match)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, path)
    dtype, dims = _idx_header(raw, path)
    offset = 4 + 4 * len(dims)
    need, have = math.prod(dims) * dtype.itemsize, len(raw) - offset  # Python ints: no overflow
    if have != need:
        problem = "is truncated" if have < need else "has data past what its dims describe"
        raise UsageError(f"{path} {problem}: dims {dims} need {need} bytes of data, it holds {have}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


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
            raise UsageError(f"IDX files under {folder} do not hold N images and N labels: dims "
                             f"{images.shape} and {labels.shape}")
        return RawImages(np.ascontiguousarray(images[:, None]), labels.astype(np.int64), 10, 255.0,
                         (mean,), (std,), augment=False)

    return load


# --- CIFAR python pickles -------------------------------------------------------------------

def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array or scalar names, under numpy 1's ``numpy.core`` and
    numpy 2's ``numpy._core``: ``_reconstruct``, ``ndarray`` and ``dtype`` (protocols 0-4, and
    CIFAR's own Python 2 files), ``scalar`` (numpy ints in a label list), ``_frombuffer``
    (protocol 5). Each only rebuilds an array or scalar from bytes; none runs anything else."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                              ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_CIFAR_GLOBALS = _numpy_pickle_globals()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR python batch holds: dicts, lists, bytes, numbers, numpy arrays.

    ``find_class`` is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ
    and the EXT opcodes all go through it), so refusing every global but numpy's array
    rebuilders means a planted pickle cannot run code.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # CIFAR's Python 2 str keys and data as bytes
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise UsageError(f"refusing to unpickle {self.path}: it names {module}.{name}, which "
                             "a CIFAR batch never holds (only numpy arrays are admitted)")
        return _CIFAR_GLOBALS[(module, name)]


def _unpickle_batch(path: Path) -> object:
    """The object pickled in ``path``, through `_CifarUnpickler`; a corrupt file is a UsageError."""
    try:
        with open(path, "rb") as fh:
            return _CifarUnpickler(fh, path).load()
    except UsageError:
        raise
    except Exception as exc:  # anything a corrupt pickle raises: EOFError, UnpicklingError, ...
        raise UsageError(f"{path} is not a CIFAR python batch: {_first_line(exc)}") from None


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images (n, 3, 32, 32) uint8 and labels (n,) int64.

    The file holds a dict: ``b"data"`` a uint8 array (n, 3072), rows of R, G, B planes of 32x32,
    and ``label_key`` a list of n integers.
    """
    batch = _unpickle_batch(path)
    if not isinstance(batch, dict):
        raise UsageError(f"{path} holds {_describe(batch)}, not a CIFAR batch dict")
    missing = [repr(key) for key in (b"data", label_key) if key not in batch]
    if missing:
        raise UsageError(f"{path} has no {' or '.join(missing)} entry; it has "
                         f"{', '.join(map(repr, list(batch)[:6]))}")
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise UsageError(f"{path}: b'data' is {_describe(data)}, expected a uint8 array (N, 3072)")
    try:
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError):
        labels = None
    if labels is None or labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise UsageError(f"{path}: {label_key!r} is {_describe(batch[label_key])}, expected "
                         f"{len(data)} integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_source(folder_name: str, files: list[str], label_key: bytes, classes: int,
                  mean: tuple[float, ...], std: tuple[float, ...], tv_name: str):
    def load(root: str | None, download: bool) -> RawImages:
        if root is None:
            raise UsageError(f"--data-root is required for {folder_name} (the folder holding "
                             f"{folder_name}/ or its batch files; --download fetches it)")
        base = Path(root)
        if download:
            import torchvision.datasets as tvd  # only for --download

            getattr(tvd, tv_name)(str(base), train=True, download=True)
        folder = base / folder_name if (base / folder_name).is_dir() else base
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} under {folder}; put the python-pickle "
                             f"{folder_name} there or pass --download")
        images, labels = zip(*(_cifar_batch(folder / name, label_key) for name in files),
                             strict=True)
        return RawImages(np.concatenate(images), np.concatenate(labels), classes, 255.0,
                         mean, std, augment=True)

    return load


# --- image folders and Parquet --------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB"))
    except Exception as exc:
        raise UsageError(f"cannot decode image {where}: {exc}") from None
    return arr


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    """Stack (H, W) or (H, W, C) images into (N, C, H, W); all must share one shape."""
    if not arrays:
        raise UsageError(f"no images in {where}")
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


def _cell_image(value: object, where: str) -> np.ndarray:
    """One image cell: encoded bytes (or a struct with ``bytes``) decoded to (H, W[, C]), or
    nested lists of numbers as an array; null, string, ragged or non-numeric cells are refused."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray):
        return _decode(bytes(value), where)
    if value is None:
        raise UsageError(f"{where}: image is null")
    if isinstance(value, str):
        raise UsageError(f"{where}: image is a string; expected encoded image bytes or nested "
                         "lists of numbers")
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses inhomogeneous nesting
        raise UsageError(f"{where}: image is ragged (nested lists of different lengths)") from None
    if array.dtype.kind not in "buif":  # strings, or object: nulls or mixed types inside
        raise UsageError(f"{where}: image holds non-numeric values ({array.dtype}); expected "
                         "numbers")
    return array


def _parquet_labels(column, name: str, root: str) -> np.ndarray:
    """The label column (N,) as int64; nulls and non-integer types are refused."""
    if column.null_count:
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise UsageError(f"label column {name!r} of {root} has {column.null_count} null(s), "
                         f"first in row {first}")
    labels = column.to_numpy(zero_copy_only=False)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"label column {name!r} of {root} is not integer")
    return labels.astype(np.int64)


def _parquet(root: str | None, download: bool, *, image_column: str = "image",
             label_column: str = "label") -> RawImages:
    """A Parquet file: an image column (encoded bytes, a struct with `bytes`, or nested arrays)
    and an integer label column. Arrays hold raw intensities: uint8 (0..255) or floats in [0, 1]."""
    if root is None or not Path(root).is_file():
        raise UsageError(f"--data-root must name a Parquet file for the parquet source (got {root})")
    try:
        table = pq.read_table(root, columns=[image_column, label_column])
    except Exception as exc:
        raise UsageError(f"cannot read columns {image_column!r}, {label_column!r} from {root}: "
                         f"{_first_line(exc)}") from None
    arrays = [_cell_image(value, f"{root} row {i}")
              for i, value in enumerate(table.column(image_column).to_pylist())]
    images = _stack(arrays, root)
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    labels = _parquet_labels(table.column(label_column), label_column, root)
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
