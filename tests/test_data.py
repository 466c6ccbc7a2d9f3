"""bll_ref.data: IDX format, Fashion-MNIST loader, batching, synthetic tasks."""
import gzip
import os

import numpy as np
import pytest

from bll_ref import data
from bll_ref.data import (
    DEFAULT_FASHION_MNIST_PATH, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    batches, fashion_mnist_available, load, load_fashion_mnist, one_hot, permutation_reversal,
    read_idx, resolve_source, synthetic_classification, synthetic_images, write_idx,
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
    assert str(e.value) == (f"no Fashion-MNIST under {missing} (given as path): no such directory; "
                            "apt-get install dataset-fashion-mnist or set BLL_DATA")
    _fake_fashion(tmp_path / "partial")
    os.remove(tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]; apt-get install "):
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



# --------------------------------------------------------------------------- data policy: load
HINT = "apt-get install dataset-fashion-mnist or set BLL_DATA"


@pytest.fixture
def no_env(tmp_path, monkeypatch):
    """No $BLL_DATA and a default path (returned) that does not exist yet."""
    monkeypatch.delenv("BLL_DATA", raising=False)
    default = tmp_path / "default"
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(default))
    return default


def _old_cli_synthetic(images, n_train=4000, n_test=1000):
    """What bll_ref.cli.load_data drew before ``load`` existed (seed 1234, 10 classes)."""
    if images:
        x, y = synthetic_images(n_train + n_test, n_classes=10, size=28, rng=1234)
    else:
        x, y = synthetic_classification(n_train + n_test, n_features=784, n_classes=10, rng=1234)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def _assert_same(d, expected):
    assert list(d) == ["x_train", "y_train", "x_test", "y_test"]
    for k in expected:
        assert d[k].dtype == expected[k].dtype and d[k].shape == expected[k].shape, k
        np.testing.assert_array_equal(d[k], expected[k])


@pytest.mark.parametrize("images", [False, True])
def test_synthetic_source_is_bit_identical_to_the_old_cli_data(no_env, images):
    lines = []
    d, name = load("synthetic", images=images, log=lines.append)
    assert name == "synthetic"
    _assert_same(d, _old_cli_synthetic(images))
    kind = "images" if images else "clusters"
    assert lines == [f"data: synthetic {kind} (4000 train / 1000 test), as asked (source 'synthetic')"]
    d, _ = load("synthetic", images=images, limit_train=300, limit_test=50, log=None)
    _assert_same(d, _old_cli_synthetic(images, 300, 50))
    if not images:
        x, y = synthetic_classification(5000, n_features=784, n_classes=10, rng=1234)
        d, _ = load("synthetic", log=None)
        np.testing.assert_array_equal(d["x_train"], x[:4000])
        np.testing.assert_array_equal(d["y_test"], y[4000:])


def test_synthetic_source_ignores_an_existing_dataset_and_takes_dtype_and_rng(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "fm"))
    d, name = load("synthetic", limit_train=10, limit_test=5, dtype=np.float64, rng=0, log=None)
    assert name == "synthetic" and d["x_train"].shape == (10, 784) and d["x_train"].dtype == np.float64
    x, _ = synthetic_classification(15, n_features=784, n_classes=10, rng=0, dtype=np.float64)
    np.testing.assert_array_equal(d["x_test"], x[10:])
    with pytest.raises(ValueError, match="source='synthetic', which reads no files"):
        load("synthetic", path=tmp_path / "fm")


@pytest.mark.parametrize("images", [False, True])
def test_fashion_mnist_source_reads_the_given_path_and_logs_it(tmp_path, no_env, images):
    arrays = _fake_fashion(tmp_path / "fm")
    _fake_fashion(no_env, n_train=3)  # a complete default must not win over path
    lines = []
    d, name = load("fashion-mnist", images=images, path=tmp_path / "fm", limit_train=5, log=lines.append)
    assert name == "fashion-mnist"
    assert lines == [f"data: Fashion-MNIST (5 train / 7 test) from {tmp_path / 'fm'}"]
    _assert_same(d, load_fashion_mnist(tmp_path / "fm", flatten=not images, limit_train=5))
    assert d["x_train"].shape == ((5, 1, 28, 28) if images else (5, 784))
    np.testing.assert_array_equal(d["y_test"], arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_source_uses_bll_data_then_the_default(tmp_path, no_env, monkeypatch):
    _fake_fashion(no_env, n_train=3)
    assert len(load("fashion-mnist", log=None)[0]["x_train"]) == 3
    _fake_fashion(tmp_path / "env", n_train=4)
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "env"))
    assert len(load("fashion-mnist", log=None)[0]["x_train"]) == 4
    assert len(load("auto", log=None)[0]["x_train"]) == 4


