"""bll_ref.data: IDX format, Fashion-MNIST loader, batching, synthetic tasks."""
import gzip
import os

import numpy as np
import pytest

from bll_ref.data import (
    DEFAULT_FASHION_MNIST_PATH, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    batches, fashion_mnist_available, load_fashion_mnist, one_hot, permutation_reversal,
    read_idx, synthetic_classification, synthetic_images, write_idx,
)

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


# --------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", IDX_DTYPES)
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip_keeps_values_shape_and_dtype(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    a = (rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype) if info
         else rng.standard_normal((3, 4, 5)).astype(dtype))
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    b[0, 0, 0] = 0  # writable


def test_idx_gzip_is_detected_by_magic_not_name(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "compressed.raw", a, compress=True)
    write_idx(tmp_path / "plain.gz", a, compress=False)
    assert (tmp_path / "compressed.raw").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "plain.gz").read_bytes()[:4] == bytes([0, 0, 0x0C, 2])
    np.testing.assert_array_equal(read_idx(tmp_path / "compressed.raw"), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "plain.gz")), a)


def test_idx_header_is_big_endian_with_lecun_type_code(tmp_path):
    write_idx(tmp_path / "x", np.array([[1.0, 2.0]], dtype=np.float32))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0D, 2])
    assert raw[4:12] == (1).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert raw[12:] == np.array([1.0, 2.0], dtype=">f4").tobytes()


def test_idx_gzip_output_is_reproducible(tmp_path):
    a = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "1.gz", a)
    write_idx(tmp_path / "2.gz", a)
    assert (tmp_path / "1.gz").read_bytes() == (tmp_path / "2.gz").read_bytes()


def test_write_idx_rejects_dtype_without_idx_code(tmp_path):
    with pytest.raises(ValueError, match="no type for dtype float16"):
        write_idx(tmp_path / "x", np.zeros(3, np.float16))
    with pytest.raises(ValueError, match="no type for dtype bool"):
        write_idx(tmp_path / "x", np.zeros(3, bool))


def _raw_idx(tmp_path, a):
    write_idx(tmp_path / "ok.idx", a)
    return (tmp_path / "ok.idx").read_bytes()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_file_and_byte_counts(tmp_path, gz):
    raw = _raw_idx(tmp_path, np.zeros((2, 5), np.int16))  # 20 payload bytes
    bad = tmp_path / "short.idx"
    bad.write_bytes(gzip.compress(raw[:-3]) if gz else raw[:-3])
    with pytest.raises(ValueError) as e:
        read_idx(bad)
    msg = str(e.value)
    assert str(bad) in msg and "20 payload bytes" in msg and "got 17" in msg and "truncated" in msg


def test_trailing_bytes_are_rejected(tmp_path):
    raw = _raw_idx(tmp_path, np.zeros(4, np.uint8))
    bad = tmp_path / "long.idx"
    bad.write_bytes(raw + b"xx")
    with pytest.raises(ValueError, match=r"long\.idx.*4 payload bytes, got 6 \(2 trailing bytes\)"):
        read_idx(bad)


def test_bad_magic_is_rejected(tmp_path):
    raw = _raw_idx(tmp_path, np.zeros(4, np.uint8))
    bad = tmp_path / "magic.idx"
    bad.write_bytes(b"\x01" + raw[1:])
    with pytest.raises(ValueError, match=r"magic\.idx: not an IDX file.*0x01 0x00"):
        read_idx(bad)


def test_unknown_type_code_is_rejected(tmp_path):
    raw = _raw_idx(tmp_path, np.zeros(4, np.uint8))
    bad = tmp_path / "code.idx"
    bad.write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(ValueError, match=r"code\.idx: unknown IDX type code 0x07; expected one of 0x08 \(uint8\)"):
        read_idx(bad)


