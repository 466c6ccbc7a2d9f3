"""Data: the IDX file format, Fashion-MNIST, mini-batches, small synthetic tasks, and ``load``,
the one place that decides between Fashion-MNIST and the synthetic stand-in.

Everything random takes ``rng`` (a ``np.random.Generator``, an int seed, or None for fresh
entropy); nothing here touches NumPy's global random state.
"""
from __future__ import annotations

import gzip
import operator
import os
import zlib

import numpy as np

from .layers.base import as_rng

__all__ = [
    "read_idx", "write_idx",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "DEFAULT_FASHION_MNIST_PATH",
    "load_fashion_mnist", "fashion_mnist_available", "DATA_SOURCES", "resolve_source", "load",
    "batches", "one_hot",
    "permutation_reversal", "synthetic_classification", "synthetic_images",
]

# --------------------------------------------------------------------------- IDX format
# http://yann.lecun.com/exdb/mnist/ : magic = 0x00 0x00 <type code> <ndim>, then ndim
# big-endian uint32 sizes, then the data, big-endian, C order.
_IDX_TYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IDX_CODES = {(dt.kind, dt.itemsize): code for code, dt in _IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _idx_type_list() -> str:
    return ", ".join(f"0x{c:02X} ({dt.newbyteorder('=').name})" for c, dt in _IDX_TYPES.items())


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed; gzip is detected by its magic bytes 1f 8b).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    array : ndarray, shape = the dims in the header, dtype one of uint8, int8, int16, int32,
        float32, float64 (native byte order, writable, C-contiguous).

    Raises
    ------
    ValueError
        Corrupted gzip stream, bad magic, unknown type code, short header, or a payload whose
        size is not exactly prod(dims) * itemsize (truncated file or trailing bytes). The
        message names the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupted gzip stream ({e}); re-download or re-extract the file") from None
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than the 4-byte IDX magic; not an IDX file")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file: magic must start with 0x00 0x00, "
                         f"got 0x{data[0]:02X} 0x{data[1]:02X}")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {_idx_type_list()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header declares ndim={ndim} and needs {header} bytes, "
                         f"file has only {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else f"{got - expected} trailing bytes"
        raise ValueError(f"{path}: IDX header says shape {dims} of {dtype.newbyteorder('=').name}, "
                         f"i.e. {expected} payload bytes, got {got} ({what})")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def write_idx(path, array, *, compress=None) -> None:
    """Write ``array`` as an IDX file.

    Parameters
    ----------
    path : str or os.PathLike
    array : array_like of dtype uint8, int8, int16, int32, float32 or float64, any shape
        with at most 255 axes, each shorter than 2**32.
    compress : bool or None
        gzip the file; None (default) means: when the name ends in ``.gz``. The gzip header
        carries no time stamp, so equal arrays give equal files.
    """
    path = os.fspath(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise ValueError(f"write_idx: IDX has no type for dtype {array.dtype}; convert to one of "
                         "uint8, int8, int16, int32, float32, float64 first")
    if array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"write_idx: IDX holds at most 255 axes each < 2**32, got shape {array.shape}")
    header = bytes([0, 0, _IDX_CODES[key], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=_IDX_TYPES[_IDX_CODES[key]]).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with open(path, "wb") as f:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
                g.write(header + payload)
        else:
            f.write(header + payload)


# --------------------------------------------------------------------------- Fashion-MNIST
DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and std of the 60000 training images' pixels / 255 (all pixels pooled).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


_INSTALL_HINT = "apt-get install dataset-fashion-mnist or set BLL_DATA"


def _resolve_path(path) -> tuple[str, str]:
    """(directory, where it came from): ``path``, else ``$BLL_DATA`` (unless empty), else the
    module constant ``DEFAULT_FASHION_MNIST_PATH``, read at call time."""
    if path is not None:
        return os.fspath(path), "given as path"
    env = os.environ.get("BLL_DATA")
    if env:
        return env, "from $BLL_DATA"
    return DEFAULT_FASHION_MNIST_PATH, "the default path"


def _find_files(root: str) -> tuple[dict, list]:
    """key -> file found in ``root`` (raw name first, then .gz), and the names not found."""
    found, missing = {}, []
    for key, name in _FILES.items():
        for candidate in (name, name + ".gz"):
            full = os.path.join(root, candidate)
            if os.path.isfile(full):
                found[key] = full
                break
        else:
            missing.append(name + "[.gz]")
    return found, missing


def _problem(root: str, missing: list) -> str | None:
    """Why ``root`` holds no complete Fashion-MNIST, or None when all four files are there."""
    if not os.path.exists(root):
        return "no such directory"
    if not os.path.isdir(root):
        return "not a directory"
    if not missing:
        return None
    return f"{'empty directory, ' if not os.listdir(root) else ''}missing {', '.join(missing)}"


def _not_found(root, origin, problem) -> FileNotFoundError:
    return FileNotFoundError(f"no Fashion-MNIST under {root} ({origin}): {problem}; {_INSTALL_HINT}")


def fashion_mnist_available(path=None) -> bool:
    """True when all four Fashion-MNIST files exist under the directory ``load_fashion_mnist``
    would use (``path``, else ``$BLL_DATA``, else the default): exactly when
    ``load_fashion_mnist(path)`` and ``load("fashion-mnist", path=path)`` find the dataset
    rather than raise FileNotFoundError. Does not parse the files."""
    root, _ = _resolve_path(path)
    return _problem(root, _find_files(root)[1]) is None


def _check_limit(name, limit):
    if limit is None:
        return None
    try:
        limit = operator.index(limit)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 0 or None, got {limit!r}") from None
    if limit < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {limit}")
    return limit


def load_fashion_mnist(path=None, *, normalize=True, dtype=np.float32, flatten=True,
                       limit_train=None, limit_test=None) -> dict:
    """Load Fashion-MNIST from IDX files (gzip or raw).

    Parameters
    ----------
    path : str or os.PathLike or None
        Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        None: ``$BLL_DATA`` if set, else ``/usr/share/datasets/fashion-mnist``.
    normalize : bool
        True: ``(pixels / 255 - 0.2860) / 0.3530`` (training-set mean and std).
        False: ``pixels / 255`` in [0, 1] for a float ``dtype``; the raw pixel values 0..255
        for an integer ``dtype``.
    dtype : dtype
        Of the images. Floating, or integer with ``normalize=False``.
    flatten : bool
        Images as (N, 784) if True, else (N, 1, 28, 28).
    limit_train, limit_test : int or None
        Keep only the first n training / test examples (at most all of them).

    Returns
    -------
    data : dict with ``x_train`` (N_train, 784) or (N_train, 1, 28, 28), ``y_train``
        (N_train,) int64 in 0..9, ``x_test``, ``y_test`` likewise.

    Raises
    ------
    FileNotFoundError
        The directory is missing, or some of the four files are; the message names the
        directory, where it came from, the missing files and how to install them.
    ValueError
        A file is not valid IDX, or images are not (N, 28, 28) uint8, labels not (N,) uint8
        in 0..9, or the image and label counts differ.
    """
    root, origin = _resolve_path(path)
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.floating) or (np.issubdtype(dtype, np.integer) and not normalize)):
        raise ValueError(f"load_fashion_mnist: dtype must be floating (or integer with normalize=False), "
                         f"got {dtype} with normalize={normalize}")
    limits = {"train": _check_limit("limit_train", limit_train), "test": _check_limit("limit_test", limit_test)}
    found, missing = _find_files(root)
    problem = _problem(root, missing)
    if problem is not None:
        raise _not_found(root, origin, problem)
    out = {}
    for split in ("train", "test"):
        x_file, y_file = found[f"x_{split}"], found[f"y_{split}"]
        x, y = read_idx(x_file), read_idx(y_file)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{x_file}: expected (N, 28, 28) uint8 images, got {x.shape} {x.dtype}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise ValueError(f"{y_file}: expected (N,) uint8 labels, got {y.shape} {y.dtype}")
        if len(x) != len(y):
            raise ValueError(f"{x_file} has {len(x)} images but {y_file} has {len(y)} labels")
        if y.size and y.max() > 9:
            raise ValueError(f"{y_file}: labels must be in 0..9, found {int(y.max())}")
        n = len(x) if limits[split] is None else min(limits[split], len(x))
        out[f"x_{split}"] = _pixels(x[:n], normalize, dtype, flatten)
        out[f"y_{split}"] = y[:n].astype(np.int64)
    return {k: out[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def _pixels(x, normalize, dtype, flatten):
    """(N, 28, 28) uint8 -> scaled images of ``dtype``, (N, 784) or (N, 1, 28, 28)."""
    x = x.reshape(len(x), 784) if flatten else x.reshape(len(x), 1, 28, 28)
    if np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    x = x.astype(dtype)  # in place from here: a float64 copy of 60000 images is 376 MB
    x /= 255
    if normalize:
        x -= dtype.type(FASHION_MNIST_MEAN)
        x /= dtype.type(FASHION_MNIST_STD)
    return x


# --------------------------------------------------------------------------- data policy
DATA_SOURCES = ("auto", "fashion-mnist", "synthetic")
# Sizes and seed of the synthetic stand-in, as ``bll-ref train`` has always drawn it.
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST, _SYNTHETIC_SEED = 4000, 1000, 1234


def resolve_source(source="auto", path=None) -> tuple[str, str, str]:
    """Which data ``load`` would use, without loading it.

    * ``"fashion-mnist"``: the directory ``path``, else ``$BLL_DATA``, else
      ``DEFAULT_FASHION_MNIST_PATH``; missing, empty or incomplete is an error.
    * ``"auto"``: the same when ``path`` or ``$BLL_DATA`` is given (an explicit location that
      does not hold Fashion-MNIST is an error, never a quiet fallback); otherwise Fashion-MNIST
      from the default path when all four files are there, else the synthetic task.
    * ``"synthetic"``: the synthetic task; ``path`` must be None.

    Returns
    -------
    name : "fashion-mnist" or "synthetic"
    root : str, the Fashion-MNIST directory used, or looked in ("" for ``source="synthetic"``)
    why : str, "" for Fashion-MNIST, else why the synthetic task (one clause, for a log line)

    Raises
    ------
    ValueError
        ``source`` not one of ``DATA_SOURCES``, or a ``path`` with ``source="synthetic"``.
    FileNotFoundError
        No complete Fashion-MNIST where it was asked for; names the directory, where the
        directory came from, the missing files and how to install them.
    """
    if not isinstance(source, str) or source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {', '.join(map(repr, DATA_SOURCES))}, got {source!r}")
    if source == "synthetic":
        if path is not None:
            raise ValueError(f"path={os.fspath(path)!r} given with source='synthetic', which reads no "
                             "files; use source='fashion-mnist' or 'auto', or drop path")
        return "synthetic", "", "as asked (source 'synthetic')"
    root, origin = _resolve_path(path)
    problem = _problem(root, _find_files(root)[1])
    if problem is None:
        return "fashion-mnist", root, ""
    if source == "fashion-mnist" or path is not None or origin == "from $BLL_DATA":
        raise _not_found(root, origin, problem)
    return "synthetic", root, f"Fashion-MNIST not found under {root} ({problem})"


def _check_limit_cli(name, value):
    """None, or an int >= 1 (not bool); the message names the option both ways."""
    if value is None:
        return None
    option = "--" + name.replace("_", "-")
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(f"{name} ({option}) must be an int >= 1 or None, got {value!r}")
    value = index
    if value < 1:
        raise ValueError(f"{name} ({option}) must be >= 1, got {value}")
    return value


def load(source="auto", *, images=False, limit_train=None, limit_test=None, path=None,
         dtype=np.float32, rng=_SYNTHETIC_SEED, log=print) -> tuple[dict, str]:
    """The project's data policy in one call: Fashion-MNIST, or a synthetic stand-in, said out loud.

    Parameters
    ----------
    source : "auto", "fashion-mnist" or "synthetic"; see ``resolve_source`` for the rules.
    images : bool
        True: images (N, 1, 28, 28) for convolutional models (synthetic: 10 bar orientations,
        ``synthetic_images``); False: vectors (N, 784) (synthetic: 10 Gaussian clusters,
        ``synthetic_classification``).
    limit_train, limit_test : int >= 1 or None
        Fashion-MNIST: the first n examples (at most all). Synthetic: exactly n examples;
        None means 4000 train / 1000 test.
    path : str or os.PathLike or None
        Fashion-MNIST directory; overrides ``$BLL_DATA`` and makes ``"auto"`` strict.
    dtype : floating dtype of the inputs. Fashion-MNIST pixels are standardised with the
        training-set mean and std (``load_fashion_mnist`` defaults).
    rng : np.random.Generator or int or None
        Draws the synthetic task (ignored for Fashion-MNIST). The default 1234 gives the data
        ``bll-ref train`` has always used.
    log : callable or None
        Receives the one line saying which data was loaded and, for a fallback, why.

    Returns
    -------
    data : dict with ``x_train``, ``y_train`` (int64 in 0..9), ``x_test``, ``y_test``
    name : "fashion-mnist" or "synthetic", the source actually used

    Raises
    ------
    ValueError
        Unknown ``source``, bad limit, non-floating ``dtype``, invalid Fashion-MNIST files.
    FileNotFoundError
        Fashion-MNIST asked for (``source="fashion-mnist"``, ``path`` or ``$BLL_DATA``) but not
        complete there.
    """
    limit_train = _check_limit_cli("limit_train", limit_train)
    limit_test = _check_limit_cli("limit_test", limit_test)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"load: dtype must be floating, got {dtype}")
    name, root, why = resolve_source(source, path)
    say = log or (lambda line: None)
    if name == "fashion-mnist":
        d = load_fashion_mnist(root, dtype=dtype, flatten=not images,
                               limit_train=limit_train, limit_test=limit_test)
        say(f"data: Fashion-MNIST ({len(d['x_train'])} train / {len(d['x_test'])} test) from {root}")
        return d, name
    n_train, n_test = limit_train or _SYNTHETIC_TRAIN, limit_test or _SYNTHETIC_TEST
    if images:
        x, y = synthetic_images(n_train + n_test, n_classes=10, size=28, rng=rng, dtype=dtype)
    else:
        x, y = synthetic_classification(n_train + n_test, n_features=784, n_classes=10, rng=rng, dtype=dtype)
    d = {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}
    what = f"synthetic {'images' if images else 'clusters'} ({n_train} train / {n_test} test)"
    say(f"data: {what}, {why}" if source == "synthetic" else
        f"data: {why}; using {what} instead; {_INSTALL_HINT}")
    return d, name


# --------------------------------------------------------------------------- batching
def _check_count(name, value, minimum):
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def batches(x, y, batch_size, rng=None, shuffle=True, drop_last=False):
    """Mini-batches ``(xb, yb)`` covering every example once.

    Parameters
    ----------
    x : ndarray, shape (N, ...)
    y : ndarray, shape (N, ...)
    batch_size : int >= 1
    rng : np.random.Generator or int or None
        Source of the shuffling permutation. A Generator advances, so successive calls give
        fresh epochs; an int seed gives the same order on every call; None: fresh entropy.
    shuffle : bool
        False: batches in the given order (views, no copies).
    drop_last : bool
        Skip the final batch when it is shorter than ``batch_size``.

    Returns
    -------
    iterator of (xb, yb) : xb shape (B, ...), yb shape (B, ...), B = batch_size except possibly
        the last. Arguments are checked when ``batches`` is called, not on first ``next``.
    """
    if len(x) != len(y):
        raise ValueError(f"batches: x and y must have the same length, got {len(x)} and {len(y)}")
    batch_size = _check_count("batch_size", batch_size, 1)
    n = len(x)
    order = as_rng(rng).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    return _iterate(x, y, order, batch_size, stop)


def _iterate(x, y, order, batch_size, stop):
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def one_hot(y, n_classes, dtype=np.float32) -> np.ndarray:
    """One-hot encode integer labels.

    Parameters
    ----------
    y : array_like of int, any shape S, values in 0..n_classes-1
    n_classes : int >= 1
    dtype : dtype of the result

    Returns
    -------
    onehot : ndarray, shape S + (n_classes,)
    """
    n_classes = _check_count("n_classes", n_classes, 1)
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"one_hot expects integer labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"one_hot: labels must be in 0..{n_classes - 1}, "
                         f"found values in {int(y.min())}..{int(y.max())}")
    out = np.zeros(y.shape + (n_classes,), dtype=dtype)
    np.put_along_axis(out, y[..., None].astype(np.intp), 1, axis=-1)
    return out


