"""The data plane for large datasets: image folders and Parquet datasets, local or on object storage,
streamed through Ray Data into a prepared dataset that no process holds whole.

1. ``index_source`` lists the samples (never decoding an image): an image folder's files in sorted
   order, or a Parquet dataset's rows in file order (a file, a folder, a glob, a URI; several files).
   Each sample gets its ``sample_id`` from that order, its label, and a ``path`` that joins results
   back to the user's files. Label noise and duplicates are then decided on these columns alone.
2. ``write_store`` decodes and resizes the images in parallel (Ray Data maps over chunks of rows)
   into a prepared dataset: Parquet parts of bounded size, in sample order, plus a manifest
   (shape, row counts, per-part hashes, normalization statistics from a seeded sample).
3. Training reads it through Ray Train's dataset integration (``Store.dataset``); each curvature
   actor reads only its own rows (``Store.read_rows``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raycurv import storage
from raycurv.data.sources import _cell_image, _decode, _parquet_labels
from raycurv.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROWS_PER_PART = 4096  # ~12 MB of 32x32x3 images; ImageNet at 224x224: ~600 MB a part
STATS_SAMPLE = 10_000  # images the normalization statistics are measured on
# logical CPUs each Ray Data read task of a streamed prepared dataset asks for, and what a run
# reserves for them beside its training workers and actors (reading Parquet parts is light work)
READ_TASK_CPUS = 0.25
STREAM_CPUS = 0.5
CHECKED_ROWS = 64  # rows of each Parquet file decoded before anything is written
CHECKED_FILES = 512  # image files whose sizes are read before anything is written
HEADER_BYTES = 256 << 10  # of each: enough for the header of a PNG or a JPEG with its EXIF block
MANIFEST = "manifest.json"
STORE_SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("image", pa.binary(), nullable=False),  # C*H*W uint8, C-order (shape in the manifest)
])


# --- 1. the index: which samples, where, with which label ------------------------------------

@dataclass(frozen=True)
class SourceIndex:
    """The samples of a source in canonical order, without their pixels. ``refs`` says where each
    image is: ``path`` for an image file, or ``file`` and ``row`` of a Parquet row (and ``path``
    where the data has a path column; else ref_paths spells it ``file#row``)."""

    labels: np.ndarray  # (N,) int64
    refs: pa.Table  # N rows: path (str; Parquet: only with a path column), file (str), row (int64)
    num_classes: int
    class_names: tuple[str, ...] | None
    fingerprint: str  # of the listing: names, sizes and labels (changes when the data does)


def index_source(name: str, root: str | None, *, image_column: str, label_column: str,
                 path_column: str | None) -> SourceIndex:
    """List ``root`` for source ``name`` ("imagefolder" or "parquet"). Raises UsageError."""
    if root is None:
        raise UsageError(f"--data-root is required for {name}")
    try:
        if name == "imagefolder":
            return _index_imagefolder(root)
        return _index_parquet(root, image_column, label_column, path_column)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"cannot read {root}: {str(exc).splitlines()[0]}") from None


def _index_imagefolder(root: str) -> SourceIndex:
    """root/<class>/<image>: classes and files in sorted order; class = folder position."""
    classes = [d.rstrip("/").rsplit("/", 1)[-1] for d in storage.list_dirs(root)]
    paths, labels, sizes = [], [], []
    for label, cls in enumerate(classes):
        for path, size in storage.list_files_with_sizes(storage.join(root, cls)):
            if path.lower().endswith(IMAGE_SUFFIXES):
                paths.append(path)
                labels.append(label)
                sizes.append(size)
    if not paths:
        raise UsageError(f"no image files under {root}/<class>/ (expected {root}/<class>/<image files>)")
    labels = np.asarray(labels, dtype=np.int64)
    digest = _digest(["/".join(p.rsplit("/", 2)[-2:]) for p in paths], sizes, labels)
    refs = pa.table({"path": pa.array(paths, pa.string())})
    return SourceIndex(labels, refs, len(classes), tuple(classes), digest)


def parquet_files(root: str) -> list[str]:
    """The Parquet files of a file, a folder (recursively) or a glob, local or a URI, sorted."""
    if any(ch in root for ch in "*?["):
        folder, _, pattern = root.rpartition("/")
        found = [f for f in storage.list_files(folder or ".") if fnmatch.fnmatch(f, root)]
    elif storage.is_dir(root):
        found = [f for f in storage.list_files(root, recursive=True) if f.endswith(".parquet")]
    else:
        found = [root] if storage.is_file(root) else []
    if not found:
        raise UsageError(f"no Parquet files at {root} (give a file, a folder or a glob)")
    return sorted(found)


