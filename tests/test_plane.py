"""The data plane: image folders and Parquet datasets (several files, globs, object storage) are
listed without decoding, written once as a prepared dataset through Ray Data, and read back by
rows; bad input is one line."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycurv import storage
from raycurv.config import DataSpec
from raycurv.data import materialize, plane, prepare_dataset
from raycurv.errors import UsageError
from tests.test_cli import _fails


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path):
    """root/<class>/<image>: PNG and JPEG files of two sizes, RGB."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for label, cls in enumerate(("ant", "bee")):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            size = (20, 24) if (i + label) % 2 else (32, 32)
            fmt = "JPEG" if i % 3 == 0 else "PNG"
            suffix = ".jpg" if fmt == "JPEG" else ".png"
            (root / cls / f"{i:02d}{suffix}").write_bytes(
                _png(rng.integers(0, 255, (*size, 3), dtype=np.uint8), fmt))
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def write_parquet_dataset(folder, *, files: int = 3, rows: int = 7, seed: int = 0,
                          filesystem=None) -> list[np.ndarray]:
    """A Hugging-Face-style Parquet dataset: {bytes, path} image structs and int labels, in
    ``files`` files of ``rows`` rows (row groups of 3). Returns the images, in order."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(files):
        cells, labels = [], []
        for i in range(rows):
            image = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            images.append(image)
            cells.append({"bytes": _png(image), "path": f"img-{k}-{i}.png"})
            labels.append(int(rng.integers(0, 3)))
        table = pa.table({"image": cells, "label": labels, "name": [c["path"] for c in cells]})
        pq.write_table(table, f"{folder}/part-{k}.parquet", row_group_size=3,
                       filesystem=filesystem)
    return images


def test_image_folder_is_listed_in_sorted_order_with_paths(mixed_folder):
    data = prepare_dataset(DataSpec(dataset="imagefolder", data_root=str(mixed_folder),
                                    image_size="16x12"), seed=0)
    assert len(data) == 12 and data.images is None and data.input_shape == (3, 16, 12)
    assert data.class_names == ("ant", "bee")
    expected = sorted(f"{mixed_folder}/{c}/{f}" for c in ("ant", "bee")
                      for f in os.listdir(mixed_folder / c) if not f.endswith(".txt"))
    assert data.paths == expected
    np.testing.assert_array_equal(data.labels, [0] * 6 + [1] * 6)


def test_mixed_sizes_without_image_size_is_one_line(capsys, mixed_folder, tmp_path):
    err = _fails(capsys, ["score", "--dataset", "imagefolder", "--data-root", str(mixed_folder),
                          "--run-dir", str(tmp_path / "run")])
    assert "images differ in size" in err and "--image-size" in err
    assert not (tmp_path / "run").exists()


def test_the_size_check_reads_a_spread_of_headers_not_every_file(tmp_path, monkeypatch):
    """A large folder is not read whole before anything starts: CHECKED_FILES headers, spread
    from the first file to the last, each a prefix of its file."""
    for i in range(plane.CHECKED_FILES + 100):
        folder = tmp_path / "many" / f"class-{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        side = 5 if i == plane.CHECKED_FILES + 99 else 4
        (folder / f"{i:04d}.png").write_bytes(_png(np.full((side, side), i % 256, np.uint8)))
    read = []
    real = storage.read_prefix
    monkeypatch.setattr(storage, "read_prefix", lambda path, n: read.append(path) or real(path, n))
    with pytest.raises(UsageError, match=r"class-0/0000.png is 4x4, .*class-1/0611.png is 5x5"):
        prepare_dataset(DataSpec(dataset="imagefolder", data_root=str(tmp_path / "many")), seed=0)
    assert len(read) == plane.CHECKED_FILES


@pytest.mark.parametrize("root", ["{d}", "{d}/part-1.parquet", "{d}/part-*.parquet"])
def test_parquet_file_folder_or_glob(tmp_path, root):
    write_parquet_dataset(tmp_path)
    data = prepare_dataset(DataSpec(dataset="parquet", data_root=root.format(d=tmp_path),
                                    path_column="name"), seed=0)
    assert len(data) == (7 if "part-1" in root else 21)
    assert data.paths[0] == ("img-1-0.png" if "part-1" in root else "img-0-0.png")


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: pq.write_table(pa.table({"picture": [b"x"], "label": [0]}), d / "part-9.parquet"),
     "has no column 'image'"),
    (lambda d: pq.write_table(pa.table({"image": [b"x"], "label": [None]},
                                       schema=pa.schema([("image", pa.binary()), ("label", pa.int64())])),
                              d / "part-9.parquet"), r"has 1 null\(s\)"),
    (lambda d: (d / "part-9.parquet").write_bytes(b"PAR1 broken"), "cannot read"),
])
def test_bad_parquet_datasets(tmp_path, change, message):
    write_parquet_dataset(tmp_path, files=1)
    change(tmp_path)
    with pytest.raises(UsageError, match=message):
        prepare_dataset(DataSpec(dataset="parquet", data_root=str(tmp_path)), seed=0)


def test_image_size_is_checked():
    with pytest.raises(UsageError, match="--image-size must look like 32 or 24x32"):
        plane.parse_image_size("32x")
    assert plane.parse_image_size("24x32") == (24, 32) and plane.parse_image_size("8") == (8, 8)


def test_prepared_dataset_round_trip(ray_cluster, tmp_path):
    """Written through Ray Data in sample order; every row reads back as it was decoded."""
    (tmp_path / "src").mkdir()
    images = write_parquet_dataset(tmp_path / "src", files=3, rows=7)
    spec = DataSpec(dataset="parquet", data_root=str(tmp_path / "src"), noise=0.2, duplicates=2)
    data = materialize(prepare_dataset(spec, seed=0), str(tmp_path / "store"), seed=0)
    store = data.store
    assert len(store) == 23 and store.shape == (1, 8, 8)
    rows = store.read_rows(0, len(store))
    np.testing.assert_array_equal(rows["sample_id"], data.sample_ids)
    np.testing.assert_array_equal(rows["label"], data.labels)
    np.testing.assert_array_equal(rows["image"][:21, 0], np.stack(images))
    copies = data.duplicate_of[21:]
    np.testing.assert_array_equal(rows["image"][21:, 0], np.stack(images)[copies])
    middle = store.read_rows(5, 9)
    np.testing.assert_array_equal(middle["image"], rows["image"][5:9])
    every = np.stack(images + [images[c] for c in copies]) / 255.0  # a small store: all sampled
    assert data.norm.mean[0] == pytest.approx(every.mean(), rel=1e-6)
    assert data.norm.std[0] == pytest.approx(every.std(), rel=1e-6)
    view = plane.StoreImages(store, 3, 20)  # what a curvature actor streams its shard through
    assert view.shape == (17, 1, 8, 8)
    np.testing.assert_array_equal(view[4:9], rows["image"][7:12])
    np.testing.assert_array_equal(view[0:17], rows["image"][3:20])
    again = materialize(prepare_dataset(spec, seed=0), str(tmp_path / "store"), seed=0)
    assert again.store == store  # a complete store is reused, not written again


def test_parquet_dataset_on_object_storage(ray_cluster, s3_env):
    """Several Parquet files on s3://: listed, prepared and read back through the store."""
    fs = storage.filesystem("s3://raycurv/plane-src")
    images = write_parquet_dataset("raycurv/plane-src", files=2, rows=5, filesystem=fs)
    spec = DataSpec(dataset="parquet", data_root="s3://raycurv/plane-src")
    data = materialize(prepare_dataset(spec, seed=0), "s3://raycurv/plane-store", seed=0)
    np.testing.assert_array_equal(data.store.read_rows(0, 10)["image"][:, 0], np.stack(images))
    assert data.paths[0] == "s3://raycurv/plane-src/part-0.parquet#0"


