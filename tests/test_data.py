"""Dataset sources on small files written here, label noise and duplicates, sharding."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shlex
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycurv.config import MAX_CLASSES, DataSpec
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


def _py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle writes it (SHORT_BINSTRING or BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def py2_cifar_batch(data: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """A batch byte for byte as CIFAR's own files hold it: Python 2 cPickle, protocol 2, str keys
    and values, the array under numpy 1's names (numpy.core.multiarray._reconstruct, numpy.ndarray,
    numpy.dtype) with its dtype state and data as Python 2 strs, labels a list of ints."""
    s, i = _py2_str, _py2_int
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"  # dtype('u1', 0, 1)
             b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")  # its __setstate__
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" + i(0) + b"\x85"
             + s(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
             b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + s(data.tobytes()) + b"tb")  # __setstate__((1, shape, dtype, False, data))
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 1") + s(b"data") + array
            + s(label_key) + b"](" + b"".join(i(v) for v in labels) + b"e"
            + s(b"filenames") + b"](" + b"".join(s(b"f%d.png" % k) for k in range(len(labels)))
            + b"eu.")


def test_cifar_batch_in_the_original_python2_format(tmp_path, rng):
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    raw = py2_cifar_batch(data, [7, 0, 99], b"fine_labels")
    reference = pickle.loads(raw, encoding="bytes")  # the unrestricted reader agrees on the bytes
    np.testing.assert_array_equal(reference[b"data"], data)
    (tmp_path / "train").write_bytes(raw)
    loaded = prepare_dataset(DataSpec(dataset="cifar100", data_root=str(tmp_path)), seed=0)
    np.testing.assert_array_equal(loaded.images.reshape(3, -1), data)
    assert loaded.labels.tolist() == [7, 0, 99]


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_batch_pickled_by_numpy_with_each_protocol(tmp_path, rng, protocol):
    batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
             b"fine_labels": [np.int64(3), 4]}  # a numpy scalar pickles as numpy's `scalar`
    (tmp_path / "train").write_bytes(pickle.dumps(batch, protocol=protocol))
    loaded = prepare_dataset(DataSpec(dataset="cifar100", data_root=str(tmp_path)), seed=0)
    np.testing.assert_array_equal(loaded.images.reshape(2, -1), batch[b"data"])
    assert loaded.labels.tolist() == [3, 4]


class _Planted:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _usage_error(spec: DataSpec) -> str:
    """prepare_dataset's UsageError message, asserted to be one line."""
    with pytest.raises(UsageError) as info:
        prepare_dataset(spec, seed=0)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.mark.parametrize("where", ["top", "inside"])
def test_planted_cifar_pickle_runs_nothing(tmp_path, rng, where):
    marker = tmp_path / "ran"
    planted = _Planted(marker)
    pickle.loads(pickle.dumps(planted))  # the plain unpickler does run it: the test can fail
    assert marker.exists()
    marker.unlink()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
        if k == 3:
            batch = planted if where == "top" else {**batch, b"labels": [planted, 2]}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
    message = _usage_error(DataSpec(dataset="cifar10", data_root=str(tmp_path)))
    assert not marker.exists()
    assert message.startswith(f"refusing to unpickle {folder / 'data_batch_3'}: it names ")
    assert f"{os.system.__module__}.system" in message


def _write_cifar100(tmp_path, payload: bytes) -> DataSpec:
    (tmp_path / "train").write_bytes(payload)
    return DataSpec(dataset="cifar100", data_root=str(tmp_path))


_GOOD_DATA = np.zeros((2, 3072), dtype=np.uint8)


def _idx_images(tmp_path, payload: bytes, n: int = 2) -> DataSpec:
    """MNIST files: good labels (n,) and ``payload`` as the images file."""
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(n, dtype=np.uint8), gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(payload)
    return DataSpec(dataset="mnist", data_root=str(tmp_path))


_IDX_HEADER = struct.pack(">BBBB3i", 0, 0, 0x08, 3, 2, 4, 4)  # uint8, dims (2, 4, 4): 32 bytes


def _parquet_spec(tmp_path, images: list, labels: list) -> DataSpec:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    return DataSpec(dataset="parquet", data_root=str(path))


_SQUARE = np.zeros((4, 4)).tolist()