def _index_parquet(root: str, image_column: str, label_column: str,
                   path_column: str | None) -> SourceIndex:
    """The rows of every file, in file order; only the label (and path) columns are read. The
    listing stays in Arrow: ``file`` dictionary-encoded and ``row``, plus ``path`` where the data
    has a path column (else ref_paths spells it ``file#row`` where one is written), so a million
    rows cost a few bytes each, not Python objects."""
    files, labels, counts, paths = parquet_files(root), [], [], []
    wanted = [label_column, *([path_column] if path_column else [])]
    for file in files:
        schema = storage.parquet_schema(file)
        missing = [c for c in (image_column, *wanted) if c not in schema.names]
        if missing:
            raise UsageError(f"{file} has no column {missing[0]!r}; it has {', '.join(schema.names)}")
        table = storage.read_parquet(file, columns=wanted)
        labels.append(_parquet_labels(table.column(label_column), label_column, file))
        counts.append(table.num_rows)
        if path_column:
            paths.append(pc.cast(table.column(path_column), pa.string()))
    labels = np.concatenate(labels)
    if len(labels) == 0:
        raise UsageError(f"no images in the Parquet files at {root}")
    file = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(files), dtype=np.int32), counts)), pa.array(files, pa.string()))
    refs = pa.table({"file": file, "row": pa.array(np.concatenate(
        [np.arange(c, dtype=np.int64) for c in counts]))})
    if path_column:  # else spelled file#row where needed (ref_paths): ~50 bytes a row less here
        refs = refs.append_column("path", pa.chunked_array(
            [c for chunked in paths for c in chunked.chunks], pa.string()))
    listed = [f for f, k in zip(files, counts, strict=True) if k]  # files holding rows
    digest = _digest(listed, [storage.size(f) for f in listed], labels)
    return SourceIndex(labels, refs, int(labels.max()) + 1, None, digest)