@pytest.mark.parametrize("source", ["auto", "fashion-mnist"])
def test_explicit_bll_data_that_does_not_exist_is_an_error_naming_it(tmp_path, no_env, monkeypatch, source):
    _fake_fashion(no_env)  # a complete default path must not be a quiet fallback either
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("BLL_DATA", str(nowhere))
    with pytest.raises(FileNotFoundError) as e:
        load(source, log=None)
    assert str(e.value) == f"no Fashion-MNIST under {nowhere} (from $BLL_DATA): no such directory; {HINT}"


@pytest.mark.parametrize("source", ["auto", "fashion-mnist"])
def test_incomplete_bll_data_is_an_error_naming_the_missing_file(tmp_path, no_env, monkeypatch, source):
    _fake_fashion(tmp_path / "partial", gz=False)
    os.remove(tmp_path / "partial" / "train-labels-idx1-ubyte")
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "partial"))
    with pytest.raises(FileNotFoundError) as e:
        load(source, log=None)
    assert str(e.value) == (f"no Fashion-MNIST under {tmp_path / 'partial'} (from $BLL_DATA): "
                            f"missing train-labels-idx1-ubyte[.gz]; {HINT}")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("BLL_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"\(from \$BLL_DATA\): empty directory, missing "
                                                r"train-images-idx3-ubyte\[\.gz\], .*t10k-labels-idx1-ubyte\[\.gz\]; apt-get"):
        load(source, log=None)


def test_explicit_path_that_is_broken_is_an_error_even_for_auto(tmp_path, no_env):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(FileNotFoundError, match=r"under .*file \(given as path\): not a directory; apt-get"):
        load("auto", path=tmp_path / "file", log=None)
    with pytest.raises(FileNotFoundError, match=r"under .*nope \(given as path\): no such directory"):
        load(path=tmp_path / "nope", log=None)


def test_fashion_mnist_source_never_falls_back(no_env):
    with pytest.raises(FileNotFoundError) as e:
        load("fashion-mnist", log=None)
    assert str(e.value) == f"no Fashion-MNIST under {no_env} (the default path): no such directory; {HINT}"


def test_auto_without_bll_data_and_no_dataset_is_synthetic_and_says_why(no_env, capsys):
    d, name = load(images=True)  # default log=print
    assert name == "synthetic"
    _assert_same(d, _old_cli_synthetic(True))
    assert capsys.readouterr().out == (
        f"data: Fashion-MNIST not found under {no_env} (no such directory); "
        f"using synthetic images (4000 train / 1000 test) instead; {HINT}\n")
    _fake_fashion(no_env)
    os.remove(no_env / "t10k-images-idx3-ubyte.gz")
    lines = []
    d, name = load("auto", limit_test=20, log=lines.append)
    assert name == "synthetic" and len(d["x_test"]) == 20
    assert lines == [f"data: Fashion-MNIST not found under {no_env} (missing t10k-images-idx3-ubyte[.gz]); "
                     f"using synthetic clusters (4000 train / 20 test) instead; {HINT}"]


def test_auto_without_bll_data_uses_a_complete_default(no_env, monkeypatch):
    _fake_fashion(no_env, n_train=9)
    lines = []
    d, name = load(log=lines.append)
    assert name == "fashion-mnist" and d["x_train"].shape == (9, 784)
    assert lines == [f"data: Fashion-MNIST (9 train / 7 test) from {no_env}"]
    monkeypatch.setenv("BLL_DATA", "")  # empty counts as unset, as it always has
    assert load(log=None)[1] == "fashion-mnist"
    assert resolve_source() == ("fashion-mnist", str(no_env), "")


@pytest.mark.parametrize("source", ["synthetic", "fashion-mnist", "auto", "auto-missing"])
@pytest.mark.parametrize("name", ["limit_train", "limit_test"])
@pytest.mark.parametrize("bad", [0, -3, True, False, 2.0, "5"])
def test_limits_are_validated_for_every_source(tmp_path, no_env, source, name, bad):
    if source != "auto-missing":  # without a dataset, the limit error still comes first
        _fake_fashion(no_env)
    option = "--" + name.replace("_", "-")
    pattern = (rf"{name} \({option}\) must be >= 1, got {bad}" if type(bad) is int
               else rf"{name} \({option}\) must be an int >= 1 or None, got {bad!r}")
    with pytest.raises(ValueError, match=pattern):
        load(source.replace("-missing", ""), **{name: bad}, log=None)