# (case, writes the bad input under tmp_path and returns its spec, a fragment of the message)
BAD_INPUTS = [
    ("idx header cut short", lambda t: _idx_images(t, _IDX_HEADER[:9]),
     "has a truncated IDX header: 3 dims need 16 bytes, the file holds 9"),
    ("idx not gzip after the gzip magic", lambda t: _idx_images(t, b"\x1f\x8bnot gzip at all"),
     "train-images-idx3-ubyte is not a valid gzip file: "),
    ("idx gzip cut short", lambda t: _idx_images(t, gzip.compress(_IDX_HEADER + bytes(32))[:-12]),
     "is not a valid gzip file: Compressed file ended"),
    ("idx data short of its dims", lambda t: _idx_images(t, _IDX_HEADER + bytes(31)),
     "is truncated: dims (2, 4, 4) need 32 bytes of data, it holds 31"),
    ("idx data past its dims", lambda t: _idx_images(t, _IDX_HEADER + bytes(48)),
     "has data past what its dims describe: dims (2, 4, 4) need 32 bytes of data, it holds 48"),
    ("idx negative dims", lambda t: _idx_images(t, struct.pack(">BBBB3i", 0, 0, 8, 3, -2, 4, 4)),
     "has negative IDX dims (-2, 4, 4)"),
    ("idx images and labels disagree", lambda t: _idx_images(t, _IDX_HEADER + bytes(32), n=3),
     "do not hold N images and N labels: dims (2, 4, 4) and (3,)"),
    ("cifar not a pickle", lambda t: _write_cifar100(t, b"PK\x03\x04 a zip"),
     "train is not a CIFAR python batch: "),
    ("cifar pickle cut short",
     lambda t: _write_cifar100(t, pickle.dumps({b"data": _GOOD_DATA, b"fine_labels": [0, 1]})[:-40]),
     "train is not a CIFAR python batch: "),
    ("cifar not a dict", lambda t: _write_cifar100(t, pickle.dumps([_GOOD_DATA, [0, 1]])),
     "train holds a list, not a CIFAR batch dict"),
    ("cifar label key missing",
     lambda t: _write_cifar100(t, pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, 1]})),
     "train has no b'fine_labels' entry; it has b'data', b'labels'"),
    ("cifar data not uint8 (N, 3072)",
     lambda t: _write_cifar100(t, pickle.dumps({b"data": np.zeros((2, 32, 32)), b"fine_labels": [0, 1]})),
     "b'data' is a float64 array of shape (2, 32, 32), expected a uint8 array (N, 3072)"),
    ("cifar labels not one per image",
     lambda t: _write_cifar100(t, pickle.dumps({b"data": _GOOD_DATA, b"fine_labels": [0, 1, 2]})),
     "b'fine_labels' is a list, expected 2 integer labels"),
    ("cifar labels not integers",
     lambda t: _write_cifar100(t, pickle.dumps({b"data": _GOOD_DATA, b"fine_labels": [b"a", b"b"]})),
     "expected 2 integer labels"),
    ("parquet rows of different shapes",
     lambda t: _parquet_spec(t, [_SQUARE, np.zeros((5, 5)).tolist()], [0, 1]),
     "differ in shape ((4, 4), (5, 5))"),
    ("parquet ragged row", lambda t: _parquet_spec(t, [_SQUARE, [[0.0, 1.0], [2.0]]], [0, 1]),
     "bad.parquet row 1: image is ragged"),
    ("parquet string images", lambda t: _parquet_spec(t, ["a.png", "b.png"], [0, 1]),
     "bad.parquet row 0: image is a string"),
    ("parquet nested strings", lambda t: _parquet_spec(t, [[["a", "b"]], [["c", "d"]]], [0, 1]),
     "bad.parquet row 0: image holds non-numeric values (<U1)"),
    ("parquet null inside an image", lambda t: _parquet_spec(t, [_SQUARE, [[0.0, None]] * 4], [0, 1]),
     "bad.parquet row 1: image holds non-numeric values (object)"),
    ("parquet without rows",
     lambda t: _parquet_spec(t, pa.array([], pa.list_(pa.float64())), pa.array([], pa.int64())),
     "no images in "),
    ("parquet null label", lambda t: _parquet_spec(t, [_SQUARE] * 3, [0, None, 1]),
     "has 1 null(s), first in row 1"),
    ("parquet label of a billion", lambda t: _parquet_spec(t, [_SQUARE] * 2, [0, 10**9]),
     f"parquet: the labels make 1000000001 classes (0..largest label), more than the {MAX_CLASSES}"),
    ("limit above N", lambda t: DataSpec(limit=100000),
     "--limit 100000 exceeds the 1797 samples of digits"),
]


@pytest.mark.parametrize("case, write, fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_one_line_usage_errors(tmp_path, case, write, fragment):
    assert fragment in _usage_error(write(tmp_path))


def test_null_label_message_counts_and_places_the_nulls(tmp_path):
    message = _usage_error(_parquet_spec(tmp_path, [_SQUARE] * 4, [0, None, 1, None]))
    assert message.endswith("has 2 null(s), first in row 1")


def test_max_classes_is_an_override_both_ways(tmp_path):
    spec = _parquet_spec(tmp_path, [_SQUARE] * 2, [0, 150_000])
    assert prepare_dataset(spec.model_copy(update={"max_classes": 200_000}), seed=0).num_classes == 150_001
    assert "digits: the labels make 10 classes" in _usage_error(DataSpec(max_classes=2))


def test_limit_equal_to_n_keeps_every_sample():
    data = prepare_dataset(DataSpec(limit=1797), seed=0)
    np.testing.assert_array_equal(data.sample_ids, np.arange(1797))


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
    images = data.load_images()
    np.testing.assert_array_equal(images[1].transpose(1, 2, 0), arrays[("ant", "b.png")])
    np.testing.assert_array_equal(images[2].transpose(1, 2, 0), arrays[("cat", "a.png")])


def test_parquet_with_encoded_bytes_and_with_arrays(tmp_path, rng):
    arrays = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    encoded = tmp_path / "enc.parquet"
    pq.write_table(pa.table({"img": [_png(a) for a in arrays], "y": [0, 1, 2, 1, 0]}), encoded)
    data = prepare_dataset(DataSpec(dataset="parquet", data_root=str(encoded), image_column="img",
                                    label_column="y"), seed=0)
    np.testing.assert_array_equal(data.load_images()[:, 0], arrays)
    assert data.num_classes == 3
    nested = tmp_path / "arr.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in arrays], "label": [0, 1, 2, 1, 0]}), nested)
    data = prepare_dataset(DataSpec(dataset="parquet", data_root=str(nested)), seed=0)
    np.testing.assert_array_equal(data.load_images()[:, 0], arrays)


def test_parquet_non_finite_pixels_and_bad_labels_are_refused(tmp_path):
    bad = np.zeros((3, 4, 4), dtype=np.float32)
    bad[1, 2, 2] = np.nan
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in bad], "label": [0, 1, 0]}), path)
    with pytest.raises(UsageError, match="non-finite pixel values in .*nan.parquet row 1"):
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
