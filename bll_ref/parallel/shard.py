"""What an MPI rank holds of the model: only its own learners (block, head, feedback, optimisers).

Every rank, rank 0 included, builds the model and the method with ``SkipDraws`` generators (the
same draws as a real build, but zero weights that hold no memory until written), then draws the
initial weights of its own learners only (``draw_own``: the same bits a real build gives them), so
no other block's weights are ever written on it. Then it lets go of every other learner: the
learner is replaced by a ``Released`` placeholder and its block in the model by an empty
``Sequential``; a resumed run loads only the learners it holds (``runstate.load``). The
evaluation, the state files and the checkpoint are pipelines over the stages (``epoch_end.py``).
"""
from __future__ import annotations

import numpy as np

from ..layers import Sequential

__all__ = ["Released", "draw_own", "release_others", "state_bytes"]


class Released:
    """Stands in for learner k on a rank that does not train it: no arrays, no statistics
    (``held`` False: a resumed run does not load its saved state here, ``runstate.load``)."""

    held = False

    def __init__(self, k):
        self.k, self.stats, self.epoch = k, {}, 0

    def begin_epoch(self, epoch):
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {}

    def head_aux(self) -> dict:
        return {}

    def feedback_aux(self) -> dict:
        return {}

    def load_state_dict(self, state):
        raise RuntimeError(f"learner {self.k} is trained on another MPI rank; this rank does not hold it")


def state_bytes(learners) -> int:
    """Bytes of everything ``learners`` train with (parameters, buffers, optimiser moments, head,
    feedback): the arrays of their state dicts, whether written yet or not."""
    return int(sum(np.asarray(v).nbytes for l in learners for v in l.state_dict().values()))


def draw_own(method, keep, draws):
    """Write the initial weights of the learners in ``keep`` (block, head, trained feedback) from
    ``draws``, the ``SkipDraws`` generators the model and the method were built with, then drop
    the generators' notes; every other learner's weights stay zeros that hold no memory."""
    arrays = [a for k in keep for a in _arrays_of(method.learners[k], set())]
    for g in draws:
        g.draw_into(arrays)
        g.forget()


def _arrays_of(obj, seen):
    """Every array reachable from ``obj`` through this package's objects, dicts, lists and tuples
    (a learner reaches its block, optimiser, head and feedback, never another learner's)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
        return
    if isinstance(obj, dict):
        parts = obj.values()
    elif isinstance(obj, (list, tuple)):
        parts = obj
    elif type(obj).__module__.startswith("bll_ref.") and hasattr(obj, "__dict__"):
        parts = vars(obj).values()
    else:
        return
    for part in parts:
        yield from _arrays_of(part, seen)


def release_others(method, keep):
    """Replace every learner of ``method`` whose index is not in ``keep`` by ``Released`` and its
    block by an empty Sequential (in the model and in ``method.blocks``)."""
    keep = set(keep)
    for k, learner in enumerate(method.learners):
        if k in keep or isinstance(learner, Released):
            continue
        method.learners[k] = Released(k)
        method.model.layers[k] = Sequential()
        if hasattr(method, "blocks"):
            method.blocks[k] = method.model.layers[k]