def _digest(names: list[str], sizes: list[int], labels: np.ndarray) -> str:
    """A listing's fingerprint: file names (relative where they can be), sizes and labels."""
    h = hashlib.sha256(json.dumps([names, sizes]).encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


# --- 2. decoding and writing the prepared dataset --------------------------------------------

def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'32' -> (32, 32); '24x32' -> (24, 32) as (height, width); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise UsageError(f"--image-size must look like 32 or 24x32 (height x width), got {text!r}")
    return (size[0], size[-1])


def _to_chw(image: np.ndarray, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """(H, W) or (H, W, C) -> uint8 (C, H, W), resized to ``size`` (bilinear) when given. Float
    pixels are intensities in [0, 1], integer ones in 0..255."""
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise UsageError(f"non-finite pixel values in {where}")
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if size is not None and image.shape[:2] != size:
        mode = "L" if image.ndim == 2 else "RGB"
        image = np.asarray(Image.fromarray(image if image.ndim == 2 or image.shape[-1] == 3
                                           else image[..., :3], mode)
                           .resize((size[1], size[0]), Image.BILINEAR))
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3].transpose(2, 0, 1) if image.shape[-1] != 1 else image.transpose(2, 0, 1)
    else:
        raise UsageError(f"{where}: image has shape {image.shape}, expected (H, W[, C])")
    return np.ascontiguousarray(image)


def ref_paths(refs: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Where each of ``refs``' rows comes from, as strings: its ``path`` (an image file, or the
    Parquet data's path column), else ``file#row`` of its Parquet row."""
    if "path" in refs.column_names:
        return refs.column("path")
    return pc.binary_join_element_wise(pc.cast(refs.column("file"), pa.string()),
                                       pc.cast(refs.column("row"), pa.string()), "#")


def decode_refs(refs: pa.Table, *, image_column: str, size: tuple[int, int] | None) -> list[np.ndarray]:
    """The images of ``refs`` rows as uint8 (C, H, W) arrays, in order."""
    if "file" not in refs.column_names:
        return [_to_chw(_decode(storage.read_bytes(p) or b"", p), size, p)
                for p in refs.column("path").to_pylist()]
    out: list[np.ndarray | None] = [None] * refs.num_rows
    files, rows = np.asarray(refs.column("file").to_pylist()), refs.column("row").to_numpy()
    for file in dict.fromkeys(files.tolist()):
        mine = np.flatnonzero(files == file)
        cells = storage.read_parquet_rows(file, image_column, rows[mine])
        for i, cell in zip(mine, cells, strict=True):
            where = f"{file} row {rows[i]}"
            out[i] = _to_chw(_cell_image(cell, where), size, where)
    return out


@dataclass(frozen=True)
class Store:
    """A prepared dataset: Parquet parts in sample order under ``location``, and its manifest."""

    location: str
    parts: tuple[str, ...]  # part file names, in order
    rows: tuple[int, ...]  # rows per part
    shape: tuple[int, int, int]  # (C, H, W) of every image
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str  # of the content: the parts' hashes, in order

    def __len__(self) -> int:
        return sum(self.rows)

    @classmethod
    def open(cls, location: str) -> Store | None:
        """The store at ``location``, or None when none was written there (completely)."""
        raw = storage.read_bytes(storage.join(location, MANIFEST))
        if raw is None:
            return None
        m = json.loads(raw)
        return cls(location, tuple(m["parts"]), tuple(m["rows"]), tuple(m["shape"]),
                   tuple(m["mean"]), tuple(m["std"]), m["fingerprint"])

    def part_locations(self) -> list[str]:
        return [storage.join(self.location, p) for p in self.parts]

    def read_rows(self, start: int, stop: int, *, columns: tuple[str, ...] = ("sample_id", "label", "image"),
                  read=None) -> dict[str, np.ndarray]:
        """Rows [start, stop) (positions in sample order) of ``columns``: sample_id, label, image
        (B, C, H, W) uint8. Reads only the parts that hold them (``read``: part location ->
        table, to cache parts)."""
        read = read or (lambda location: storage.read_parquet(location, columns=list(columns)))
        out: dict[str, list] = {c: [] for c in columns}
        first = 0
        for location, count in zip(self.part_locations(), self.rows, strict=True):
            a, b = max(start, first), min(stop, first + count)
            if a < b:
                table = read(location).slice(a - first, b - a)
                for c in columns:
                    out[c].append(images_of(table.column(c), self.shape) if c == "image"
                                  else table.column(c).to_numpy())
            first += count
        return {c: np.concatenate(v) if v else np.empty(0) for c, v in out.items()}

    def dataset(self, *, multiple_of: int = 1):
        """The prepared dataset as a Ray Dataset (sample_id, label, image), in sample order: one
        light read task per part (the parts are known, so nothing lists files). ``multiple_of``:
        the first rows are read again at the end to make the row count a multiple of it (Ray
        Train splits a dataset among its workers in equal shares and would drop the remainder,
        so a sample would go untrained)."""
        import ray.data

        items = [{"part": p, "take": -1} for p in self.part_locations()]
        extra = -len(self) % multiple_of
        if extra:
            items.append({"part": self.part_locations()[0], "take": extra})
        return (ray.data.from_items(items)
                .map_batches(_read_parts, batch_size=1, batch_format="pyarrow",
                             num_cpus=READ_TASK_CPUS))


class StoreImages:
    """The images of rows [start, stop) of a store, sliced like an array ((n, C, H, W) uint8):
    ``view[a:b]`` reads only the parts that hold rows a..b, keeping the last part read, since a
    scoring pass walks each part in several batches. So a curvature actor streams its shard
    instead of holding it."""

    def __init__(self, store: Store, start: int, stop: int) -> None:
        self.store, self.start, self.stop = store, start, stop
        self._cached: tuple[str, pa.Table] | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.store.shape)

    def _read(self, location: str) -> pa.Table:
        cached = self._cached  # one read of the attribute: safe when threads share the view
        if cached is None or cached[0] != location:
            cached = self._cached = (location, storage.read_parquet(location, columns=["image"]))
        return cached[1]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(len(self))
        return self.store.read_rows(self.start + a, self.start + b, columns=("image",),
                                    read=self._read)["image"]


def _read_parts(batch: pa.Table) -> pa.Table:
    """Ray Data map: the rows of the parts named in ``batch`` (sample_id, label, image); ``take``
    >= 0: only that many of a part's first rows."""
    tables = [storage.read_parquet(p, columns=["sample_id", "label", "image"])
              for p in batch.column("part").to_pylist()]
    return pa.concat_tables([t if k < 0 else t.slice(0, k)
                             for t, k in zip(tables, batch.column("take").to_pylist(), strict=True)])


def images_of(column, shape: tuple[int, int, int]) -> np.ndarray:
    """A column of raw image bytes (Arrow, numpy object array or list) -> uint8 (B, C, H, W). An
    Arrow binary column is read through its buffers, without a Python object per image (a
    read-only view of Arrow's memory)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.BinaryArray | pa.LargeBinaryArray) and not column.null_count:
        width = np.int64 if isinstance(column, pa.LargeBinaryArray) else np.int32
        offsets = np.frombuffer(column.buffers()[1], width)[column.offset:column.offset + len(column) + 1]
        flat = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if len(column) else \
            np.empty(0, np.uint8)
        view = flat.reshape(len(column), *shape)
        view.flags.writeable = False  # Arrow's memory
        return view
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    flat = np.frombuffer(b"".join(values), dtype=np.uint8)
    return flat.reshape(len(values), *shape)


def _write_part(chunk: dict, *, rows: list, settings: dict) -> dict:
    """Ray Data map: decode rows [start, stop) of the listing (``rows[0]``, an object ref to an
    Arrow table: sample_id, label and the refs columns) and write them as one part; returns its
    row count and hash."""
    import ray

    listing = ray.get(rows[0]).slice(chunk["start"], chunk["stop"] - chunk["start"])
    images = decode_refs(listing, image_column=settings["image_column"], size=settings["size"])
    shape = settings["shape"]
    if any(im.shape != shape for im in images):
        bad = next(i for i, im in enumerate(images) if im.shape != shape)
        raise UsageError(f"{ref_paths(listing)[bad].as_py()} has shape {images[bad].shape}, the "
                         f"first image {shape}: pass --image-size to resize them")
    sample_ids = listing.column("sample_id").to_numpy()
    table = pa.table({"sample_id": listing.column("sample_id"), "label": listing.column("label"),
                      "path": ref_paths(listing),
                      "image": pa.array([im.tobytes() for im in images], pa.binary())},
                     schema=STORE_SCHEMA)
    storage.write_parquet(storage.join(settings["location"], chunk["part"]), table)
    digest = hashlib.sha256(np.concatenate([sample_ids.astype(np.int64).view(np.uint8),
                                            np.frombuffer(b"".join(im.tobytes() for im in images),
                                                          np.uint8)])).hexdigest()
    return {"part": chunk["part"], "rows": len(images), "sha": digest}


def part_count(n: int) -> int:
    """The parts of a prepared dataset of ``n`` samples (ROWS_PER_PART rows each)."""
    return -(-n // ROWS_PER_PART)


def write_store(location: str, *, sample_ids: np.ndarray, labels: np.ndarray, refs: pa.Table,
                image_column: str, size: tuple[int, int] | None, seed: int,
                on_part: Callable[[], None] = lambda: None) -> Store:
    """Decode, resize and write every sample (in the order given) as a prepared dataset at
    ``location``, in parallel through Ray Data; the manifest is written last, so a store is either
    complete or absent. Returns it. The listing goes to the tasks once, as one Arrow table in the
    object store; each task is told only its row range. ``on_part`` is called as each part is
    written (part_count parts)."""
    import ray
    import ray.data

    shape = probe_shape(refs, image_column=image_column, size=size)
    listing = refs.append_column("sample_id", pa.array(sample_ids, pa.int64())).append_column(
        "label", pa.array(labels, pa.int64()))
    chunks = [{"part": f"part-{k:05d}.parquet", "start": start,
               "stop": min(start + ROWS_PER_PART, len(sample_ids))}
              for k, start in enumerate(range(0, len(sample_ids), ROWS_PER_PART))]
    settings = {"location": location, "image_column": image_column, "size": size, "shape": shape}
    try:
        written = []
        for row in (ray.data.from_items(chunks)
                    .map(_write_part, fn_kwargs={"rows": [ray.put(listing)], "settings": settings})
                    .iter_rows()):
            written.append(row)
            on_part()
    except Exception as exc:  # a task's UsageError arrives wrapped in Ray's errors
        raise UsageError(_usage_line(exc) or f"preparing the dataset failed: "
                         f"{str(exc).splitlines()[0]}") from None
    written.sort(key=lambda r: r["part"])
    store = Store(location, tuple(r["part"] for r in written), tuple(r["rows"] for r in written),
                  shape, (), (), hashlib.sha256("".join(r["sha"] for r in written).encode()).hexdigest()[:16])
    mean, std = _sample_stats(store, seed)
    store = dataclasses.replace(store, mean=mean, std=std)
    storage.write_bytes(storage.join(location, MANIFEST), json.dumps({
        "parts": store.parts, "rows": store.rows, "shape": list(shape), "mean": mean, "std": std,
        "fingerprint": store.fingerprint}).encode())
    return store


def _usage_line(exc: BaseException) -> str | None:
    """The message of a UsageError raised inside a Ray task, from Ray's wrapped error."""
    for line in str(exc).splitlines():
        if "UsageError: " in line:
            return line.split("UsageError: ", 1)[1].strip()
    return None


def probe_shape(refs: pa.Table, *, image_column: str,
                size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of the first image after resizing: every other image must match it."""
    return tuple(decode_refs(refs.slice(0, 1), image_column=image_column, size=size)[0].shape)


def _sample_stats(store: Store, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images / 255 over a seeded sample of up to STATS_SAMPLE rows
    (one contiguous run of 256 per part read, so only a few parts' pages are read), accumulated
    run by run in float64: memory for one run of images, not the whole sample."""
    rng = np.random.default_rng([seed, 0x7374617473])  # "stats"
    n = len(store)
    take = min(n, STATS_SAMPLE)
    starts = np.sort(rng.choice(max(n - 255, 1), size=max(1, take // 256), replace=False))
    channels = store.shape[0]
    count, total, squares = 0, np.zeros(channels), np.zeros(channels)
    for a in starts:
        x = store.read_rows(int(a), int(a) + 256, columns=("image",))["image"]  # (B, C, H, W) uint8
        x = x.transpose(1, 0, 2, 3).reshape(channels, -1).astype(np.float64) / 255.0
        count += x.shape[1]
        total += x.sum(axis=1)
        squares += np.square(x).sum(axis=1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return (tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in std))


def check_images(refs: pa.Table, *, image_column: str, size: tuple[int, int] | None) -> None:
    """Before anything is written, refuse with one line what would fail later: image files of
    mixed sizes without --image-size (the headers of up to CHECKED_FILES files spread evenly over
    the listing, a prefix of each read), and in a Parquet dataset the first CHECKED_ROWS rows of
    every file (decoded: nulls, strings, ragged or mixed-size cells). A bad image further in is
    still one line, from the write (after Ray has started)."""
    if "file" in refs.column_names:
        first = refs.take(pa.array(_first_rows_of_each_file(refs.column("file"), CHECKED_ROWS)))
        images = decode_refs(first, image_column=image_column, size=size)
        _same_shape(images, ref_paths(first).to_pylist())
        return
    if size is not None:
        return
    paths = refs.column("path")
    spread = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), CHECKED_FILES)).astype(np.int64))
    first = None
    for path in paths.take(pa.array(spread)).to_pylist():
        found = _header_size(path)
        first = first or (found, path)
        if found != first[0]:
            raise UsageError(f"images differ in size: {first[1]} is {first[0][0]}x{first[0][1]}, "
                             f"{path} is {found[0]}x{found[1]} (width x height); pass "
                             "--image-size H[xW] to resize them")


def _first_rows_of_each_file(file: pa.ChunkedArray, count: int) -> np.ndarray:
    """Positions of the first ``count`` rows of each file in the ``file`` column, files in the
    order they first appear, rows in order."""
    codes = pc.dictionary_encode(file.combine_chunks()).indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    _, starts, sizes = np.unique(codes[order], return_index=True, return_counts=True)
    groups = [order[a:a + min(k, count)] for a, k in zip(starts, sizes, strict=True)]
    return np.concatenate(sorted(groups, key=lambda g: g[0]))


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file from its header: a prefix of the file, all of it when
    the header lies further in."""
    for data in (storage.read_prefix(path, HEADER_BYTES), storage.read_bytes(path)):
        try:
            with Image.open(io.BytesIO(data or b"")) as img:
                return img.size
        except Exception as exc:  # PIL raises several types for files it cannot identify
            error = exc
    raise UsageError(f"cannot decode image {path}: {error}")


def _same_shape(images: list[np.ndarray], paths: list[str]) -> None:
    """Refuse images of more than one shape, naming the first that differs from the first."""
    for image, path in zip(images, paths, strict=True):
        if image.shape != images[0].shape:
            raise UsageError(f"images differ in shape ({images[0].shape[1:]}, {image.shape[1:]}): "
                             f"{paths[0]} and {path}; pass --image-size H[xW] to resize them")
