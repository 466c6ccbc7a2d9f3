"""Data: Fashion-MNIST, mini-batches, and ``load``, the one place that decides between
Fashion-MNIST and the synthetic stand-in. The IDX format lives in ``bll_ref.idx`` and the
synthetic tasks in ``bll_ref.synthetic``; both are re-exported here.

Everything random takes ``rng`` (a ``np.random.Generator``, an int seed, or None for fresh
entropy); nothing here touches NumPy's global random state.
"""
from __future__ import annotations

import operator
import os

import numpy as np

from .batching import batches, one_hot
from .idx import read_idx, write_idx
from .memory import check_fits, held_bytes, stand_in
from .synthetic import permutation_reversal, synthetic_classification, synthetic_images

__all__ = [
    "read_idx", "write_idx",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "DEFAULT_FASHION_MNIST_PATH",
    "load_fashion_mnist", "fashion_mnist_available", "DATA_SOURCES", "resolve_source", "load", "as_float",
    "batches", "one_hot", "training_data",
    "permutation_reversal", "synthetic_classification", "synthetic_images",
]

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
                       limit_train=None, limit_test=None, skip=()) -> dict:
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
    skip : names among ``x_train``, ``y_train``, ``x_test``, ``y_test`` not to read: each comes
        back as a stand-in of its shape that holds no memory (``memory.stand_in``). A skipped
        image file is not opened; its count is taken from the labels.

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
        y = read_idx(y_file)
        x = read_idx(x_file) if f"x_{split}" not in skip else stand_in((len(y), 28, 28), np.uint8)
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
    return _skipped({k: out[k] for k in ("x_train", "y_train", "x_test", "y_test")}, skip)


def _skipped(d, skip):
    """``d`` with the arrays named in ``skip`` replaced by stand-ins of their shape and dtype."""
    return {k: stand_in(v.shape, v.dtype) if k in skip else v for k, v in d.items()}


def as_float(d, dtype) -> dict:
    """``d`` with its floating arrays converted to ``dtype``; stand-ins stay stand-ins."""
    return {k: (v if v.dtype.kind != "f" else v.astype(dtype) if held_bytes(v) or not v.size else
                stand_in(v.shape, dtype)) for k, v in d.items()}


def _pixels(x, normalize, dtype, flatten):
    """(N, 28, 28) uint8 -> scaled images of ``dtype``, (N, 784) or (N, 1, 28, 28)."""
    shape = (len(x), 784) if flatten else (len(x), 1, 28, 28)
    if x.size and not held_bytes(x):
        return stand_in(shape, dtype)  # a skipped file
    x = x.reshape(shape)
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
         dtype=np.float32, rng=_SYNTHETIC_SEED, log=print, skip=()) -> tuple[dict, str]:
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
    skip : names among ``x_train``, ``y_train``, ``x_test``, ``y_test`` this process never reads
        (an MPI rank past the first stage needs no images): they come back as stand-ins that hold
        no memory, and Fashion-MNIST image files skipped are not read.

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
                               limit_train=limit_train, limit_test=limit_test, skip=skip)
        say(f"data: Fashion-MNIST ({len(d['x_train'])} train / {len(d['x_test'])} test) from {root}")
        return d, name
    n_train, n_test = limit_train or _SYNTHETIC_TRAIN, limit_test or _SYNTHETIC_TEST
    check_fits(3 * (n_train + n_test) * 784 * dtype.itemsize,
               f"synthetic data of {n_train:,} + {n_test:,} examples (--limit-train/--limit-test)")
    try:
        if images:
            x, y = synthetic_images(n_train + n_test, n_classes=10, size=28, rng=rng, dtype=dtype)
        else:
            x, y = synthetic_classification(n_train + n_test, n_features=784, n_classes=10, rng=rng, dtype=dtype)
    except MemoryError:  # fits the machine's memory, not what is free now: say which sizes, not "out of memory"
        raise ValueError(f"synthetic data of {n_train:,} + {n_test:,} examples (--limit-train/--limit-test) "
                         f"needs about {3 * (n_train + n_test) * 784 * dtype.itemsize / 2 ** 30:,.1f} GiB, more "
                         "than the free memory") from None
    d = _skipped({"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]},
                 skip)
    what = f"synthetic {'images' if images else 'clusters'} ({n_train} train / {n_test} test)"
    say(f"data: {what}, {why}" if source == "synthetic" else
        f"data: {why}; using {what} instead; {_INSTALL_HINT}")
    return d, name


def training_data(meta, want="auto", *, images, limit_train=None, limit_test=None, log=print):
    """The data a checkpoint's model was trained on (``meta['data']``) unless ``want`` says otherwise.

    Synthetic data is regenerated with the training run's sizes, so the test split is the one the
    run was evaluated on; an explicit ``want`` that differs from the training data is warned about.
    Returns (data dict, source name).
    """
    trained = meta.get("data")
    if want == "auto":  # Fashion-MNIST when present, else the synthetic fallback (it says so)
        source = "synthetic" if trained == "synthetic" else "auto"
    else:
        source = want
    own = source == "synthetic" and trained == "synthetic"
    if own:
        opts = meta.get("options", {})
        limit_train, limit_test = opts.get("limit_train"), opts.get("limit_test")
    try:
        d, got = load(source, images=images, limit_train=limit_train, limit_test=limit_test, log=log)
    except ValueError as e:
        if not own:
            raise
        # the sizes come from the checkpoint, not from this command's options: say so
        raise ValueError(f"{e}; these are the checkpoint's own sizes (its run's --limit-train {limit_train} "
                         f"--limit-test {limit_test}), redrawn so that its synthetic test split is the one it "
                         "was evaluated on") from None
    if trained and got != trained and log:
        log(f"warning: the model was trained on {trained} data, using {got} data instead")
    return d, got
