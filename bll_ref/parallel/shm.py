"""Memory shared by the replicas of a pipeline stage on one host (bll_ref/parallel/mpi.py): one
file under ``SHARED_DIR`` that every replica maps, holding the micro-batch records they sum
(``exchange_buffers``) and the parameters each replica steps for all (``param_buffers``). A rank
reads what another wrote there with no message and no copy; a short note per step orders the
writes before the reads. Where the replicas cannot share memory (other hosts, no room), every
function returns what the message path needs instead.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import tempfile

import numpy as np

from .slices import optimisers, record_bytes, shard_parts, unpack_records
from .wire import blocking_wait

__all__ = ["shared_buffers", "exchange_buffers", "param_buffers", "put_params", "take_params", "SHARED_DIR"]

#: where ``shared_buffers`` puts the file its ranks map (a RAM file system on Linux); the
#: environment variable BLL_REF_SHARED_DIR overrides it, and set empty turns sharing off
SHARED_DIR = "/dev/shm"
_PREFIX = "bll_ref_records_"  # then rank 0's pid and "_": a file left by a dead job is found (``_sweep``)


def shared_buffers(comm, nbytes, wait=None, tag=0):
    """[uint8 array of ``nbytes``] for every rank of ``comm`` (an mpi4py intracommunicator), all
    in one file under ``SHARED_DIR`` that every rank maps: a rank reads what another wrote there
    with no message and no copy. None on every rank when they cannot all map it (ranks on other
    hosts, no ``SHARED_DIR``). Every rank calls it; ``wait(request, peer)`` completes each of its
    point-to-point messages (on ``tag``) between rank 0 and a peer (default: MPI's ``Wait``).

    Rank 0 creates the file once every rank has said it is here, with a random token at its start
    (a rank that reads another token, a same-named file on another host, counts as unable), and
    unlinks it as soon as every rank has tried to map it: a rank that dies later leaves nothing
    behind (the memory goes with the last mapping; the arrays keep theirs alive)."""
    wait = wait or blocking_wait
    others = range(1, comm.Get_size())
    head, step = 64, -(-int(nbytes) // 64) * 64  # every rank's buffer starts 64-byte aligned
    total = head + step * comm.Get_size()
    msg, word = np.zeros(512, np.uint8), np.zeros(1, np.int64)  # msg: token (16 bytes), then the path
    if comm.Get_rank() == 0:
        for q in others:
            wait(comm.Irecv(word, source=q, tag=tag), q)  # q is here
        _create_shared(total, msg)
        for q in others:
            wait(comm.Isend(msg, dest=q, tag=tag), q)
    else:
        wait(comm.Isend(word, dest=0, tag=tag), 0)
        wait(comm.Irecv(msg, source=0, tag=tag), 0)
    token, path = msg[:16].tobytes(), os.fsdecode(msg[16:].tobytes().rstrip(b"\0"))
    mem = None
    if path:
        try:
            with open(path, "r+b") as f:
                mem = mmap.mmap(f.fileno(), total)
            if mem[:16] != token:
                mem.close()
                mem = None
        except (OSError, ValueError):
            mem = None
    ok = np.array([mem is not None], np.int64)
    if comm.Get_rank() == 0:
        for q in others:
            wait(comm.Irecv(word, source=q, tag=tag), q)
            ok &= word
        if path:
            os.unlink(path)
        for q in others:
            wait(comm.Isend(ok, dest=q, tag=tag), q)
    else:
        wait(comm.Isend(ok.copy(), dest=0, tag=tag), 0)
        wait(comm.Irecv(ok, source=0, tag=tag), 0)
    if not ok[0]:
        if mem is not None:
            mem.close()
        return None
    return [np.frombuffer(mem, np.uint8, count=int(nbytes), offset=head + r * step) for r in range(comm.Get_size())]


def _sweep(where):
    """Remove the files of ``shared_buffers`` that a job left behind: its rank 0 (whose pid the
    name holds) died in the moment between making one and unlinking it, and is gone."""
    try:
        names = os.listdir(where)
    except OSError:
        return
    for name in names:
        m = re.match(rf"{_PREFIX}(\d+)_", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(where, name))
        except OSError:
            pass  # alive (another user's process)


def _create_shared(total, msg):
    """Create the file of ``shared_buffers`` (``total`` bytes, a random token at its start) and write
    the token and its path into ``msg``; its path, or "" (msg left zero) where that fails."""
    where = os.environ.get("BLL_REF_SHARED_DIR", SHARED_DIR)
    if not where or not hasattr(os, "posix_fallocate"):
        return ""  # sharing turned off, or no way to reserve the pages (not Linux)
    _sweep(where)
    try:
        fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}_", dir=where)
    except OSError:
        return ""
    token, raw = os.urandom(16), os.fsencode(path)
    try:
        os.posix_fallocate(fd, 0, total)  # the pages now, or ENOSPC (a full /dev/shm would be SIGBUS later)
        os.pwrite(fd, token, 0)
        written = 16 + len(raw) <= len(msg)
    except OSError:
        written = False
    finally:
        os.close(fd)
    if not written:
        os.unlink(path)
        return ""
    msg[:16 + len(raw)] = np.frombuffer(token + raw, np.uint8)
    return path


def exchange_buffers(comm, layout, count, wait=None, tag=0):
    """Buffers for one learner's records (``count`` of ``layout`` per rank), exchanged among the
    ranks of ``comm`` (the replicas of a stage, bll_ref/parallel/mpi.py): (raw, views), each a
    pair of per-turn dicts {rank: uint8 buffer} and {rank: [records, views into it]}; a step uses
    turn 0 and swaps the pair. Every rank of ``comm`` calls it (``wait``, ``tag``: ``shared_buffers``).

    On one host (``shared_buffers``) every rank has two buffers, the turns: a peer sums a rank's
    records where they were written, with no message of their bytes, only a short note "written"
    (whose receipt orders the writes before the peer's reads: MPI's shared-memory transport fences
    its messages). A rank writes a buffer again two steps later, after every peer's note of the
    step between, which a peer sends only once it has finished the step before, its sums included.
    Otherwise both turns are the same buffers, which the records are sent from and received into."""
    n = record_bytes(layout) * count
    shared = shared_buffers(comm, 2 * n, wait, tag)
    if shared is None:
        raw = {q: np.empty(n, np.uint8) for q in range(comm.Get_size())}
        views = {q: unpack_records(buf, layout, count) for q, buf in raw.items()}
        return [raw, raw], [views, views]
    raw = [{q: buf[t * n:(t + 1) * n] for q, buf in enumerate(shared)} for t in (0, 1)]
    return raw, [{q: unpack_records(buf, layout, count) for q, buf in r.items()} for r in raw]


def _pieces(learner, parts):
    """(flat parameter piece, its bytes) for ``parts`` (``shard_parts``), in their order."""
    for opt, part in zip(optimisers(learner), parts):
        params = opt.layer.params
        for k, (lo, hi) in part.items():
            piece = params[k].reshape(-1)[lo:hi]
            yield piece, piece.nbytes


def param_buffers(comm, learner, wait=None, tag=0):
    """(parts, buffers) for stepping ``learner`` in shares: parts[q] is replica q's share
    (``shard_parts``), buffers[q] the shared memory where it leaves its updated parameters for
    the others (``put_params``, ``take_params``); None on every rank when they cannot share
    memory. Every rank of ``comm`` calls it (``wait``, ``tag``: ``shared_buffers``)."""
    n = comm.Get_size()
    parts = [shard_parts(learner, q, n) for q in range(n)]
    if any(not p.flags.c_contiguous for opt in optimisers(learner) for p in opt.layer.params.values()):
        return None  # (parameters are C-contiguous wherever an optimiser steps them)
    size = max(sum(b for _, b in _pieces(learner, part)) for part in parts)
    bufs = shared_buffers(comm, max(size, 1), wait, tag)
    return None if bufs is None else (parts, bufs)


def put_params(learner, part, buf):
    """Copy this replica's freshly stepped share ``part`` of the parameters into its buffer."""
    pos = 0
    for piece, nbytes in _pieces(learner, part):
        buf[pos:pos + nbytes] = piece.view(np.uint8)
        pos += nbytes


def take_params(learner, parts, bufs, me):
    """Copy every other replica's share of the parameters from its buffer into ``learner``."""
    for q, (part, buf) in enumerate(zip(parts, bufs)):
        if q == me:
            continue
        pos = 0
        for piece, nbytes in _pieces(learner, part):
            piece.view(np.uint8)[...] = buf[pos:pos + nbytes]
            pos += nbytes
