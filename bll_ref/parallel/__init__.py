"""Schedules that run BLL's block learners: sequential (one loop), threads, MPI ranks, CUDA streams.

A schedule runs one epoch with ``run_epoch(method, batches, on_step) -> losses``; after it,
``loop.fit`` evaluates and writes files through the schedule (``base.OneProcess``): a schedule of
one process holds the whole model, an MPI rank only its stage, and the epoch end is then a
pipeline over the stages too (``epoch_end.py``). The pipelined schedules make the same updates as the sequential one,
bit for bit, when every learner needs only its input and the labels (span 1, closed or trained
linear feedback): docs/architecture.md, "Why a pipeline of block learners is exact". Span 2 and
twin feedback send messages downwards and are refused by them.
"""
from __future__ import annotations

import numpy as np

from .base import SCHEDULES, SequentialSchedule, WorkerError, blas_threads, check_pipelinable, fault_point, plan_groups
from .options import SCHEDULE_OPTIONS, resolve_micro_batches, unread_data
from .slices import check_sliceable
from .plan import balanced_groups, blocks_label, describe, measure_learner_seconds, pipeline_seconds_per_step
from .threads import ThreadPipeline
from .liveness import StartUpBeats
from .wire import bcast_groups, hang_deadline

__all__ = ["SCHEDULES", "SequentialSchedule", "ThreadPipeline", "make_schedule", "blas_threads", "WorkerError",
           "check_pipelinable", "plan_groups", "fault_point", "balanced_groups", "blocks_label", "describe",
           "measure_learner_seconds", "pipeline_seconds_per_step", "check_sliceable",
           "resolve_micro_batches", "SCHEDULE_OPTIONS", "unread_data", "start_up_beats"]


def make_schedule(method, data, *, parallel="none", workers=None, blas_threads=1, batch_size=128, log=print,
                  micro_batches=1, replicas=None, draws=None, beats=None):
    """The schedule ``parallel`` names (one of SCHEDULES) for ``method``, with its blocks assigned to
    workers by their measured step time on one batch of ``data`` (dict with x_train, y_train).
    ``micro_batches`` R > 1 splits every batch into R slices (``slices.py``); ``replicas`` (MPI
    only, dividing R) runs every pipeline stage on that many ranks, each taking R / replicas slices.
    ``draws`` (MPI): the ``SkipDraws`` generators the model and the method were built with; each rank
    draws from them its own learners' initial weights (None: every rank built them all).
    ``beats`` (MPI): this rank's ``StartUpBeats`` (``start_up_beats``), which bound the waits before
    the first step by the others' silence; None: started here (after the data was loaded).

    mpi.py and streams.py are imported here, when asked for: they need mpi4py (the [mpi] extra)
    and CuPy (the [cuda] extra), which a plain install does not have."""
    if parallel == "none":
        if workers not in (None, 1):
            raise ValueError("--workers needs --parallel threads or mpi")
        if micro_batches > 1:
            _check_last_batch(len(data["x_train"]), batch_size, micro_batches)
        return SequentialSchedule(blas=blas_threads, micro_batches=micro_batches, method=method)
    if parallel not in SCHEDULES:
        raise ValueError(f"parallel must be one of {', '.join(SCHEDULES)}, got {parallel!r}")
    check_pipelinable(method)
    if micro_batches > 1:
        check_sliceable(method)
        _check_last_batch(len(data["x_train"]), batch_size, micro_batches)
    if replicas not in (None, 1) and parallel != "mpi":
        raise ValueError("--replicas runs each pipeline stage on several MPI ranks; it needs --parallel mpi")
    if parallel == "streams":
        if micro_batches > 1:
            raise ValueError("--micro-batches is not implemented for --parallel streams; leave it at 1")
        from .streams import StreamSchedule
        return StreamSchedule(method)
    x, y = data["x_train"][:batch_size], data["y_train"][:batch_size]
    if parallel == "threads":
        groups, _ = plan_groups(method, 2 if workers is None else workers, x, y, log=log)
        return ThreadPipeline(method, groups, blas=blas_threads, micro_batches=micro_batches)
    from .mpi import MPIPipeline, world
    comm = world()
    size, replicas = comm.Get_size(), replicas or 1
    if workers is not None and workers != size:
        raise ValueError(f"--workers {workers} but {size} MPI ranks; launch with mpiexec -n {workers}")
    if micro_batches % replicas:
        raise ValueError(f"--replicas {replicas} must divide --micro-batches {micro_batches} (each replica "
                         "takes the same number of slices)")
    if size % replicas:
        raise ValueError(f"{size} MPI ranks cannot form stages of {replicas} replicas; launch "
                         f"mpiexec -n (stages x {replicas})")
    stages = size // replicas
    if stages > len(method.learners):
        raise ValueError(f"{size} MPI ranks = {stages} stages x {replicas} replicas for {len(method.learners)} "
                         f"blocks; use at most one stage per block (--replicas {-(-size // len(method.learners))} "
                         "or more)")
    beats = beats if beats is not None else StartUpBeats(comm)
    fault_point(comm.Get_rank(), 0, "plan")
    groups, costs = plan_groups(method, stages, x, y, log=log) if comm.Get_rank() == 0 else (None, [0.0])
    wait = lambda req, peer: beats.wait(req, [peer], "waiting for rank 0's plan")  # noqa: E731 (rank 0 plans)
    deadline = np.array([hang_deadline(costs)])
    wait(comm.Ibcast(deadline, root=0), 0)
    if log and comm.Get_rank() == 0:
        log(f"world: {size} ranks = {stages} stage{'s' * (stages > 1)} x {replicas} replica{'s' * (replicas > 1)}"
            f" ({micro_batches} micro-batch{'es' * (micro_batches > 1)} per step)")
    return MPIPipeline(method, comm, bcast_groups(comm, groups, wait), np.ascontiguousarray(data["x_train"][:2]),
                       blas=blas_threads, replicas=replicas, micro_batches=micro_batches, deadline=float(deadline[0]),
                       log=log if comm.Get_rank() == 0 else None, data=data, draws=draws, beats=beats)


def start_up_beats():
    """This MPI rank's ``StartUpBeats``, beating from now until the ranks meet before the first step
    (call it first thing in an MPI run, before loading data)."""
    from .mpi import world
    return StartUpBeats(world())


def _check_last_batch(n, batch_size, slices):
    """ValueError unless every batch of an epoch of n examples has at least ``slices`` rows."""
    last = n % batch_size or min(n, batch_size)
    if min(last, batch_size) < slices:
        raise ValueError(f"--micro-batches {slices}: the {'last ' if last < batch_size else ''}batch has {last} rows, "
                         f"fewer than {slices}; change --batch-size or --limit-train")
