"""What every schedule shares: the schedule names, the sequential loop, BLAS thread limits,
the pipelinability check, the block-to-worker plan, worker errors and test fault injection."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from threadpoolctl import threadpool_limits

from .. import checkpoint
from ..methods.common import predict

from .plan import balanced_groups, describe, measure_learner_seconds
from .slices import check_sliceable, combine, split, stage_slices

__all__ = ["SCHEDULES", "SequentialSchedule", "OneProcess", "blas_threads", "WorkerError", "check_pipelinable",
           "plan_groups", "fault_point", "micro_step"]

SCHEDULES = ("none", "threads", "mpi", "streams")  # streams: one CUDA stream per block (--device cuda)


class WorkerError(RuntimeError):
    """A pipeline worker failed; the message names the worker and its blocks."""


def blas_threads(n):
    """Context holding BLAS to ``n`` threads (None: leave it). OpenBLAS may sum a GEMM in another
    order with another thread count, so schedules agree bit for bit only at equal counts."""
    return threadpool_limits(limits=int(n), user_api="blas") if n else contextlib.nullcontext()


class OneProcess:
    """A schedule whose workers all live in this process: it holds every learner already
    (``gather``), evaluates and writes the whole model itself, and no other process waits for it
    between epochs (``beat``) or for its end (``finish``). An MPI rank holds only its own blocks and
    does all of these with the other ranks (``mpi.MPIPipeline``, ``epoch_end.RankEpochEnd``).

    The epoch end ``loop.fit`` runs, on every process whose ``evaluates`` is True: ``predict`` and
    ``diagnostics`` (the whole model's; an MPI rank's part of them), then on the root (``is_root``)
    the files, from ``state_parts`` (None: the method's own), and elsewhere ``send_state``.
    """

    is_root = evaluates = True
    rank = 0

    def gather(self, method):
        pass

    def beat(self):
        pass

    def finish(self):
        pass

    def predict(self, method, x, batch_size, on_chunk=None):
        """The model's eval-mode outputs on ``x`` (host array), in chunks of ``batch_size``."""
        return predict(method.model, x, batch_size, on_chunk=on_chunk)

    def diagnostics(self, method, x, y):
        return method.epoch_diagnostics(x, y)

    def state_parts(self, method):
        return None

    def send_state(self, method):
        pass

    def write_checkpoint(self, path, method, meta):
        """checkpoint.npz of the trained model, its heads and feedback (host arrays)."""
        checkpoint.save(path, method.model, meta, method.aux_state())


class SequentialSchedule(OneProcess):
    """Every learner of a step in one loop, in one process (``BLL.train_step``, or any method's).

    ``blas`` : BLAS threads while training (None: the library's default).

    ``micro_batches`` : R > 1 splits every batch into R slices whose gradients are summed in slice
    order before each optimiser steps (``slices.py``); 1 is the plain step.
    """

    name, workers = "none", 1

    def __init__(self, blas=None, micro_batches=1, method=None):
        self.blas, self.micro_batches = blas, int(micro_batches)
        self._pool = {}  # micro-batch records, reused from step to step
        if self.micro_batches > 1 and method is not None:
            check_sliceable(method)

    def run_epoch(self, method, batches, on_step):
        losses = []
        with blas_threads(self.blas):
            for step, (xb, yb) in enumerate(batches, 1):
                fault_point(0, method.epoch, step)
                loss = (method.train_step(xb, yb) if self.micro_batches == 1
                        else micro_step(method.learners, xb, yb, method.one_hot(yb), self.micro_batches,
                                        pool=self._pool))
                losses.append(loss)
                on_step(step, loss)
        return losses


def micro_step(learners, x, y, Y, slices, pool=None):
    """One step of ``learners`` (a whole model) with the batch in ``slices`` micro-batches; returns
    the output learner's loss (the slices' losses weighted by their share of the batch).
    ``pool``: a dict kept between steps, whose records the next step writes over."""
    _, records = stage_slices(learners, *split(x, y, Y, slices),
                              into=None if pool is None else pool.get("records"))
    if pool is not None:
        pool["records"] = records
    for learner, recs in zip(learners, records):
        combine(learner, recs)
    return learners[-1].last_loss


def check_pipelinable(method):
    """ValueError unless ``method`` is a BLL whose learners can run in a pipeline exactly."""
    if not hasattr(method, "learners"):
        raise ValueError(f"parallel schedules run BLL's block learners; method {method.name!r} has none "
                         "(use --parallel none)")
    if method.span != 1:
        raise ValueError("span 2 (BLL(2)) sends gradients down to the block below, so its blocks cannot "
                         "run in a pipeline exactly; use --parallel none")
    if method.twin is not None:
        raise ValueError("twin feedback passes messages down through the backward network, so its blocks "
                         "cannot run in a pipeline exactly; use --feedback closed or trained, or --parallel none")


def plan_groups(method, workers, x, y, log=print):
    """Contiguous groups of learners for ``workers`` workers, balanced by measured step time."""
    costs = measure_learner_seconds(method, x, y)
    groups = balanced_groups(costs, workers)
    if log:
        log(f"assignment: {describe(groups, costs)}")
    return groups, costs


def fault_point(worker, epoch, step):
    """Fault injection for tests: BLL_REF_FAULT="kill:W:E:S" (SIGKILL), "raise:W:E:S", "hang:W:E:S"
    (sleeps for an hour) or "spin:W:E:S" (busy for an hour) makes worker W fail at step S (1-based)
    of epoch E (0-based); "slow:W:E:S" keeps it busy for 20 s there, then lets it go on. S = "eval":
    in worker W's part of the evaluation after epoch E; "plan" (E = 0): while an MPI rank 0 plans;
    "checkpoint" (E = the last epoch): an MPI stage's rank W, once it has sent rank 0 the first part
    of the checkpoint that rank 0 is writing."""
    spec = os.environ.get("BLL_REF_FAULT")
    if not spec:
        return
    kind, w, e, s = spec.split(":")
    if (w, e, s) != (str(worker), str(epoch), str(step)):
        return
    print(f"bll-ref: injected fault {spec} at {time.time():.3f}", file=sys.stderr, flush=True)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind in ("spin", "slow"):
        end = time.time() + (20 if kind == "slow" else 3600)
        while time.time() < end:
            pass
        if kind == "slow":
            return
    raise RuntimeError(f"injected fault (BLL_REF_FAULT={spec})")
