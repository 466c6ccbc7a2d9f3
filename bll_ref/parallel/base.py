"""What every schedule shares: the schedule names, the sequential loop, BLAS thread limits,
the pipelinability check, the block-to-worker plan, worker errors and test fault injection."""
from __future__ import annotations

import contextlib
import os
import signal

from threadpoolctl import threadpool_limits

from .plan import balanced_groups, describe, measure_learner_seconds

__all__ = ["SCHEDULES", "SequentialSchedule", "blas_threads", "WorkerError", "check_pipelinable", "plan_groups",
           "fault_point"]

SCHEDULES = ("none", "threads", "mpi", "streams")  # streams: one CUDA stream per block (--device cuda)


class WorkerError(RuntimeError):
    """A pipeline worker failed; the message names the worker and its blocks."""


def blas_threads(n):
    """Context holding BLAS to ``n`` threads (None: leave it). OpenBLAS may sum a GEMM in another
    order with another thread count, so schedules agree bit for bit only at equal counts."""
    return threadpool_limits(limits=int(n), user_api="blas") if n else contextlib.nullcontext()


class SequentialSchedule:
    """Every learner of a step in one loop, in one process (``BLL.train_step``, or any method's).

    ``blas`` : BLAS threads while training (None: the library's default).
    """

    name, workers, is_root = "none", 1, True

    def __init__(self, blas=None):
        self.blas = blas

    def run_epoch(self, method, batches, on_step):
        losses = []
        with blas_threads(self.blas):
            for step, (xb, yb) in enumerate(batches, 1):
                fault_point(0, method.epoch, step)
                loss = method.train_step(xb, yb)
                losses.append(loss)
                on_step(step, loss)
        return losses

    def gather(self, method):
        pass


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
    """Fault injection for tests: BLL_REF_FAULT="kill:W:E:S" (SIGKILL) or "raise:W:E:S" makes
    worker W fail at step S (1-based) of epoch E (0-based)."""
    spec = os.environ.get("BLL_REF_FAULT")
    if not spec:
        return
    kind, w, e, s = spec.split(":")
    if (int(w), int(e), int(s)) != (worker, epoch, step):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault (BLL_REF_FAULT={spec})")