@pytest.mark.slow
def test_a_run_on_object_storage_end_to_end(ray_cluster, s3_env, capsys):
    """A Parquet dataset of several files on s3://, scored into an s3:// run folder; evaluate,
    report, query and the service read the run from there; the same command again resumes."""
    from ray import serve

    from raycurv.cli import main
    from raycurv.serve.settings import build_settings
    from tests.serve_support import run_app

    fs = storage.filesystem("s3://raycurv/e2e-src")
    write_parquet_dataset("raycurv/e2e-src", files=3, rows=40, filesystem=fs)
    run = "s3://raycurv/runs/e2e"
    argv = ["score", "--dataset", "parquet", "--data-root", "s3://raycurv/e2e-src",
            "--path-column", "name", "--noise", "0.1", "--epochs", "2", "--run-dir", run]
    assert main(argv) == 0
    assert storage.is_file(f"{run}/scores.parquet") and storage.is_file(f"{run}/data/manifest.json")
    table = storage.read_parquet(f"{run}/scores.parquet")
    assert table.num_rows == 120
    printed = capsys.readouterr()
    # Ray Data's own console output (progress, "Starting execution", INFO lines) stays off
    for noise in ("Dataset", "Progress", "INFO", "Running"):
        assert noise not in printed.out + printed.err, noise
    assert "dataset preparation (120 images)" in printed.err
    assert main(["evaluate", run, "--json"]) == 0
    assert '"corrupted": 12' in capsys.readouterr().out
    assert main(["report", run, "--top", "5"]) == 0
    assert storage.is_file(f"{run}/report/index.html")
    capsys.readouterr()
    assert main(["query", run, "3", "--json"]) == 0
    assert '"sample_id": 3' in capsys.readouterr().out
    url = run_app(build_settings(runs=[run], environ={}), name="s3-run")
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{url}/v1/runs/e2e/samples/3", timeout=30) as answer:
            assert json.loads(answer.read())["sample"]["sample_id"] == 3
    finally:
        serve.delete("s3-run")
    before = storage.read_bytes(f"{run}/scores.parquet")
    assert main(argv) == 0  # resumes: nothing retrained, the same scores
    again = storage.read_parquet(f"{run}/scores.parquet")
    for column in ("sample_id", "label", "curvature", "csl"):
        assert again.column(column).equals(table.column(column)), column
    assert before is not None


@pytest.mark.slow
def test_a_mixed_size_image_folder_scores_with_image_size(ray_cluster, mixed_folder, tmp_path):
    """Resized to one size and trained by 2 DDP workers on 13 images: Ray Train's equal split
    would drop one a epoch; padded, every sample is trained (a positive loss recorded) in every
    epoch."""
    from raycurv.cli import main

    (mixed_folder / "bee" / "99.png").write_bytes(_png(np.zeros((9, 7, 3), np.uint8)))
    run = tmp_path / "run"
    assert main(["score", "--dataset", "imagefolder", "--data-root", str(mixed_folder),
                 "--image-size", "32", "--epochs", "2", "--score-batch-size", "8", "--workers", "2",
                 "--run-dir", str(run)]) == 0
    store = plane.Store.open(str(run / "data"))
    assert store.shape == (3, 32, 32) and len(store) == 13
    for epoch in (0, 1):
        record = storage.read_npz(str(run / "shards" / "shard-0000" / f"epoch-{epoch:04d}.npz"))
        assert (record["train_loss"] > 0).all(), epoch
    paths = pq.read_table(run / "data" / store.parts[0], columns=["path"]).column("path").to_pylist()
    assert paths == sorted(str(p) for p in mixed_folder.glob("*/*") if p.suffix != ".txt")
