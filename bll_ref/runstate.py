"""Resumable runs: at every epoch end the state of a run is written to RUN_DIR/state/.

Layout (format ``bll_ref-runstate``, version 1)::

    state/learner<k>-epoch<e>.npz   one file per BLL learner (block, head, feedback, optimiser
                                    moments and step counters, statistics), or
    state/method-epoch<e>.npz       the whole state of a BP / FA run
    state/trainer.json              written last: the completed epoch e, the batch-order RNG
                                    state, the history so far, the run's options and file names

Every file is written atomically, and trainer.json only after all files of epoch e exist, so a run
killed at any moment resumes from the last epoch that trainer.json names; files of older epochs
are removed after trainer.json moved on. Arrays are stored with ``allow_pickle=False``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import stat
import zipfile

import numpy as np

from .fileio import npz_entries, write_json_atomic, write_npz

__all__ = ["save", "load", "read_trainer", "FORMAT", "VERSION", "TRAINER"]

FORMAT, VERSION = "bll_ref-runstate", 1
TRAINER = "trainer.json"


def _part_names(method) -> list[str]:
    """One part per learner for BLL, one for other methods."""
    return [f"learner{l.k}" for l in method.learners] if hasattr(method, "learners") else ["method"]


def _part_state(method, name) -> dict:
    return method.state_dict() if name == "method" else method.learners[int(name[len("learner"):])].state_dict()


def _held(method, name) -> bool:
    """False for a learner this process does not hold (an MPI rank's ``Released`` stand-in)."""
    return name == "method" or getattr(method.learners[int(name[len("learner"):])], "held", True)


def _load_part(method, name, state):
    if name == "method":
        method.load_state_dict(state)
    else:
        method.learners[int(name[len("learner"):])].load_state_dict(state)


def save(state_dir, method, epoch, rng_state, history, options=None, on_file=None, parts=None):
    """Write the state of ``method`` after ``epoch`` completed epochs; ``on_file()`` is called
    after each file written (an MPI rank 0 beats there: ``parallel.mpi``). ``parts``: (name, state)
    pairs for every part in order (``learner<k>`` or ``method``), consumed one at a time (an MPI rank
    0 receives the other ranks' learners as it writes them); default: ``method``'s own."""
    os.makedirs(state_dir, exist_ok=True)
    names, files = _part_names(method), {}
    parts = ((name, _part_state(method, name)) for name in names) if parts is None else parts
    for name, state in parts:
        files[name] = f"{name}-epoch{epoch}.npz"
        write_npz(os.path.join(state_dir, files[name]), state)
        if on_file:
            on_file()
    if list(files) != names:
        raise RuntimeError(f"state parts {list(files)[:6]} are not the model's {names[:6]}; nothing new resumable written")
    write_json_atomic(os.path.join(state_dir, TRAINER), {
        "format": FORMAT, "version": VERSION, "epoch": int(epoch), "method": method.name,
        "rng": rng_state, "history": history, "options": options or {}, "files": files})
    keep = set(files.values()) | {TRAINER}
    for old in glob.glob(os.path.join(state_dir, "*-epoch*.npz")):
        if os.path.basename(old) not in keep:
            os.remove(old)


# The types of the stored `train` options (None: not given). Options added later and unknown here
# are not checked here; the CLI checks every value as it checks a new run's.
_NUM, _INT = (int, float), (int,)
_OPTION_TYPES = {
    **{k: (str,) for k in ("method", "model", "sizes", "activation", "optimizer", "dtype", "data", "out",
                           "resume", "parallel", "variational", "feedback", "eq8_terms")},
    **{k: _INT for k in ("width", "channels", "config_version", "epochs", "batch_size", "seed", "limit_train", "limit_test", "workers",
                         "blas_threads", "span")},
    **{k: _NUM for k in ("lr", "momentum", "var_weight", "tau", "m", "head_weight", "l2", "feedback_decay",
                         "feedback_lr")},
    **{k: (bool,) for k in ("no_anneal", "no_head", "no_kernels")}}
# per-epoch lists of the history that fit extends on resume, and whether their items are numbers
_HISTORY_LISTS = {"epochs": True, "test_acc": True, "train_loss": True, "epoch_seconds": True,
                  "samples_per_s": True, "diagnostics": False}
_STATE_FILE = re.compile(r"[A-Za-z0-9_]+-epoch[0-9]+\.npz\Z")


def _is(v, kinds):
    """isinstance, where a bool is not an int or a float (JSON true is not 1)."""
    return isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))


def _regular_file(path, what):
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{path}: {what} unreadable ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file")


def read_trainer(state_dir) -> dict:
    """The parsed trainer.json of a run; ValueError naming the file and the entry for anything
    unusable (as strict as ``checkpoint.load`` is with a checkpoint)."""
    path = os.path.join(state_dir, TRAINER)
    if not os.path.lexists(path):
        raise ValueError(f"{state_dir} holds no resumable state ({TRAINER} missing): the run did not "
                         "finish an epoch, or it is not a bll-ref run directory")
    _regular_file(path, "the run's trainer state")  # a FIFO would block the read
    try:
        with open(path, encoding="utf-8") as f:
            t = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(t, dict) or t.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    version = t.get("version", 1)
    if not _is(version, _INT) or version < 1:
        raise ValueError(f"{path}: entry 'version' must be a whole number >= 1, got {version!r}")
    if version > VERSION:
        raise ValueError(f"{path}: version {version} is newer than this bll_ref reads ({VERSION})")
    for key, kind in (("epoch", int), ("rng", dict), ("history", dict), ("files", dict), ("method", str)):
        if not _is(t.get(key), (kind,)):
            raise ValueError(f"{path}: entry {key!r} missing or not a {kind.__name__}")
    if t["epoch"] < 1:
        raise ValueError(f"{path}: entry 'epoch' must be >= 1, got {t['epoch']}")
    _check_trainer_entries(path, t)
    return t


