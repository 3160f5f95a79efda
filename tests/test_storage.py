"""The storage layer's streamed Parquet writer: on a local folder and on a real S3 endpoint, a
reader sees the old file or the whole new one, and an error leaves the old file and no debris."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raycurv import storage

SCHEMA = pa.schema([pa.field("x", pa.int64())])


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_env")
    return "s3://raycurv/storage-test"


def test_streamed_parquet_appears_whole_or_not_at_all(folder):
    target = storage.join(folder, "t.parquet")
    storage.write_parquet(target, pa.table({"x": [-1]}, schema=SCHEMA))
    with storage.parquet_writer(target, SCHEMA) as writer:
        for start in range(0, 30, 10):
            writer.write_table(pa.table({"x": list(range(start, start + 10))}, schema=SCHEMA))
            assert storage.read_parquet(target).column("x").to_pylist() == [-1]  # old until done
    assert storage.read_parquet(target).column("x").to_pylist() == list(range(30))
    with pytest.raises(RuntimeError, match="stopped"), storage.parquet_writer(target, SCHEMA) as writer:
        writer.write_table(pa.table({"x": [7]}, schema=SCHEMA))
        raise RuntimeError("stopped")
    assert storage.read_parquet(target).column("x").to_pylist() == list(range(30))
    assert storage.list_files(folder) == [target]  # no temporary file left behind
