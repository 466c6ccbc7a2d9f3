"""Resumable runs: at every epoch end the state of a run is written to RUN_DIR/state/.

Layout (format ``bll_ref-runstate``, version 1):

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
import os

import numpy as np

from .fileio import write_json_atomic, write_npz

FORMAT, VERSION = "bll_ref-runstate", 1
TRAINER = "trainer.json"


def _part_names(method) -> list[str]:
    """One part per learner for BLL, one for other methods."""
    return [f"learner{l.k}" for l in method.learners] if hasattr(method, "learners") else ["method"]


def _part_state(method, name) -> dict:
    return method.state_dict() if name == "method" else method.learners[int(name[len("learner"):])].state_dict()


def _load_part(method, name, state):
    if name == "method":
        method.load_state_dict(state)
    else:
        method.learners[int(name[len("learner"):])].load_state_dict(state)


def save(state_dir, method, epoch, rng_state, history, options=None):
    """Write the state of ``method`` after ``epoch`` completed epochs."""
    os.makedirs(state_dir, exist_ok=True)
    files = {}
    for name in _part_names(method):
        files[name] = f"{name}-epoch{epoch}.npz"
        write_npz(os.path.join(state_dir, files[name]), _part_state(method, name))
    write_json_atomic(os.path.join(state_dir, TRAINER), {
        "format": FORMAT, "version": VERSION, "epoch": int(epoch), "method": method.name,
        "rng": rng_state, "history": history, "options": options or {}, "files": files})
    keep = set(files.values()) | {TRAINER}
    for old in glob.glob(os.path.join(state_dir, "*-epoch*.npz")):
        if os.path.basename(old) not in keep:
            os.remove(old)


def read_trainer(state_dir) -> dict:
    """The parsed trainer.json of a run; ValueError naming the problem for anything unusable."""
    path = os.path.join(state_dir, TRAINER)
    if not os.path.exists(path):
        raise ValueError(f"{state_dir} holds no resumable state ({TRAINER} missing): the run did not "
                         "finish an epoch, or it is not a bll-ref run directory")
    try:
        with open(path) as f:
            t = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(t, dict) or t.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if t.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {t['version']} is newer than this bll_ref reads ({VERSION})")
    for key, kind in (("epoch", int), ("rng", dict), ("history", dict), ("files", dict), ("method", str)):
        if not isinstance(t.get(key), kind):
            raise ValueError(f"{path}: entry {key!r} missing or not a {kind.__name__}")
    return t


def load(state_dir, method) -> dict:
    """Load the last complete epoch's state into ``method``; returns the trainer record."""
    t = read_trainer(state_dir)
    if t["method"] != method.name:
        raise ValueError(f"{state_dir}: state of a {t['method']!r} run, cannot resume it as {method.name!r}")
    want = set(_part_names(method))
    if set(t["files"]) != want:
        raise ValueError(f"{state_dir}: state holds {sorted(t['files'])}, this model needs {sorted(want)}")
    for name, fname in t["files"].items():
        path = os.path.join(state_dir, fname)
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the saved state ({type(e).__name__}: {e})") from None
        _load_part(method, name, state)
    return t
