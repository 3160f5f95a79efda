"""Run-folder storage: a local path or any URI pyarrow's filesystems understand (file://, s3://,
gs://). Every file a reader might see is written atomically: a temp name then a rename locally,
a single put on object stores."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycurv.errors import UsageError


def is_uri(location: str) -> bool:
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), os.path.abspath(location)


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or all of the new, never a part."""
    if is_uri(location) and not str(location).startswith("file://"):
        fs, path = _resolve(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:  # one put: object stores publish it whole
            out.write(data)
        return
    _, path = _resolve(location)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; readers may run as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(location: str) -> bytes | None:
    """The file's content, or None if there is no such file."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read()


def read_prefix(location: str, nbytes: int) -> bytes | None:
    """The first ``nbytes`` bytes of the file (all of it when shorter), or None if there is no
    such file."""
    fs, path = _resolve(location)
    try:
        with fs.open_input_stream(path) as src:
            return src.read(nbytes)
    except (FileNotFoundError, IsADirectoryError):
        return None


def exists(location: str) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@dataclass(frozen=True)
class FileStamp:
    """Identity of one version of a file: a replaced or rewritten file gets another stamp (the
    inode, where the filesystem has one, tells a same-size replacement within one mtime tick)."""

    mtime_ns: int
    size: int
    inode: int = 0

    @classmethod
    def of(cls, location: str) -> FileStamp | None:
        """The stamp of ``location``, or None when it is not a file."""
        local = local_path(location)
        if local is not None:
            try:
                st = os.stat(local)
            except (FileNotFoundError, NotADirectoryError):
                return None
            return cls(st.st_mtime_ns, st.st_size, st.st_ino) if stat.S_ISREG(st.st_mode) else None
        fs, path = _resolve(location)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        return cls(int(info.mtime_ns or 0), int(info.size or 0))


def write_parquet(location: str, table: pa.Table) -> None:
    """Write ``table`` as one Parquet file, atomically (see parquet_writer): encoded as it is
    written, never held whole as bytes."""
    with parquet_writer(location, table.schema) as writer:
        writer.write_table(table)


@contextlib.contextmanager
def parquet_writer(location: str, schema: pa.Schema):
    """A pyarrow ParquetWriter (``write_table`` as often as wanted) whose file appears at
    ``location`` only when the block ends without an error: written under a temporary name
    beside it, then moved (a rename locally, a server-side copy on object stores), so readers
    see the old file or the whole new one; the temporary file is removed on error."""
    fs, path = _resolve(location)
    parent, _, name = path.rpartition("/")
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out, pq.ParquetWriter(out, schema) as writer:
            yield writer
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_parquet(location: str, *, memory_map: bool = True, columns: list[str] | None = None,
                 filters=None) -> pa.Table:
    """Read one Parquet file; local files are memory-mapped (pages load as they are touched).
    ``filters``: pyarrow's row filters (e.g. ``[("sample_id", "in", ids)]``), applied as it
    reads."""
    local = local_path(location)
    if local is not None:
        return pq.read_table(local, memory_map=memory_map, columns=columns, filters=filters)
    fs, path = _resolve(location)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def iter_parquet(location: str, *, columns: list[str] | None = None,
                 batch_rows: int = 1 << 20):
    """The rows of one Parquet file as record batches of up to ``batch_rows`` rows, read as they
    are consumed: a file of any size in bounded memory."""
    fs, path = _resolve(location)
    with pq.ParquetFile(path, filesystem=fs) as file:
        yield from file.iter_batches(batch_size=batch_rows, columns=columns)


def write_npz(location: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(location, buf.getvalue())


def read_npz(location: str) -> dict[str, np.ndarray] | None:
    data = read_bytes(location)
    if data is None:
        return None
    with np.load(io.BytesIO(data)) as npz:
        return {key: npz[key] for key in npz.files}


def delete(location: str) -> None:
    """Remove a file if it exists."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(location: str, *, recursive: bool = False) -> list[str]:
    """Locations of the files inside folder ``location`` (none if it does not exist), sorted;
    with ``recursive``, in its subfolders too."""
    return [loc for loc, _ in _list(location, pafs.FileType.File, recursive=recursive)]


def list_files_with_sizes(location: str) -> list[tuple[str, int]]:
    """(location, size in bytes) of the files directly inside folder ``location``, sorted."""
    return _list(location, pafs.FileType.File)


def list_dirs(location: str) -> list[str]:
    """Locations of the folders directly inside folder ``location`` (none if it does not exist)."""
    return [loc for loc, _ in _list(location, pafs.FileType.Directory)]


def _list(location: str, kind: pafs.FileType, *, recursive: bool = False) -> list[tuple[str, int]]:
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    base = path.rstrip("/") + "/"
    return sorted((join(location, *info.path[len(base):].split("/")), int(info.size or 0))
                  for info in infos if info.type == kind)


def size(location: str) -> int:
    """Size in bytes of the file at ``location``."""
    fs, path = _resolve(location)
    return int(fs.get_file_info(path).size or 0)


def filesystem(location: str) -> pafs.FileSystem:
    """The pyarrow filesystem behind ``location`` (for libraries that take one, as Ray Data)."""
    return _resolve(location)[0]


def parquet_schema(location: str) -> pa.Schema:
    """The Arrow schema of a Parquet file, from its footer alone."""
    fs, path = _resolve(location)
    return pq.read_schema(path, filesystem=fs)


def read_parquet_rows(location: str, column: str, rows: np.ndarray) -> list:
    """Values of ``column`` at ``rows`` (row numbers in the file, any order, repeats allowed) of a
    Parquet file, in that order, reading only the row groups that hold them."""
    fs, path = _resolve(location)
    rows = np.asarray(rows, dtype=np.int64)
    out: list = [None] * len(rows)
    with pq.ParquetFile(path, filesystem=fs) as file:
        ends = np.cumsum([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
        groups = np.searchsorted(ends, rows, side="right")
        for group in np.unique(groups):
            start = int(ends[group - 1]) if group else 0
            where = np.flatnonzero(groups == group)
            values = file.read_row_group(int(group), columns=[column]).column(column)
            for i, value in zip(where, values.take(pa.array(rows[where] - start)).to_pylist(),
                                strict=True):
                out[i] = value
    return out


def local_path(location: str) -> Path | None:
    """The absolute local path behind a plain path or a file:// URI; None for other filesystems."""
    if not is_uri(location):
        return Path(os.path.abspath(location))
    if str(location).startswith("file://"):
        return Path(_resolve(location)[1])
    return None


def check_writable_folder(location: str) -> None:
    """Refuse, with one line, a ``location`` that cannot be (or become) a writable folder.

    Writes and removes a probe file in the folder or its nearest existing parent: the one test
    that sees read-only mounts, permissions and object-store credentials alike. Nothing stays.
    Raises UsageError.
    """
    local = local_path(location)
    try:
        if local is not None:
            _check_local_folder(local, location)
        else:
            _check_remote_folder(location)
    except (OSError, pa.ArrowException) as exc:
        reason = (getattr(exc, "strerror", None) or str(exc)).splitlines()[0]
        reason = re.sub(r"\s*\(Request ID: [^)]*\)", "", reason)  # noise in a one-line error
        raise UsageError(f"cannot write to {location}: {reason}") from None


def _check_local_folder(path: Path, location: str) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{location} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{location} lies under {existing}, which is a file")
    with tempfile.TemporaryFile(prefix=".raycurv-write-check.", dir=existing):
        pass


def _check_remote_folder(location: str) -> None:
    fs, path = _resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise UsageError(f"{location} is a file, not a folder")
    probe = f"{path.rstrip('/')}/.raycurv-write-check"
    with fs.open_output_stream(probe) as out:
        out.write(b"")
    fs.delete_file(probe)
