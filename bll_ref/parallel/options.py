"""The run options of the schedules, checked before anything is built: ``--micro-batches`` and
``--replicas`` (docs/parallel.md)."""
from __future__ import annotations

__all__ = ["SCHEDULE_OPTIONS", "resolve_micro_batches", "unread_data"]

#: the training options ``make_schedule`` takes (same names as ``TrainConfig``'s)
SCHEDULE_OPTIONS = ("parallel", "workers", "blas_threads", "batch_size", "micro_batches", "replicas")


def resolve_micro_batches(cfg, given=()) -> int:
    """The run's number of micro-batches for a ``TrainConfig`` whose counts are checked whole numbers
    >= 1 (``--replicas R`` alone means R), or ValueError for a combination that cannot run."""
    micro, replicas = cfg.micro_batches, cfg.replicas
    if replicas not in (None, 1):
        if cfg.parallel != "mpi":
            raise ValueError("--replicas runs each pipeline stage on several MPI ranks; it needs --parallel mpi")
        if micro == 1 and "micro_batches" not in given:
            micro = replicas
        if micro % replicas:
            raise ValueError(f"--replicas {replicas} must divide --micro-batches {micro} "
                             "(every replica takes the same number of slices)")
    if micro == 1:
        return 1
    if cfg.method != "bll":
        raise ValueError(f"--micro-batches splits the steps of BLL's block learners, not {cfg.method!r}; "
                         "leave it at 1")
    if micro > cfg.batch_size:
        raise ValueError(f"--micro-batches {micro} is more than --batch-size {cfg.batch_size}")
    if cfg.device != "cpu":
        raise ValueError("--micro-batches runs on the CPU; leave it at 1 with --device cuda")
    return micro


def unread_data(rank, replicas=None) -> tuple:
    """The data an MPI rank never reads, so need not load: every rank but 0 the test set (rank 0
    feeds the evaluation's chunks to the stages, and sends the diagnostic sample's labels along:
    ``epoch_end.py``); a rank past the first stage (rank >= replicas: ranks are numbered stage x
    replicas + replica) the training images, because its input comes from the stage before."""
    if rank == 0:
        return ()
    return ("x_test", "y_test") + (("x_train",) if rank >= (replicas or 1) else ())
