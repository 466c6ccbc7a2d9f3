"""The pipeline schedule's GPU form: every block learner of a BLL model on its own CUDA stream.

BLL has no backward dependency between blocks (span 1, label-only feedback), so within a step the
only ordering a learner needs is its input: learner k's stream waits for the event recorded on
learner k-1's stream right after k-1's forward pass, and nothing else. While block k-1 runs its
local loss, backward and optimiser step on its stream, block k forwards and updates on its own,
and the GPU overlaps them. Updates are the same as the sequential loop's (each learner forwards
with its pre-update weights and updates from its own loss); only the order in which independent
kernels execute differs, and since every kernel here is deterministic and each stream's work is
the same sequence, the results are those of the one-stream run, bit for bit.

Memory: arrays handed between streams (h_{k-1}) are allocated on stream k-1 and read on stream k.
The streams are CuPy blocking streams, which the legacy default stream synchronises with: the
batch copies at the start of the next step (on the default stream) wait for every stream's work,
so no array of a step is freed and reused while another stream may still read it.
"""
from __future__ import annotations

from .. import backend
from .base import OneProcess

__all__ = ["StreamSchedule"]


class StreamSchedule(OneProcess):
    """One CUDA stream per block learner (``streams_per_block=False``: all on one stream, the
    baseline it is measured against). The method must be on the GPU (``method.to('cuda')``)."""

    name = "streams"

    def __init__(self, method, streams_per_block=True):
        cp = backend.require_cuda()
        if method.device != "cuda":
            raise ValueError("the streams schedule runs a model on the GPU; use --device cuda")
        n = len(method.learners) if streams_per_block else 1
        self.streams = [cp.cuda.Stream(non_blocking=False) for _ in range(n)]
        self.events = [cp.cuda.Event(disable_timing=True) for _ in range(n)]
        self.workers = n

    def step(self, method, x, y):
        """One BLL step with each learner on its stream; returns the output loss (device scalar)."""
        Y = method.one_hot(y)  # on the host: validates the labels before the copies
        x, y, Y = method._batch(x), method._batch(y), method._batch(Y)  # default stream
        h, prev = x, None
        for learner in method.learners:
            k = learner.k % len(self.streams)
            stream, event = self.streams[k], self.events[k]
            with stream:
                if prev is not None and prev is not event:
                    stream.wait_event(prev)
                h = learner.forward(h)
                event.record(stream)  # the hand-off: h_k is ready for learner k+1
                learner.update(y, Y)
            prev = event
        return method.learners[-1].last_loss

    def run_epoch(self, method, batches, on_step):
        losses = []
        for step, (xb, yb) in enumerate(batches, 1):
            loss = self.step(method, xb, yb)
            losses.append(loss)
            on_step(step, loss)
        return losses

    def gather(self, method):
        backend.synchronize()
        for s in self.streams:
            s.synchronize()
