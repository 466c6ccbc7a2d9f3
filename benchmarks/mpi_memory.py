"""Peak resident memory of every rank of an MPI training run (``getrusage`` at each rank's exit).

    python benchmarks/mpi_memory.py [--ranks 4] [--replicas 1] [--tree DIR] [-- TRAIN OPTIONS ...]

Runs ``mpiexec -n RANKS python -m mpi4py <this file> --rank-worker train --parallel mpi ...`` (one
epoch of the default MLP on Fashion-MNIST unless other training options follow ``--``); every rank
runs ``bll_ref.cli`` and reports its peak resident memory when it exits, and the script prints a
table of ranks. ``--tree DIR`` imports bll_ref from another checkout (e.g. an older commit, made
with ``git worktree add``), to compare versions with the same command. The run directory is a
temporary one, removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile


def rank_worker(argv):
    """Run ``bll-ref ARGV`` in this MPI rank; print its peak resident memory at exit."""
    import atexit
    import resource

    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    atexit.register(lambda: print(f"peak resident rank {rank}: "
                                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
                                  file=sys.stderr, flush=True))
    from bll_ref.cli import main
    return main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-worker"]:
        return rank_worker(argv[1:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--tree", default=None, help="checkout to import bll_ref from (default: this one)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    mpiexec = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if not mpiexec:
        print("mpi_memory.py: no mpiexec found; pip install 'bll_ref[mpi]'", file=sys.stderr)
        return 2
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if args.tree:
        env["PYTHONPATH"] = os.path.abspath(args.tree) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        train = ["train", "--parallel", "mpi", "--epochs", "1", "--out", os.path.join(tmp, "run"),
                 *(["--replicas", str(args.replicas)] if args.replicas > 1 else []), *extra]
        cmd = [mpiexec, "-n", str(args.ranks), "--oversubscribe", "-x", "PYTHONPATH", sys.executable, "-m", "mpi4py",
               os.path.abspath(__file__), "--rank-worker", *train]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    peaks = {int(k): int(v) for k, v in re.findall(r"peak resident rank (\d+): (\d+) MB", r.stderr)}
    if r.returncode or len(peaks) != args.ranks:
        print(f"mpi_memory.py: the run failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}", file=sys.stderr)
        return 1
    print(f"{args.ranks} ranks, {args.replicas} replica(s) per stage, bll_ref from {args.tree or 'this checkout'}")
    print("| rank | peak resident, MB |\n|---|---|")
    for k in sorted(peaks):
        print(f"| {k} | {peaks[k]} |")
    for line in r.stdout.splitlines():
        if "test accuracy" in line and "final" in line or line.startswith("memory per rank"):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