def _check_trainer_entries(path, t):
    try:  # the batch-order state must be one a PCG64 takes (fit's generator)
        np.random.default_rng(0).bit_generator.state = t["rng"]
    except (TypeError, ValueError, KeyError, OverflowError):
        raise ValueError(f"{path}: entry 'rng' is not the state of a PCG64 generator") from None
    h = t["history"]
    for key, numbers in _HISTORY_LISTS.items():
        v = h.get(key)
        if not isinstance(v, list) or len(v) != t["epoch"] or numbers and not all(_is(x, _NUM) for x in v):
            raise ValueError(f"{path}: entry 'history.{key}' must be a list of {t['epoch']} "
                             f"{'numbers' if numbers else 'entries'} (one per epoch)")
    options = t.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: entry 'options' must be an object")
    for k, v in options.items():
        kinds = _OPTION_TYPES.get(k)
        if kinds and v is not None and not _is(v, kinds):
            raise ValueError(f"{path}: entry 'options.{k}' must be {' or '.join(x.__name__ for x in kinds)} "
                             f"or null, got {type(v).__name__} {json.dumps(v)[:40]}")
    for k, v in t["files"].items():
        if not isinstance(v, str) or not _STATE_FILE.match(v):
            raise ValueError(f"{path}: entry 'files.{k}' must name a NAME-epochE.npz file inside state/, "
                             f"got {json.dumps(v)[:60]}")


def load(state_dir, method) -> dict:
    """Load the last complete epoch's state into ``method``; returns the trainer record."""
    t = read_trainer(state_dir)
    if t["method"] != method.name:
        raise ValueError(f"{state_dir}: state of a {t['method']!r} run, cannot resume it as {method.name!r}")
    want = set(_part_names(method))
    if set(t["files"]) != want:
        raise ValueError(f"{state_dir}: state holds {sorted(t['files'])}, this model needs {sorted(want)}")
    for name, fname in t["files"].items():
        if not _held(method, name):
            continue  # a learner another MPI rank trains (parallel/shard.py): its state is loaded there
        path = os.path.join(state_dir, fname)
        _regular_file(path, "saved state")
        current = _part_state(method, name)
        if not zipfile.is_zipfile(path):  # np.load would call a text file "pickled data"
            with open(path, "rb") as f:
                head = f.read(8)
            raise ValueError(f"{path}: the saved state is not an .npz (zip) archive (it starts with {head!r}); "
                             "the file is damaged or was replaced")
        try:
            _check_declared(path, npz_entries(path), current)  # sizes before any array is read
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except ValueError as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"{path}: cannot read the saved state ({e})") from None
        except Exception as e:  # truncated or foreign zip: BadZipFile, EOFError, ...
            raise ValueError(f"{path}: cannot read the saved state ({type(e).__name__}: {e})") from None
        _check_part(path, state, current)
        _load_part(method, name, state)
    return t


# dtype kinds a saved array may have for a current one of a kind (no silent complex/float casts)
_SAME_KIND = {"b": "b", "i": "iu", "u": "iu", "f": "f", "U": "U"}


def _check_declared(path, entries, current):
    """The declared (header) shape of every entry this run has must be its shape; entries it does
    not have may take at most as many bytes as the whole current state (checked before reading)."""
    extra, budget = 0, sum(np.asarray(v).nbytes for v in current.values()) + (1 << 20)
    for k, (shape, dtype) in entries.items():
        if k in current:
            if tuple(shape) != np.shape(current[k]):
                raise ValueError(f"{path}: entry {k!r} has shape {tuple(shape)}, this run needs "
                                 f"{np.shape(current[k])}; the saved state is damaged or belongs to another run")
        else:
            extra += math.prod(shape) * dtype.itemsize
    if extra > budget:
        raise ValueError(f"{path}: entries this run does not use declare {extra:,} bytes, more than its whole "
                         f"state ({budget:,}); the saved state is damaged or belongs to another run")


def _check_part(path, saved, current):
    """Every saved array real (no complex, object or bytes) and, where this run's method has the
    entry, of its shape and kind: never cast or broadcast silently."""
    for k, a in saved.items():
        if a.dtype.kind not in "biufU":
            raise ValueError(f"{path}: entry {k!r} has dtype {a.dtype}; the saved state is damaged")
        if k not in current:
            continue
        c = np.asarray(current[k])
        if a.shape != c.shape:
            raise ValueError(f"{path}: entry {k!r} has shape {a.shape}, this run needs {c.shape}; the saved "
                             "state is damaged or belongs to another run")
        if a.dtype.kind not in _SAME_KIND.get(c.dtype.kind, c.dtype.kind):
            raise ValueError(f"{path}: entry {k!r} has dtype {a.dtype}, this run needs {c.dtype}; the saved "
                             "state is damaged or belongs to another run")
