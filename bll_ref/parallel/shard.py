"""What an MPI rank holds of the model: only its own learners (block, head, feedback, optimisers).

A rank other than 0 builds the model with ``SkipDraws`` (the same draws, but zero weights that hold
no memory until written) and receives the initial state of its own learners from rank 0
(``MPIPipeline._hand_out``), so only its own blocks are ever written. Then it lets go of every
other learner: the learner is replaced by a ``Released`` placeholder and its block in the model by
an empty ``Sequential``; a resumed run loads only the learners it holds (``runstate.load``). Rank 0
too: it builds the whole model once, for the initial weights it hands out, then keeps only its own
stage; the evaluation, the state files and the checkpoint are pipelines over the stages
(``epoch_end.py``).
"""
from __future__ import annotations

import numpy as np

from ..layers import Sequential

__all__ = ["Released", "release_others", "state_bytes"]


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