def test_header_shorter_than_declared_ndim_is_rejected(tmp_path):
    bad = tmp_path / "hdr.idx"
    bad.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"hdr\.idx: IDX header declares ndim=3 and needs 16 bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="shorter than the 4-byte IDX magic"):
        read_idx(bad)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_gzip_stream_gives_value_error(tmp_path, damage):
    raw = _raw_idx(tmp_path, np.arange(1000, dtype=np.int32))
    z = bytearray(gzip.compress(raw))
    if damage == "truncate":
        z = z[: len(z) // 2]
    else:
        z[len(z) // 2] ^= 0xFF
    bad = tmp_path / "bad.gz"
    bad.write_bytes(bytes(z))
    with pytest.raises(ValueError, match=r"bad\.gz: corrupted gzip stream"):
        read_idx(bad)


# --------------------------------------------------------------------------- Fashion-MNIST
def _fake_fashion(root, n_train=12, n_test=7, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        write_idx(root / (name + sfx), a)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_fashion_via_explicit_path(tmp_path, gz):
    arrays = _fake_fashion(tmp_path / "fm", gz=gz)
    d = load_fashion_mnist(tmp_path / "fm")
    assert list(d) == ["x_train", "y_train", "x_test", "y_test"]
    assert d["x_train"].shape == (12, 784) and d["x_train"].dtype == np.float32
    assert d["x_test"].shape == (7, 784) and d["y_test"].shape == (7,) and d["y_test"].dtype == np.int64
    expected = (arrays["train-images-idx3-ubyte"].reshape(12, 784) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(d["x_train"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(d["y_train"], arrays["train-labels-idx1-ubyte"])


def test_load_fake_fashion_options(tmp_path):
    arrays = _fake_fashion(tmp_path)
    d = load_fashion_mnist(tmp_path, normalize=False, flatten=False, dtype=np.float64,
                           limit_train=5, limit_test=100)
    assert d["x_train"].shape == (5, 1, 28, 28) and d["x_train"].dtype == np.float64
    assert d["x_test"].shape == (7, 1, 28, 28)  # limit larger than the split keeps everything
    np.testing.assert_array_equal(d["x_train"][:, 0] * 255, arrays["train-images-idx3-ubyte"][:5])
    raw = load_fashion_mnist(tmp_path, normalize=False, dtype=np.uint8)
    np.testing.assert_array_equal(raw["x_test"].reshape(7, 28, 28), arrays["t10k-images-idx3-ubyte"])
    with pytest.raises(ValueError, match="dtype must be floating"):
        load_fashion_mnist(tmp_path, dtype=np.uint8)  # normalize=True needs floats
    with pytest.raises(ValueError, match="limit_train must be an int >= 0"):
        load_fashion_mnist(tmp_path, limit_train=-1)


def test_bll_data_env_var_is_used_and_explicit_path_wins(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "env", n_train=3)
    _fake_fashion(tmp_path / "arg", n_train=4)
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "env"))
    assert fashion_mnist_available()
    assert len(load_fashion_mnist()["x_train"]) == 3
    assert len(load_fashion_mnist(tmp_path / "arg")["x_train"]) == 4
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "nowhere"))
    assert not fashion_mnist_available()
    assert fashion_mnist_available(tmp_path / "arg")


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("BLL_DATA", raising=False)
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist(missing)
    assert str(e.value) == (f"no Fashion-MNIST under {missing}; "
                            "apt-get install dataset-fashion-mnist or set BLL_DATA")
    _fake_fashion(tmp_path / "partial")
    os.remove(tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_fashion_mnist(tmp_path / "partial")


@pytest.mark.parametrize("problem, message", [
    ("label_range", r"labels must be in 0\.\.9, found 10"),
    ("count", "has 12 images but .* has 11 labels"),
    ("image_shape", r"expected \(N, 28, 28\) uint8 images, got \(12, 28, 27\)"),
    ("label_dtype", r"expected \(N,\) uint8 labels, got \(12,\) int32"),
])
def test_invalid_fashion_files_are_rejected(tmp_path, problem, message):
    _fake_fashion(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    if problem == "label_range":
        write_idx(labels, np.full(12, 10, np.uint8))
    elif problem == "count":
        write_idx(labels, np.zeros(11, np.uint8))
    elif problem == "image_shape":
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 27), np.uint8))
    else:
        write_idx(labels, np.zeros(12, np.int32))
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not fashion_mnist_available(DEFAULT_FASHION_MNIST_PATH),
                    reason=f"Fashion-MNIST not installed under {DEFAULT_FASHION_MNIST_PATH} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_with_limits():
    d = load_fashion_mnist(DEFAULT_FASHION_MNIST_PATH, limit_train=500, limit_test=200)
    assert d["x_train"].shape == (500, 784) and d["x_test"].shape == (200, 784)
    assert d["y_train"].shape == (500,) and d["y_test"].shape == (200,)
    lo, hi = -FASHION_MNIST_MEAN / FASHION_MNIST_STD, (1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    for x in (d["x_train"], d["x_test"]):
        assert x.dtype == np.float32 and np.isclose(x.min(), lo) and np.isclose(x.max(), hi)
        assert abs(x.mean()) < 0.2 and 0.8 < x.std() < 1.2  # roughly standardised
    assert set(np.unique(d["y_train"])) == set(range(10))
    assert len(FASHION_MNIST_CLASSES) == 10


# --------------------------------------------------------------------------- batching
def test_batches_cover_every_index_once_and_are_seed_deterministic():
    x = np.arange(23)[:, None] * np.ones((1, 3))
    y = np.arange(23)
    first = [yb for _, yb in batches(x, y, 5, rng=7)]
    again = [yb for _, yb in batches(x, y, 5, rng=np.random.default_rng(7))]
    assert [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sorted(np.concatenate(first).tolist()) == list(range(23))
    assert not np.array_equal(np.concatenate(first), y)  # actually shuffled
    for xb, yb in batches(x, y, 5, rng=7):
        np.testing.assert_array_equal(xb[:, 0], yb)  # x and y stay paired


def test_batches_generator_advances_between_epochs():
    x = y = np.arange(50)
    g = np.random.default_rng(0)
    e1 = np.concatenate([yb for _, yb in batches(x, y, 8, rng=g)])
    e2 = np.concatenate([yb for _, yb in batches(x, y, 8, rng=g)])
    assert not np.array_equal(e1, e2) and sorted(e2) == list(range(50))


def test_batches_no_shuffle_and_drop_last():
    x = y = np.arange(10)
    assert [yb.tolist() for _, yb in batches(x, y, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(yb) for _, yb in batches(x, y, 4, rng=0, drop_last=True)] == [4, 4]


def test_batches_validates_arguments_at_call_time():
    with pytest.raises(ValueError, match="same length, got 3 and 4"):
        batches(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        batches(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(ValueError, match="rng must be a numpy Generator"):
        batches(np.zeros(3), np.zeros(3), 1, rng=np.random.RandomState(0))


def test_one_hot():
    out = one_hot(np.array([[2, 0], [1, 2]]), 3)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [0, 0, 1])
    np.testing.assert_array_equal(out.argmax(-1), [[2, 0], [1, 2]])
    assert out.sum() == 4
    assert one_hot([1], 2, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2, found values in -1\.\.1"):
        one_hot([-1, 1], 3)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2, found values in 0\.\.3"):
        one_hot([0, 3], 3)
    with pytest.raises(ValueError, match="integer labels, got dtype float64"):
        one_hot([0.0, 1.0], 3)


# --------------------------------------------------------------------------- synthetic tasks
def test_permutation_reversal_rows_are_permutations_and_y_is_reversed():
    x, y = permutation_reversal(200, rng=0)
    assert x.shape == y.shape == (200, 10) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(np.sort(x, axis=1), np.tile(np.arange(10), (200, 1)))
    np.testing.assert_array_equal(y, x[:, ::-1])
    assert len({tuple(r) for r in x}) > 190  # rows differ
    x2, y2 = permutation_reversal(200, rng=0)
    np.testing.assert_array_equal(x, x2)
    assert permutation_reversal(3, length=4, rng=1)[0].shape == (3, 4)


def test_synthetic_classification_is_deterministic_and_learnable():
    x, y = synthetic_classification(400, rng=0)
    x2, y2 = synthetic_classification(400, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (400, 20) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [100] * 4
    # different rng, same task: class means from train classify a fresh test set
    xt, yt = synthetic_classification(400, rng=1)
    mu = np.stack([x[y == k].mean(0) for k in range(4)])
    acc = np.mean(((xt[:, None] - mu) ** 2).sum(-1).argmin(1) == yt)
    assert acc > 0.85


def test_synthetic_images_are_deterministic_and_class_dependent():
    x, y = synthetic_images(400, rng=0)
    x2, y2 = synthetic_images(400, rng=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (400, 1, 12, 12) and x.dtype == np.float32 and set(y.tolist()) == {0, 1, 2, 3}
    xt, yt = synthetic_images(400, rng=1)
    mu = np.stack([x[y == k].reshape(-1, 144).mean(0) for k in range(4)])
    acc = np.mean(((xt.reshape(-1, 1, 144) - mu) ** 2).sum(-1).argmin(1) == yt)
    assert acc > 0.6
    assert synthetic_images(5, n_classes=3, size=8, rng=0, dtype=np.float64)[0].shape == (5, 1, 8, 8)
