"""An MPI run's epoch end without the whole model on any rank: evaluation, diagnostics, state files
and the checkpoint, each a pipeline over the stages (replica 0 of each; the others wait for rank 0).

* **Evaluation** (``predict``): rank 0 reads the test chunks and forwards each through its blocks,
  in eval mode, and sends the output on; stage s forwards what stage s - 1 sent through its own
  blocks; the last stage sends each chunk's logits to rank 0. Every block runs the same chunk it
  runs in a sequential evaluation (``methods.common.predict``), so the logits are the same bits.
* **Diagnostics**: the same, once, for the diagnostic sample, with its labels travelling along
  (no rank but 0 reads the test set); each stage sends rank 0 its blocks' records.
* **State files** (``state_parts``): rank 0 writes its own learners' files, then receives and
  writes the other stages' learner by learner, so it holds at most one other learner's state.
* **Checkpoint** (``write_checkpoint``): rank 0 writes the entries of its blocks, then of each
  other block as it arrives (``checkpoint.save_entries``); only the small buffers and heads and feedback
  weights wait in memory for their place at the end of the file. Same entries, same order, same
  bytes as a sequential run's, apart from the options in the header.

Every wait is under the run's hang deadline, and rank 0 beats after every chunk and file, so the
ranks that wait for it can tell busy from hung (``mpi.MPIPipeline``).
"""
from __future__ import annotations

import itertools
import json

import numpy as np

from .. import checkpoint
from ..methods.learner import pack_states, unpack_states
from .base import fault_point
from .wire import recv_arrays, send_arrays

__all__ = ["RankEpochEnd"]

_EVAL_TAG = 12  # activations and logits of the evaluation, diagnostics records (world communicator)


def _encode(obj) -> np.ndarray:
    """JSON (numbers round-trip exactly) as a byte array, for ``send_arrays``."""
    return np.frombuffer(json.dumps(obj).encode(), np.uint8)


def _decode(raw):
    return json.loads(np.asarray(raw, np.uint8).tobytes())


