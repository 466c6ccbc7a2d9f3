"""Thread pipeline: one thread per contiguous group of block learners, bounded queues between.

Worker w takes (step, h, y, Y) from its queue, forwards h through its learners with their
pre-update weights, hands the output to worker w + 1, then updates its learners. BLAS calls and
the Numba kernels (``nogil=True``) release the GIL, so the workers' GEMMs run on separate cores.
BLAS is held to ``blas`` threads per worker (default 1) while the pipeline runs.
"""
from __future__ import annotations

import queue
import threading

from .base import OneProcess, WorkerError, blas_threads, check_pipelinable, fault_point
from .plan import blocks_label
from .slices import check_sliceable, combine, split, stage_slices

__all__ = ["ThreadPipeline"]

_END = object()
_POLL = 0.05  # seconds between checks for a failed worker while waiting on a queue


class ThreadPipeline(OneProcess):
    """Runs the learners of ``method`` in ``len(groups)`` threads (groups of learner indices)."""

    name = "threads"  # (threads share the learners: nothing to gather)

    def __init__(self, method, groups, depth=2, blas=1, micro_batches=1):
        check_pipelinable(method)
        self.groups, self.depth, self.blas = [list(g) for g in groups], int(depth), blas
        self.micro_batches = int(micro_batches)
        if self.micro_batches > 1:
            check_sliceable(method)
        self.workers = len(self.groups)

    def _put(self, q, item, failed):
        while not failed.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                pass
        return False

    def _get(self, q, failed):
        while not failed.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                pass
        return _END

    def _worker(self, w, method, q_in, q_out, results, failed, errors):
        learners = [method.learners[k] for k in self.groups[w]]
        last = w == self.workers - 1
        records = None  # the last step's micro-batch records, written over by the next (no allocation)
        try:
            while True:
                item = self._get(q_in, failed)
                if item is _END:
                    if not last:
                        self._put(q_out, _END, failed)
                    return
                step, h, y, Y = item
                fault_point(w, method.epoch, step)
                if self.micro_batches > 1:  # h: the list of slices (slices.py)
                    h, records = stage_slices(learners, h, *split(y, y, Y, self.micro_batches)[1:], into=records)
                    if not last and not self._put(q_out, (step, h, y, Y), failed):
                        return
                    for learner, recs in zip(learners, records):
                        combine(learner, recs)
                    if last:
                        results.put((step, learners[-1].last_loss))
                    continue
                for learner in learners:
                    h = learner.forward(h)
                if not last and not self._put(q_out, (step, h, y, Y), failed):
                    return
                for learner in reversed(learners):
                    learner.update(y, Y)
                if last:
                    results.put((step, learners[-1].last_loss))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread with the worker's name
            errors.append((w, e))
            failed.set()

    def run_epoch(self, method, batches, on_step):
        qs = [queue.Queue(maxsize=self.depth) for _ in range(self.workers)]
        results, failed, errors = queue.Queue(), threading.Event(), []
        threads = [threading.Thread(target=self._worker, name=f"bll-worker-{w}", daemon=True,
                                    args=(w, method, qs[w], qs[w + 1] if w + 1 < self.workers else None,
                                          results, failed, errors))
                   for w in range(self.workers)]
        losses, fed = [], 0

        def collect(block):
            while len(losses) < fed:
                try:
                    step, loss = results.get(timeout=_POLL) if block else results.get_nowait()
                except queue.Empty:
                    if not block or failed.is_set():
                        return
                    continue
                losses.append(loss)
                on_step(step, loss)

        with blas_threads(self.blas):
            for t in threads:
                t.start()
            try:
                for step, (xb, yb) in enumerate(batches, 1):
                    Y = method.one_hot(yb)
                    h = xb if self.micro_batches == 1 else split(xb, yb, Y, self.micro_batches)[0]
                    if not self._put(qs[0], (step, h, yb, Y), failed):
                        break
                    fed += 1
                    collect(block=False)
                self._put(qs[0], _END, failed)
                collect(block=True)
            except BaseException:
                failed.set()
                raise
            finally:
                for t in threads:
                    t.join()
        if errors:
            w, e = errors[0]
            raise WorkerError(f"worker {w} ({blocks_label(self.groups[w])}) failed: "
                              f"{type(e).__name__}: {e}") from e
        return losses
