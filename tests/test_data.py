"""Dataset sources on small files written here, label noise and duplicates, sharding."""

from __future__ import annotations

import gzip
import io
import pickle
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycurv.config import DataSpec
from raycurv.data import prepare_dataset
from raycurv.data.noise import apply_noise
from raycurv.data.sharding import actor_shards, epoch_batches, scoring_batches
from raycurv.errors import UsageError


def write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_source_reads_what_was_written(tmp_path, rng, gz):
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30, dtype=np.uint8)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    write_idx(tmp_path / name, images, gz=gz)
    write_idx(tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else "")), labels, gz=gz)
    data = prepare_dataset(DataSpec(dataset="mnist", data_root=str(tmp_path)), seed=0)
    assert data.images.shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(data.images[:, 0], images)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.sample_ids, np.arange(30))


def test_cifar_pickles(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 4))}
        expected.append(batch)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    data = prepare_dataset(DataSpec(dataset="cifar10", data_root=str(tmp_path)), seed=0)
    assert data.images.shape == (20, 3, 32, 32) and data.augment
    np.testing.assert_array_equal(data.images[4].reshape(-1), expected[1][b"data"][0])
    assert data.labels.tolist() == [int(v) for b in expected for v in b[b"labels"]]


def test_cifar100_fine_labels(tmp_path, rng):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"fine_labels": [0, 99, 5, 5, 7, 1]}
    (folder / "train").write_bytes(pickle.dumps(batch))
    data = prepare_dataset(DataSpec(dataset="cifar100", data_root=str(folder)), seed=0)
    assert data.num_classes == 100 and data.labels.tolist() == [0, 99, 5, 5, 7, 1]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_in_sorted_class_and_file_order(tmp_path, rng):
    arrays = {}
    for cls in ("cat", "ant"):
        (tmp_path / cls).mkdir()
        for name in ("b.png", "a.png"):
            arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            (tmp_path / cls / name).write_bytes(_png(arr))
            arrays[(cls, name)] = arr
    data = prepare_dataset(DataSpec(dataset="imagefolder", data_root=str(tmp_path)), seed=0)
    assert data.labels.tolist() == [0, 0, 1, 1]  # ant, ant, cat, cat
    np.testing.assert_array_equal(data.images[1].transpose(1, 2, 0), arrays[("ant", "b.png")])
    np.testing.assert_array_equal(data.images[2].transpose(1, 2, 0), arrays[("cat", "a.png")])


def test_parquet_with_encoded_bytes_and_with_arrays(tmp_path, rng):
    arrays = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    encoded = tmp_path / "enc.parquet"
    pq.write_table(pa.table({"img": [_png(a) for a in arrays], "y": [0, 1, 2, 1, 0]}), encoded)
    data = prepare_dataset(DataSpec(dataset="parquet", data_root=str(encoded), image_column="img",
                                    label_column="y"), seed=0)
    np.testing.assert_array_equal(data.images[:, 0], arrays)
    assert data.num_classes == 3
    nested = tmp_path / "arr.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in arrays], "label": [0, 1, 2, 1, 0]}), nested)
    data = prepare_dataset(DataSpec(dataset="parquet", data_root=str(nested)), seed=0)
    np.testing.assert_array_equal(data.images[:, 0], arrays)


def test_parquet_non_finite_pixels_and_bad_labels_are_refused(tmp_path):
    bad = np.zeros((3, 4, 4), dtype=np.float32)
    bad[1, 2, 2] = np.nan
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in bad], "label": [0, 1, 0]}), path)
    with pytest.raises(UsageError, match="non-finite pixel values .*sample 1"):
        prepare_dataset(DataSpec(dataset="parquet", data_root=str(path)), seed=0)
    path = tmp_path / "neg.parquet"
    pq.write_table(pa.table({"image": [np.zeros((4, 4)).tolist()] * 3, "label": [0, -1, 1]}), path)
    with pytest.raises(UsageError, match="labels out of range"):
        prepare_dataset(DataSpec(dataset="parquet", data_root=str(path)), seed=0)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(UsageError, match=f"under {tmp_path}.*apt-get install dataset-fashion-mnist"):
        prepare_dataset(DataSpec(dataset="fashion-mnist", data_root=str(tmp_path)), seed=0)
    with pytest.raises(UsageError, match="--download"):
        prepare_dataset(DataSpec(dataset="cifar10", data_root=str(tmp_path)), seed=0)
    with pytest.raises(UsageError, match="unknown dataset 'svhn'; valid: digits, fashion-mnist"):
        prepare_dataset(DataSpec(dataset="svhn"), seed=0)


