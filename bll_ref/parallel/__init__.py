"""Schedules that run BLL's block learners: sequential (one loop), threads, MPI ranks, CUDA streams.

A schedule runs one epoch with ``run_epoch(method, batches, on_step) -> losses`` and, after it,
``gather(method)`` leaves the whole trained state in the root process (``is_root``), which
evaluates and writes files. The pipelined schedules make the same updates as the sequential one,
bit for bit, when every learner needs only its input and the labels (span 1, closed or trained
linear feedback): docs/architecture.md, "Why a pipeline of block learners is exact". Span 2 and
twin feedback send messages downwards and are refused by them.
"""
from __future__ import annotations

from .base import SCHEDULES, SequentialSchedule, WorkerError, blas_threads, check_pipelinable, fault_point, plan_groups
from .plan import balanced_groups, blocks_label, describe, measure_learner_seconds, pipeline_seconds_per_step
from .threads import ThreadPipeline

__all__ = ["SCHEDULES", "SequentialSchedule", "ThreadPipeline", "make_schedule", "blas_threads", "WorkerError",
           "check_pipelinable", "plan_groups", "fault_point", "balanced_groups", "blocks_label", "describe",
           "measure_learner_seconds", "pipeline_seconds_per_step"]


def make_schedule(method, data, *, parallel="none", workers=None, blas_threads=1, batch_size=128, log=print):
    """The schedule ``parallel`` names (one of SCHEDULES) for ``method``, with its blocks assigned to
    workers by their measured step time on one batch of ``data`` (dict with x_train, y_train).

    mpi.py and streams.py are imported here, when asked for: they need mpi4py (the [mpi] extra)
    and CuPy (the [cuda] extra), which a plain install does not have."""
    if parallel == "none":
        if workers not in (None, 1):
            raise ValueError("--workers needs --parallel threads or mpi")
        return SequentialSchedule(blas=blas_threads)
    if parallel not in SCHEDULES:
        raise ValueError(f"parallel must be one of {', '.join(SCHEDULES)}, got {parallel!r}")
    check_pipelinable(method)
    if parallel == "streams":
        from .streams import StreamSchedule
        return StreamSchedule(method)
    x, y = data["x_train"][:batch_size], data["y_train"][:batch_size]
    if parallel == "threads":
        groups, _ = plan_groups(method, 2 if workers is None else workers, x, y, log=log)
        return ThreadPipeline(method, groups, blas=blas_threads)
    from .mpi import MPIPipeline, bcast_groups, world
    comm = world()
    if workers is not None and workers != comm.Get_size():
        raise ValueError(f"--workers {workers} but {comm.Get_size()} MPI ranks; launch with mpiexec -n {workers}")
    if comm.Get_size() > len(method.learners):
        raise ValueError(f"{comm.Get_size()} MPI ranks for {len(method.learners)} blocks; use at most one rank per block")
    groups = plan_groups(method, comm.Get_size(), x, y, log=log)[0] if comm.Get_rank() == 0 else None
    return MPIPipeline(method, comm, bcast_groups(comm, groups), data["x_train"][:2], blas=blas_threads)