# --------------------------------------------------------------------------- synthetic tasks
def permutation_reversal(n, *, length=10, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Sequence task of the BLL paper (Sec. 4.2): a random permutation of 0..length-1 in,
    the same sequence reversed out.

    Parameters
    ----------
    n : int >= 0, number of sequences
    length : int >= 1, sequence length and vocabulary size (10 in the paper)
    rng : np.random.Generator or int or None

    Returns
    -------
    x : ndarray, shape (n, length), int64; each row a permutation of 0..length-1
    y : ndarray, shape (n, length), int64; ``y = x[:, ::-1]``
    """
    n = _check_count("n", n, 0)
    length = _check_count("length", length, 1)
    x = as_rng(rng).permuted(np.tile(np.arange(length, dtype=np.int64), (n, 1)), axis=1)
    return x, np.ascontiguousarray(x[:, ::-1])


def synthetic_classification(n, *, n_features=20, n_classes=4, rng=None, separation=3.0,
                             task_seed=0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: class k is ``N(mu_k, I)`` with ``|mu_k| = separation``.

    The class means depend only on ``task_seed``, ``n_features`` and ``n_classes``, so a
    training and a test set drawn with different ``rng`` are the same task. Random means in
    20 dimensions are nearly orthogonal, so neighbouring clusters sit about
    ``separation * sqrt(2)`` apart; with the defaults the Bayes accuracy is about 95%.

    Parameters
    ----------
    n : int >= 0, number of examples (classes balanced to within one, in random order)
    n_features : int >= 1
    n_classes : int >= 2
    rng : np.random.Generator or int or None; draws the examples
    separation : float >= 0, norm of every class mean, in units of the noise std
    task_seed : int; draws the class means
    dtype : floating dtype of x

    Returns
    -------
    x : ndarray, shape (n, n_features), ``dtype``
    y : ndarray, shape (n,), int64 in 0..n_classes-1
    """
    n = _check_count("n", n, 0)
    n_features = _check_count("n_features", n_features, 1)
    n_classes = _check_count("n_classes", n_classes, 2)
    if not separation >= 0:
        raise ValueError(f"separation must be >= 0, got {separation}")
    mu = np.random.default_rng(task_seed).standard_normal((n_classes, n_features))
    mu *= separation / np.linalg.norm(mu, axis=1, keepdims=True)
    rng = as_rng(rng)
    y = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    x = mu[y] + rng.standard_normal((n, n_features))
    return x.astype(dtype), y


def synthetic_images(n, *, n_classes=4, size=12, rng=None, noise=0.3, dtype=np.float32
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Small images of one bar each; the class is the bar's orientation ``pi * k / n_classes``.

    Each bar passes near the centre, shifted by up to ``size / 6`` pixels in each direction,
    with a random contrast in [0.7, 1.3] and Gaussian pixel noise of std ``noise``, so a
    classifier must detect orientation rather than match fixed pixels: a task for
    convolutions. Bar width is ``size / 12`` pixels (std of the Gaussian profile).

    Parameters
    ----------
    n : int >= 0
    n_classes : int >= 2 (up to about size / 1.5 stays clearly separable)
    size : int >= 4, image height and width
    rng : np.random.Generator or int or None
    noise : float >= 0, std of the additive pixel noise
    dtype : floating dtype of x

    Returns
    -------
    x : ndarray, shape (n, 1, size, size), ``dtype``; roughly in [-1, 2]
    y : ndarray, shape (n,), int64 in 0..n_classes-1
    """
    n = _check_count("n", n, 0)
    n_classes = _check_count("n_classes", n_classes, 2)
    size = _check_count("size", size, 4)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = as_rng(rng)
    y = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    theta = np.pi * y / n_classes
    centre = (size - 1) / 2 + rng.uniform(-size / 6, size / 6, size=(n, 2))
    contrast = rng.uniform(0.7, 1.3, size=n)
    r = np.arange(size, dtype=np.float64)
    dr = r[None, :, None] - centre[:, 0, None, None]  # rows, (n, size, 1)
    dc = r[None, None, :] - centre[:, 1, None, None]  # cols, (n, 1, size)
    # distance from the line through the centre with direction (sin theta, cos theta)
    d = dr * np.cos(theta)[:, None, None] - dc * np.sin(theta)[:, None, None]
    width = size / 12
    x = contrast[:, None, None] * np.exp(-0.5 * (d / width) ** 2)
    x = x + noise * rng.standard_normal(x.shape)
    return x[:, None].astype(dtype), y
