"""PyTorch-CPU DistributedDataParallel (gloo) on the MLP of benchmarks/parallel.py: the data-parallel
peer of BLL's pipeline x replica schedules, on the same number of processes.

Runs under an interpreter that has torch (it does not import bll_ref). Every process takes its
slice of the same 128-row batch (N / W rows), runs backprop with one thread, and DDP averages the
gradients over gloo (TCP on loopback) before Adam steps. ``--ranks 1`` is plain single-process
backprop with one thread, without DDP: the baseline the speed-ups are taken against.

    python benchmarks/torch_ddp.py --ranks 2 --steps 60 --warmup 10 --out ddp2.json

Writes {"steps_per_s", "steps_per_s_whole", "ranks", "torch", "losses"} (rank 0's view) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np

SIZES = (784, 1024, 1024, 1024, 10)  # benchmarks/parallel.py's MLP, batch and seed
N = 128
SEED = 0


def make_batches(n):
    """The same batches as benchmarks/parallel.py's ``make_batches``."""
    rng = np.random.default_rng(SEED)
    return [(rng.standard_normal((N, SIZES[0])).astype(np.float32), rng.integers(0, 10, N)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_net(torch, sizes=SIZES):
    """The MLP of ``sizes`` (default ``SIZES``) with LeakyReLU(0.01), seeded like
    benchmarks/parallel.py's PyTorch row."""
    torch.manual_seed(SEED)
    layers = []
    for i, o in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(i, o), torch.nn.LeakyReLU(0.01)]
    layers.append(torch.nn.Linear(sizes[-2], sizes[-1]))
    return torch.nn.Sequential(*layers)


def worker(rank, args, port):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    net = build_net(torch)
    if args.ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
        net = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    lo, hi = rank * N // args.ranks, (rank + 1) * N // args.ranks
    batches = [(torch.from_numpy(x[lo:hi].copy()), torch.from_numpy(y[lo:hi].astype(np.int64)))
               for x, y in make_batches(args.warmup + args.steps)]

    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()  # DDP: the gradients' all-reduce (average) overlaps the backward
        opt.step()
        return float(loss.detach())

    for x, y in batches[:args.warmup]:
        step(x, y)
    if args.ranks > 1:
        dist.barrier()
    t0, stamps, losses = time.perf_counter(), [], []
    for x, y in batches[args.warmup:]:
        losses.append(step(x, y))
        stamps.append(time.perf_counter())
    if args.ranks > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        with open(args.out, "w") as f:
            json.dump({"steps_per_s": steady, "steps_per_s_whole": args.steps / (stamps[-1] - t0),
                       "ranks": args.ranks, "torch": torch.__version__, "losses": losses}, f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        import torch.multiprocessing as mp
    except ImportError as e:
        print(f"torch_ddp.py: needs torch ({e}); run it with an interpreter that has torch", file=sys.stderr)
        return 2
    if args.ranks < 1 or N % args.ranks:
        print(f"torch_ddp.py: --ranks must divide the batch of {N}, got {args.ranks}", file=sys.stderr)
        return 2
    if args.ranks == 1:
        worker(0, args, None)
    else:
        mp.spawn(worker, args=(args, free_port()), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