@pytest.mark.parametrize("source", ["synthetic", "fashion-mnist"])
def test_limits_accept_numpy_ints_and_keep_at_most_all(no_env, source):
    _fake_fashion(no_env)
    d, _ = load(source, limit_train=np.int64(2), limit_test=1000, log=None)
    assert len(d["x_train"]) == 2 and len(d["x_test"]) == (7 if source == "fashion-mnist" else 1000)


@pytest.mark.parametrize("source", ["mnist", "Fashion-MNIST", "", None, 3])
def test_unknown_source_lists_the_choices(source):
    with pytest.raises(ValueError, match=r"data source must be one of 'auto', 'fashion-mnist', 'synthetic', got "):
        load(source)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_source(source)


def test_dtype_must_be_floating_and_is_honoured(no_env):
    with pytest.raises(ValueError, match="dtype must be floating, got int32"):
        load("synthetic", dtype=np.int32)
    _fake_fashion(no_env)
    assert load("fashion-mnist", images=True, dtype=np.float64, log=None)[0]["x_test"].dtype == np.float64


@pytest.mark.parametrize("state", ["complete", "raw-and-gz", "missing-file", "empty", "absent", "a-file"])
def test_fashion_mnist_available_agrees_with_load(tmp_path, no_env, monkeypatch, state):
    root = tmp_path / "fm"
    if state == "complete":
        _fake_fashion(root)
    elif state == "raw-and-gz":
        _fake_fashion(root, gz=False)
        os.rename(root / "t10k-images-idx3-ubyte", root / "t10k-images-idx3-ubyte.gz")
    elif state == "missing-file":
        _fake_fashion(root)
        os.remove(root / "train-images-idx3-ubyte.gz")
    elif state == "empty":
        root.mkdir()
    elif state == "a-file":
        root.write_bytes(b"")
    found = state in ("complete", "raw-and-gz")
    assert fashion_mnist_available(root) is found
    for loader in (lambda: load("fashion-mnist", path=root, log=None), lambda: load_fashion_mnist(root)):
        if found:
            loader()
        else:
            with pytest.raises(FileNotFoundError):
                loader()
    # without path: the same answer through $BLL_DATA, and through the default path for auto
    monkeypatch.setenv("BLL_DATA", str(root))
    assert fashion_mnist_available() is found
    monkeypatch.delenv("BLL_DATA")
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(root))
    assert fashion_mnist_available() is found
    assert resolve_source("auto")[0] == ("fashion-mnist" if found else "synthetic")


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


@pytest.mark.parametrize("source,images", [("fashion-mnist", False), ("fashion-mnist", True), ("synthetic", False)])
def test_skipped_arrays_are_stand_ins_that_hold_nothing_and_the_rest_is_unchanged(tmp_path, no_env, source, images):
    """What an MPI rank past the first stage loads (``parallel.unread_data``): stand-ins of the
    right shape and dtype for the skipped arrays, the others equal to a full load. A skipped image
    file is not even read: a damaged one goes unnoticed, a read one is refused."""
    from bll_ref.memory import held_bytes
    _fake_fashion(tmp_path / "fm")
    path = {"path": tmp_path / "fm"} if source == "fashion-mnist" else {}
    full, _ = load(source, images=images, limit_train=5, limit_test=6, log=None, **path)
    skip = ("x_test", "y_test", "x_train")
    part, _ = load(source, images=images, limit_train=5, limit_test=6, log=None, skip=skip, **path)
    for k in full:
        assert part[k].shape == full[k].shape and part[k].dtype == full[k].dtype, k
        if k in skip:
            assert held_bytes(part[k]) == 0 and not part[k].any() and held_bytes(full[k]) > 0, k
        else:
            np.testing.assert_array_equal(part[k], full[k])
    wide = data.as_float(part, np.float64)
    assert wide["x_train"].dtype == np.float64 and held_bytes(wide["x_train"]) == 0
    np.testing.assert_array_equal(wide["y_train"], full["y_train"])
    if source == "fashion-mnist":
        (tmp_path / "fm" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
        load(source, path=tmp_path / "fm", log=None, skip=("x_test", "y_test"))
        with pytest.raises(ValueError):
            load(source, path=tmp_path / "fm", log=None)


def test_unread_data_of_every_rank():
    from bll_ref.parallel import unread_data
    assert unread_data(0, 2) == ()
    assert unread_data(1, 2) == ("x_test", "y_test")  # a replica of the first stage reads the images
    assert unread_data(2, 2) == ("x_test", "y_test", "x_train")
    assert unread_data(1, None) == ("x_test", "y_test", "x_train")