class RankEpochEnd:
    """The epoch end of ``mpi.MPIPipeline`` (a mixin: it uses the pipeline's communicator, stages,
    ``_wait``, ``_recv``, ``_send`` and ``beat``); ``loop.fit`` calls it on replica 0 of every stage (``evaluates``)."""

    @property
    def evaluates(self) -> bool:
        return self.replica == 0

    def _peer(self, stage) -> int:
        return stage * self.replicas  # replica 0 of ``stage``

    def _when(self, method) -> str:
        return f"in the evaluation of epoch {method.epoch + 1}"

    def _eval_wait(self, method, when=None):
        return lambda req, peer: self._wait(req, peer, when or self._when(method))

    def _files_wait(self, method):
        return self._eval_wait(method, f"writing the state of epoch {method.epoch + 1}")

    def _forward(self, method, h):
        for k in self.groups[self.stage]:
            h = method.model.layers[k].forward(h, train=False)
        return h

    def predict(self, method, x, batch_size, on_chunk=None):
        """Rank 0: the logits of ``x`` (host array, which only rank 0 reads); the other stages:
        their blocks' part of them (None)."""
        when, pending, out, logits = self._when(method), [], [], []
        chunks = [(i, min(batch_size, len(x) - i)) for i in range(0, len(x), batch_size)]
        last = self._peer(self.stages - 1)
        if self.is_root and not self.last_stage:
            # every receive of the logits is posted before the first chunk leaves: a last stage
            # waiting for rank 0 to take its logits while rank 0 waits for it to take the next
            # chunk would be a deadlock (messages past MPI's eager size complete only when matched)
            for _, n in chunks:
                buf = np.empty((n,) + tuple(self.out_shape), self.dtype)
                logits.append((self.comm.Irecv(buf, source=last, tag=_EVAL_TAG), buf))
        for i, n in chunks:  # (replica 0 of every stage: the stages beside it are replica 0's too)
            h = x[i:i + n] if self.stage == 0 else self._recv((n,), when, tag=_EVAL_TAG)
            h = self._forward(method, h)
            if self.is_root and self.last_stage:
                out.append(h)
            else:  # on to the next stage, or the logits to rank 0
                self._send(h, pending, when, tag=_EVAL_TAG, dest=0 if self.last_stage else None, depth=2)
            if on_chunk:
                on_chunk()
        for req, _, peer in pending:
            self._wait(req, peer, when)
        if not self.is_root:
            return None
        for req, _ in logits:  # the last stage's, chunk by chunk, beating after each
            self._wait(req, last, when)
            if on_chunk:
                on_chunk()
        return np.concatenate(out or [buf for _, buf in logits])

    def diagnostics(self, method, x, y):
        """Rank 0: ``method.epoch_diagnostics(x, y)``'s record, assembled from every stage's blocks;
        the other stages: their part of it (None)."""
        wait, ks = self._eval_wait(method), self.groups[self.stage]
        if self.stage > 0:
            got = recv_arrays(self.comm, self._peer(self.stage - 1), tag=_EVAL_TAG, wait=wait)
            x, y = got["h"], got["y"]
        y = np.asarray(y)
        blocks, h = method.block_diagnostics(ks, x, y)
        if not self.last_stage:
            send_arrays(self.comm, {"h": np.asarray(h), "y": y}, self._peer(self.stage + 1), tag=_EVAL_TAG, wait=wait)
        mine = {"blocks": blocks, "out_loss": method.out_loss() if self.last_stage else None}
        if not self.is_root:
            send_arrays(self.comm, {"json": _encode(mine)}, 0, tag=_EVAL_TAG, wait=wait)
            return None
        parts = [mine] + [_decode(recv_arrays(self.comm, self._peer(s), tag=_EVAL_TAG, wait=wait)["json"])
                          for s in range(1, self.stages)]
        return method.diagnostics_record([d for p in parts for d in p["blocks"]], parts[-1]["out_loss"])

    def send_state(self, method):
        """A stage's learners' states to rank 0, one message each, which writes their files
        (``state_parts``)."""
        for learner in self.mine:
            send_arrays(self.comm, pack_states([learner]), dest=0, wait=self._files_wait(method))

    def state_parts(self, method):
        """Rank 0: (name, state) of every learner in order, its own first, then the other stages'
        as they arrive: ``runstate.save`` writes each before the next is received, so rank 0 holds
        at most one other learner's state at a time."""
        wait = self._files_wait(method)
        for learner in self.mine:
            yield f"learner{learner.k}", learner.state_dict()
        for s in range(1, self.stages):
            for _ in self.groups[s]:
                (k, state), = unpack_states(recv_arrays(self.comm, self._peer(s), wait=wait)).items()
                yield f"learner{k}", state

    def _checkpoint_parts(self, method, k, learner):
        """Block k's params, buffers and aux arrays (head, feedback weights), by checkpoint name."""
        params, buffers = checkpoint.block_entries(k, method.model.layers[k])
        last = k == len(method.learners) - 1
        heads = {} if last else {f"aux/{n}": v for n, v in learner.head_aux().items()}
        feedback = {} if last else {f"aux/{n}": v for n, v in learner.feedback_aux().items()}
        return params, buffers, heads, feedback

    def write_checkpoint(self, path, method, meta):
        """Rank 0 writes checkpoint.npz block by block as the stages' arrays arrive; the stages send
        theirs, four messages per block."""
        if not self.evaluates:
            return
        wait = lambda req, peer: self._wait(req, peer, "writing the checkpoint")  # noqa: E731
        if not self.is_root:
            for k, learner in zip(self.groups[self.stage], self.mine):
                for part in self._checkpoint_parts(method, k, learner):
                    send_arrays(self.comm, part, dest=0, wait=wait)
                    fault_point(self.rank, method.epoch, "checkpoint")  # tests: rank 0 is mid-file
            return
        kept = [[], [], []]  # buffers, heads, feedback: written after every block's params

        def entries():
            for s in range(self.stages):
                for i, k in enumerate(self.groups[s]):
                    parts = (self._checkpoint_parts(method, k, self.mine[i]) if s == 0 else
                             [recv_arrays(self.comm, self._peer(s), wait=wait) for _ in range(4)])
                    yield from parts[0].items()
                    for keep, part in zip(kept, parts[1:]):
                        keep.extend(part.items())
                self.beat()
            yield from itertools.chain(*kept)
        checkpoint.save_entries(path, self.model_config, entries(), meta)