@pytest.mark.parametrize("kind", ["symmetric", "pairwise"])
def test_noise_flips_exactly_round_rate_n_to_other_classes(kind):
    labels = np.random.default_rng(1).integers(0, 10, 1797)
    noisy = apply_noise(labels, rate=0.1, kind=kind, num_classes=10, seed=3)
    flipped = noisy != labels
    assert flipped.sum() == round(0.1 * 1797)
    if kind == "pairwise":
        np.testing.assert_array_equal(noisy[flipped], (labels[flipped] + 1) % 10)
    else:  # uniform over the 9 other classes: every offset 1..9 occurs
        assert set(((noisy[flipped] - labels[flipped]) % 10).tolist()) == set(range(1, 10))
    np.testing.assert_array_equal(apply_noise(labels, rate=0.1, kind=kind, num_classes=10, seed=3), noisy)
    assert not np.array_equal(apply_noise(labels, rate=0.1, kind=kind, num_classes=10, seed=4), noisy)


def test_prepared_digits_with_noise_limit_and_duplicates():
    spec = DataSpec(limit=500, noise=0.2, duplicates=25)
    data = prepare_dataset(spec, seed=7)
    assert len(data) == 525
    assert data.corrupted.sum() == 100 and not data.corrupted[500:].any()
    assert np.all(np.diff(data.sample_ids) > 0) and data.sample_ids[:500].max() < 1797
    dups = np.flatnonzero(data.duplicate_of >= 0)
    assert len(dups) == 25 and dups.min() == 500
    source = np.searchsorted(data.sample_ids, data.duplicate_of[dups])
    np.testing.assert_array_equal(data.images[dups], data.images[source])
    assert np.all(data.labels[dups] != data.labels[source]), "a duplicate carries a conflicting label"
    np.testing.assert_array_equal(data.original_labels[dups], data.original_labels[source])
    again = prepare_dataset(spec, seed=7)
    np.testing.assert_array_equal(again.labels, data.labels)
    assert again.fingerprint == data.fingerprint
    assert prepare_dataset(DataSpec(limit=500), seed=8).fingerprint != data.fingerprint


def test_scoring_batches_and_shards_align_to_fixed_boundaries():
    assert scoring_batches(100, 700, 256) == [(100, 256), (256, 512), (512, 700)]
    for actors in (1, 2, 3):
        shards = actor_shards(1797, actors, 256)
        assert shards[0][0] == 0 and shards[-1][1] == 1797
        batches = [b for a, z in shards for b in scoring_batches(a, z, 256)]
        assert batches == scoring_batches(0, 1797, 256)
    with pytest.raises(UsageError, match="exceeds the 8 scoring batches"):
        actor_shards(1797, 9, 256)


def test_epoch_batches_cover_every_sample_once_with_equal_batch_counts():
    for world in (1, 2, 3):
        parts = [epoch_batches(129, world_size=world, rank=r, batch_size=32, seed=0, epoch=4)
                 for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        seen = np.concatenate([b for p in parts for b in p])
        assert sorted(seen.tolist()) == list(range(129))


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_debian_fashion_mnist_subset():
    data = prepare_dataset(DataSpec(dataset="fashion-mnist", limit=1000, noise=0.1), seed=0)
    assert data.images.shape == (1000, 1, 28, 28) and data.images.dtype == np.uint8
    assert data.sample_ids.max() < 60000 and data.corrupted.sum() == 100
    assert set(np.unique(data.original_labels)) == set(range(10))
