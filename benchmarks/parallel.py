"""Steps per second of BLL's pipeline schedules (stages x replicas) against the sequential loop,
with the pipeline model's predictions written before any parallel run.

Models: the 4-block MLP 784-1024-1024-1024-10 (and, on 16 or more cores, a 16-block MLP of 1024-wide
blocks), BLL default recipe, batch 128, float32, random inputs and labels, one BLAS thread per
worker. Variants, alternated in rounds so that machine drift hits all alike (medians over rounds;
speed-ups are medians of per-round ratios against the sequential run of the same model):

    seq        SequentialSchedule                               one process
    seq_mb2    SequentialSchedule, --micro-batches 2            the arithmetic of 2 replicas
    threads    ThreadPipeline, 2 workers                        one process
    mpi2       2 ranks = 2 stages x 1 replica                   mpiexec subprocess
    mpi2r      2 ranks = 1 stage x 2 replicas
    mpi4       4 ranks = 4 stages x 1 replica
    mpi4r      4 ranks = 2 stages x 2 replicas
    *_whole    mpi2r / mpi4r, every replica steps the whole optimiser (BLL_REF_SHARD_STEP=0)
    *_msgs     mpi2r / mpi4r, the records travel as messages, as between hosts (BLL_REF_SHARED_DIR="")
    mpi8r      8 ranks = 4 stages x 2 replicas                  16 or more cores only
    seq16      the 16-block MLP, sequentially                   16 or more cores only
    mpi16      the 16-block MLP on 16 ranks (16 x 1)            16 or more cores only
    torch      PyTorch-CPU BP, Adam, set_num_threads(2)         only where torch is importable
    torch1     PyTorch-CPU BP, one process, one thread          the baseline of the DDP rows
    ddp2/4/8   PyTorch DistributedDataParallel (gloo), W        benchmarks/torch_ddp.py; each process
               processes of one thread, batch split W ways      takes N / W rows (ddp8: 16+ cores)

Every measurement builds a fresh model, runs ``--warmup`` steps, then times ``--steps`` steps.
steps/s is the steady-state rate of the last stage, (n - 1) / (t_n - t_1). The losses of every
variant are compared with the sequential run of the same model and micro-batches: they must agree
bit for bit.

Predict first: before any parallel run the script measures each block's cost (forward + update
alone, at 128, 64, ..., 2 rows) and MPI messages (ping-pong over shared memory and over TCP on
loopback, 8 bytes, one (128, 1024) float32 activation, 4 and 16 MiB) and the memory copy rate with
1, 2, 4, ... processes copying at once, computes the pipeline model's
prediction for every variant, on this machine's cores and on 16 cores, and for 8..64 ranks on
deeper models (8- and 16-block MLP, ResNet-18), and writes them to the results file. The measured
table then shows those predictions, unchanged, beside the measurements, with the error.
``--predict`` stops after writing the predictions.

The pipeline model itself (``predict_step``) is in benchmarks/parallel_model.py.

    python benchmarks/parallel.py [--rounds 5] [--steps 60] [--warmup 10]
    python benchmarks/parallel.py --predict                    # the predictions alone, no parallel run
    python benchmarks/parallel.py --quick --results /tmp/p     # smoke run, seconds

As root, mpiexec needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; the script sets
them for its own mpiexec subprocesses. More ranks than cores are run oversubscribed.

Writes benchmarks/results/parallel.{json,md,png} (``--results`` another directory).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# bll_ref (and common, which uses it) is imported inside the functions that use it: the PyTorch
# worker runs this file under another interpreter (a venv with torch) that need not have bll_ref.

from parallel_model import N, ROWS, best_split, copy_counts, cost_at, predict_step  # noqa: E402

SIZES = (784, 1024, 1024, 1024, 10)
SEED = 0
DEEP_RANKS = (8, 16, 32, 64)
BIG_CORES = 16  # the machine the bars are for

MODELS = {"mlp4": SIZES, "mlp8": (784,) + (1024,) * 7 + (10,), "mlp16": (784,) + (1024,) * 15 + (10,)}
# name: (model, schedule, stages, replicas); replicas R means R micro-batches
VARIANTS = {"seq": ("mlp4", "seq", 1, 1), "seq_mb2": ("mlp4", "seq", 1, 2), "threads": ("mlp4", "threads", 2, 1),
            "mpi2": ("mlp4", "mpi", 2, 1), "mpi2r": ("mlp4", "mpi", 1, 2), "mpi4": ("mlp4", "mpi", 4, 1),
            "mpi4r": ("mlp4", "mpi", 2, 2), "mpi8r": ("mlp4", "mpi", 4, 2),
            "seq16": ("mlp16", "seq", 1, 1), "mpi16": ("mlp16", "mpi", 16, 1),
            "mpi2r_whole": ("mlp4", "mpi", 1, 2), "mpi4r_whole": ("mlp4", "mpi", 2, 2),
            "mpi2r_msgs": ("mlp4", "mpi", 1, 2), "mpi4r_msgs": ("mlp4", "mpi", 2, 2)}
# replicas that each step the whole optimiser (BLL_REF_SHARD_STEP=0), side by side with the steps in shares
WHOLE_STEP = ("mpi2r_whole", "mpi4r_whole")
# replicas whose records travel as messages, as between hosts (BLL_REF_SHARED_DIR=""; each steps the whole optimiser)
MESSAGES = ("mpi2r_msgs", "mpi4r_msgs")
SMALL = ("seq", "seq_mb2", "threads", "mpi2", "mpi2r", "mpi2r_whole", "mpi2r_msgs", "mpi4", "mpi4r", "mpi4r_whole",
         "mpi4r_msgs")
BIG = tuple(v for v in SMALL if v not in MESSAGES) + ("mpi8r", "seq16", "mpi16")  # the 16-core run: short
NAMES = {"seq": "sequential", "seq_mb2": "sequential, 2 micro-batches", "threads": "threads, 2 workers",
         "mpi2": "MPI 2 ranks (2 x 1)", "mpi2r": "MPI 2 ranks (1 x 2)", "mpi4": "MPI 4 ranks (4 x 1)",
         "mpi4r": "MPI 4 ranks (2 x 2)", "mpi2r_whole": "MPI 2 ranks (1 x 2), whole step each",
         "mpi4r_whole": "MPI 4 ranks (2 x 2), whole step each",
         "mpi2r_msgs": "MPI 2 ranks (1 x 2), records as messages",
         "mpi4r_msgs": "MPI 4 ranks (2 x 2), records as messages",
         "mpi8r": "MPI 8 ranks (4 x 2)", "seq16": "16-block MLP, sequential",
         "mpi16": "16-block MLP, MPI 16 ranks (16 x 1)", "torch": "PyTorch BP, 2 threads",
         "torch1": "PyTorch BP, 1 process, 1 thread", "ddp2": "PyTorch DDP (gloo), 2 processes",
         "ddp4": "PyTorch DDP (gloo), 4 processes", "ddp8": "PyTorch DDP (gloo), 8 processes"}
TORCH_ROWS = {"torch": None, "torch1": 1, "ddp2": 2, "ddp4": 4, "ddp8": 8}  # row: processes (torch: 2 threads)


def ranks_of(v):
    model, sched, stages, replicas = VARIANTS[v]
    return 1 if sched == "seq" else stages * replicas


# --- the run every variant shares ------------------------------------------------------------
def make_batches(n):
    """``n`` random (x, y) batches: x (128, 784) float32, y (128,) int64; the same on every rank."""
    rng = np.random.default_rng(SEED)
    return [(rng.standard_normal((N, SIZES[0])).astype(np.float32), rng.integers(0, 10, N)) for _ in range(n)]


def model_input(x, model):
    """Benchmark rows ``x`` (N, 784) as ``model`` takes them: images (N, 1, 28, 28) for ResNet-18."""
    return x.reshape(-1, 1, 28, 28) if model == "resnet18" else x


def build_method(x, model="mlp4"):
    from bll_ref import methods, models
    blocks = models.build("resnet18", rng=SEED) if model == "resnet18" else models.mlp(MODELS[model], rng=SEED)
    return methods.make("bll", blocks, sample_input=x[:8])


def timed_run(run_epoch, warm, timed, barrier=None):
    """Warm-up epoch, then the timed epoch, through ``run_epoch(batches, on_step) -> losses``.
    Returns the start time, the step completion times of the last stage (empty where this
    process is not the last stage) and the losses."""
    run_epoch(warm, lambda step, loss: None)
    if barrier is not None:
        barrier()
    stamps = []
    t0 = time.perf_counter()
    losses = run_epoch(timed, lambda step, loss: stamps.append(time.perf_counter()))
    return {"t0": t0, "stamps": stamps, "losses": [float(v) for v in losses]}


def rates(run, n_steps):
    """steps/s: steady state of the last stage, and over the whole run (fill and drain included)."""
    s = run["stamps"]
    steady = (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else float("nan")
    return {"steps_per_s": steady, "steps_per_s_whole": n_steps / (s[-1] - run["t0"]) if s else float("nan")}


# --- in-process variants ---------------------------------------------------------------------
def run_sequential(batches, warmup, model="mlp4", micro=1):
    from bll_ref.parallel import SequentialSchedule
    m = build_method(batches[0][0], model)
    sched = SequentialSchedule(blas=1, micro_batches=micro, method=m)
    run = timed_run(lambda b, f: sched.run_epoch(m, b, f), batches[:warmup], batches[warmup:])
    return {**rates(run, len(batches) - warmup), "losses": run["losses"]}


def run_threads(batches, warmup, groups):
    from bll_ref.parallel.threads import ThreadPipeline
    m = build_method(batches[0][0])
    pipe = ThreadPipeline(m, groups, blas=1)
    run = timed_run(lambda b, f: pipe.run_epoch(m, b, f), batches[:warmup], batches[warmup:])
    return {**rates(run, len(batches) - warmup), "losses": run["losses"]}


# --- subprocess variants ---------------------------------------------------------------------
def mpiexec():
    """$MPIEXEC if set (benchmarks/cores16.sh: the carried OpenMPI's, whatever else is installed),
    else the one beside this Python (a venv's), else the first on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return os.environ.get("MPIEXEC") or (here if os.path.exists(here) else shutil.which("mpiexec"))


def _subprocess_env(blas_one=True, **extra):
    env = dict(os.environ, **extra)
    if blas_one:
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # mpiexec refuses root unless told; this benchmark only starts local ranks of itself
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_subprocess(cmd, timeout, blas_one=True, **env):
    """Run ``cmd`` (it writes a JSON file, named by the trailing --out) and return that JSON,
    or {"error": ...} with the end of its output. On timeout everything it started is ended."""
    fd, out = tempfile.mkstemp(prefix="bll_parallel_", suffix=".json")
    os.close(fd)
    proc = subprocess.Popen(cmd + ["--out", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_subprocess_env(blas_one, **env), start_new_session=True, text=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_session(proc)
        text, _ = proc.communicate()
        os.unlink(out)
        return {"error": f"timed out after {timeout} s: {' '.join(cmd[:6])} ...\n{(text or '')[-1500:]}"}
    try:
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{text[-1500:]}"}
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"no result from {' '.join(cmd[:6])} ... ({e})\n{text[-1500:]}"}
    finally:
        if os.path.exists(out):
            os.unlink(out)


def _end_session(proc, grace=5.0):
    """End ``proc`` (started with start_new_session) and every process of its session. mpiexec
    ends its ranks on SIGTERM; ranks sit in process groups of their own, so what is left after
    the grace period is found by session id and killed by pid."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session
        except OSError:
            continue
        if int(fields[3]) == proc.pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    if proc.poll() is None:
        proc.kill()


def groups_arg(groups):
    return ";".join(",".join(map(str, g)) for g in groups)


def run_mpi(v, steps, warmup, groups, timeout):
    model, _, stages, replicas = VARIANTS[v]
    return run_subprocess([mpiexec(), "-n", str(stages * replicas), "--oversubscribe", sys.executable, "-m", "mpi4py",
                           os.path.abspath(__file__), "--mpi-worker", "pipeline", "--steps", str(steps),
                           "--warmup", str(warmup), "--groups", groups_arg(groups), "--model", model,
                           "--replicas", str(replicas)], timeout, BLL_REF_SHARD_STEP="0" if v in WHOLE_STEP else "1",
                          **({"BLL_REF_SHARED_DIR": ""} if v in MESSAGES else {}))


TCP = ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]


def run_pingpong(reps, timeout, tcp=False):
    return run_subprocess([mpiexec(), "-n", "2", "--oversubscribe", *(TCP if tcp else []), sys.executable, "-m",
                           "mpi4py", os.path.abspath(__file__), "--mpi-worker", "pingpong", "--reps", str(reps)],
                          timeout)


def run_copy(k, timeout):
    return run_subprocess([mpiexec(), "-n", str(k), "--oversubscribe", sys.executable, "-m", "mpi4py",
                           os.path.abspath(__file__), "--mpi-worker", "copy"], timeout)


def run_torch(python, steps, warmup, timeout, row="torch"):
    """A PyTorch row: BP with 2 threads (this file's worker), or benchmarks/torch_ddp.py on W processes."""
    if row == "torch":
        return run_subprocess([python, os.path.abspath(__file__), "--torch-worker", "--steps", str(steps),
                               "--warmup", str(warmup)], timeout, blas_one=False)
    ddp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ddp.py")
    return run_subprocess([python, ddp, "--ranks", str(TORCH_ROWS[row]), "--steps", str(steps),
                           "--warmup", str(warmup)], timeout)


# --- workers (run in the subprocesses) -------------------------------------------------------
def mpi_pipeline_worker(args):
    """One rank of the MPI variant; the last rank writes the result."""
    from bll_ref.parallel.mpi import MPIPipeline, world
    comm = world()
    groups = [[int(k) for k in g.split(",")] for g in args.groups.split(";")]
    batches = make_batches(args.warmup + args.steps)
    m = build_method(batches[0][0], args.model)
    pipe = MPIPipeline(m, comm, groups, batches[0][0][:8], blas=1, replicas=args.replicas,
                       micro_batches=args.replicas)
    run = timed_run(lambda b, f: pipe.run_epoch(m, b, f), batches[:args.warmup], batches[args.warmup:],
                    barrier=comm.Barrier)
    if pipe.last:
        with open(args.out, "w") as f:
            json.dump({**rates(run, args.steps), "losses": run["losses"], "ranks": comm.Get_size()}, f)


def mpi_pingpong_worker(args):
    """Half the median round trip, rank 0 <-> 1, of an 8-byte message, a (128, 1024) float32
    activation and 4 and 16 MiB, the sizes of one 1024-wide learner's and of a whole stage's
    gradient records (the cost per byte changes with the size: caches, the transport's protocol)."""
    from mpi4py import MPI
    comm, rank = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank()
    out = {}
    for name, buf in (("small_8B", np.zeros(2, np.float32)), ("activation", np.zeros((N, 1024), np.float32)),
                      ("grad_4MiB", np.zeros(1 << 20, np.float32)), ("grad_16MiB", np.zeros(1 << 22, np.float32))):
        times = []
        for i in range(min(args.reps, 30 if buf.nbytes > 1 << 20 else args.reps) + 10):  # 10: set up the connection
            comm.Barrier()
            t = time.perf_counter()
            if rank == 0:
                comm.Send(buf, dest=1, tag=1)
                comm.Recv(buf, source=1, tag=2)
            else:
                comm.Recv(buf, source=0, tag=1)
                comm.Send(buf, dest=0, tag=2)
            if i >= 10:
                times.append(time.perf_counter() - t)
        out[name] = {"one_way_s": float(np.median(times)) / 2, "bytes": int(buf.nbytes),
                     "one_way_s_p10_p90": [float(np.percentile(times, 10)) / 2, float(np.percentile(times, 90)) / 2]}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)


def mpi_copy_worker(args):
    """Memory copy rate while every rank copies at the same time (each copy starts at a barrier):
    the median over ranks of each rank's median rate; rank 0 writes it."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    every = comm.gather(copy_bytes_per_s(barrier=comm.Barrier), root=0)
    if comm.Get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": comm.Get_size(), "bytes_per_s": float(np.median(every)), "per_rank": every}, f)


def torch_worker(args):
    """PyTorch BP on the same MLP (Adam, batch 128, 2 threads); same protocol as ours."""
    import torch
    from torch_ddp import build_net  # benchmarks/ is on the path of a script run from it
    torch.set_num_threads(2)
    net = build_net(torch)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    batches = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
               for x, y in make_batches(args.warmup + args.steps)]

    def run_epoch(bs, on_step):
        losses = []
        for x, y in bs:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            on_step(len(losses), losses[-1])
        return losses

    run = timed_run(run_epoch, batches[:args.warmup], batches[args.warmup:])
    with open(args.out, "w") as f:
        json.dump({**rates(run, args.steps), "torch": torch.__version__, "threads": torch.get_num_threads()}, f)


# --- the model -------------------------------------------------------------------------------
def measure_blocks(batches, model="mlp4", rows=ROWS, repeats=5):
    """{rows: [seconds of forward + update of each learner alone]} on one batch, 1 BLAS thread."""
    from bll_ref.parallel import blas_threads, measure_learner_seconds
    x, y = batches[0]
    x = model_input(x, model)
    with blas_threads(1):
        m = build_method(x, model)
        return {n: measure_learner_seconds(m, x[:n], y[:n], repeats=repeats) for n in rows}


def measure_opt_seconds(batches, model="mlp4", repeats=5):
    """[seconds of each learner's optimiser steps (block, head, trained feedback)], 1 BLAS thread:
    the part of a step that replicas stepping in shares split R ways."""
    from bll_ref.parallel import blas_threads
    from bll_ref.parallel.slices import optimisers
    x, y = batches[0]
    x = model_input(x, model)
    with blas_threads(1):
        m = build_method(x, model)
        m.train_step(x, y)  # every gradient array exists
        out = []
        for learner in m.learners:
            times = []
            for _ in range(repeats + 1):
                t = time.perf_counter()
                for opt in optimisers(learner):
                    opt.step()
                times.append(time.perf_counter() - t)
            out.append(float(np.median(times[1:])))
        return out


def ping_text(ping):
    """The ping-pong's one-way times, e.g. "8 B 0.8 us, (128, 1024) float32 66 us, 4 MiB 180 us"."""
    names = {"small_8B": "8 B", "activation": "(128, 1024) float32", "grad_4MiB": "4 MiB", "grad_16MiB": "16 MiB"}
    return ", ".join(f"{names[k]} {1e6 * ping[k]['one_way_s']:.1f} us" for k in names if k in ping)


def stage_param_bytes(model):
    """Bytes of the gradients each learner's replicas exchange (block + head + trained parts):
    the parameters of its state, float32."""
    import re
    m = build_method(model_input(make_batches(1)[0][0], model), model)
    return [sum(v.nbytes for k, v in l.state_dict().items() if re.search(r"(^|/)params/", k)) for l in m.learners]


def copy_bytes_per_s(nbytes=16 << 20, repeats=20, barrier=None):
    """Memory copy rate (bytes copied per second): the median of ``repeats`` copies of ``nbytes``,
    each started after ``barrier()`` when given (every rank of an MPI job copying at once)."""
    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    times = []
    for _ in range(repeats + 2):
        if barrier is not None:
            barrier()
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return nbytes / float(np.median(times[2:]))


def predict(args, variants, batches, setup):
    """Every prediction of this run, from measurements taken before any parallel run."""
    from bll_ref.parallel import pipeline_seconds_per_step
    costs, msg, pbytes, groups = setup["costs"], setup["message"], setup["param_bytes"], setup["groups"]
    out = {"written_at": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(), "variants": {}, "deep": {}}
    for v in variants:
        model, sched, stages, replicas = VARIANTS[v]
        c = costs[model]
        seq = sum(cost_at(c, N))
        row = {}
        for label, cores in (("here", os.cpu_count() or 1), (f"{BIG_CORES} cores", BIG_CORES)):
            if sched == "seq":
                step = sum(cost_at(c, N))  # micro-batches: R slices of N / R rows cost about one batch
                step = sum(cost_at(c, N / replicas)) * replicas if replicas > 1 else step
            elif sched == "threads":
                step = max(pipeline_seconds_per_step(cost_at(c, N), groups[v], 0.0),
                           seq / min(cores, stages))
            else:
                step = predict_step(c, groups[v], replicas, msg["shm"], pbytes[model], cores, setup["copy_rates"],
                                    shared=v not in MESSAGES,
                                    opt_s=None if v in WHOLE_STEP + MESSAGES else setup["opt_s"][model])
            row[label] = {"step_s": step, "speedup": seq / step}
        out["variants"][v] = row
    for model, c in costs.items():
        n_blocks = len(next(iter(c.values())))
        out["deep"][model] = {}
        for ranks in DEEP_RANKS:
            for link in ("shm", "tcp"):
                # TCP: ranks on other hosts, whose replicas send their records as messages
                b = best_split(c, ranks, msg[link], pbytes[model], ranks, n_blocks, setup["copy_rates"],
                               shared=link == "shm", opt_s=setup["opt_s"][model])
                if b:
                    out["deep"][model].setdefault(str(ranks), {})[link] = {"stages": b[0], "replicas": b[1],
                                                                            "speedup": b[2]}
    return out


# --- main ------------------------------------------------------------------------------------
def _median(v):
    v = [x for x in v if x == x]
    return float(np.median(v)) if v else float("nan")


def _fmt(v, f="{:.2f}"):
    return "n/a" if v is None or v != v else f.format(v)


def _nan_to_none(v):
    """JSON has no NaN: a failed or skipped measurement is written as null."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of all variants (medians over rounds)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of a few steps")
    ap.add_argument("--predict", action="store_true", help="write the predictions and stop (no parallel run)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset (default: {','.join(SMALL)}; on {BIG_CORES}+ cores also "
                         "mpi8r,seq16,mpi16)")
    ap.add_argument("--results", default=None, help="directory for parallel.{json,md,png} (default results/)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-python", default=None,
                    help="interpreter with torch for the PyTorch row (default: this one, if it has torch)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before an mpiexec/torch run is ended")
    ap.add_argument("--mpi-worker", choices=("pipeline", "pingpong", "copy"), help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--groups", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="mlp4", help=argparse.SUPPRESS)
    ap.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mpi_worker == "pipeline":
        return mpi_pipeline_worker(args)
    if args.mpi_worker == "pingpong":
        return mpi_pingpong_worker(args)
    if args.mpi_worker == "copy":
        return mpi_copy_worker(args)
    if args.torch_worker:
        return torch_worker(args)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.reps = 1, 6, 2, 20
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the steady-state rate needs two step times)")
    if not mpiexec():
        ap.error("no mpiexec found; pip install 'bll_ref[mpi]'")
    variants = args.variants.split(",") if args.variants else list(BIG if (os.cpu_count() or 1) >= BIG_CORES else SMALL)
    unknown = [v for v in variants if v not in VARIANTS and v != "torch"]
    if unknown or "seq" not in variants:
        ap.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)}, torch); 'seq' must be one")
    variants = [v for v in variants if v != "torch"]  # the PyTorch rows follow --torch-python / --no-torch
    run_benchmark(args, variants)


def run_benchmark(args, variants):
    from bll_ref.parallel import blas_threads
    from common import RESULTS, gemm_gflops, machine, write
    results = args.results or RESULTS
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with blas_threads(1):
        gf_before = gemm_gflops(repeats=3 if args.quick else 10)
    print(f"float32 1024^3 GEMM, 1 BLAS thread: {gf_before:.0f} GFLOP/s", flush=True)
    batches = make_batches(args.warmup + args.steps)
    setup = measure_setup(args, variants, batches)
    # predict first: written to the results file before any parallel run, never changed after
    predictions = predict(args, variants, batches, setup)
    head = {"machine": machine(), "config": {"batch": N, "rounds": args.rounds, "steps": args.steps,
                                             "warmup": args.warmup, "quick": args.quick, "variants": variants},
            "setup": {k: v for k, v in setup.items() if k != "groups"},
            "groups": {v: g for v, g in setup["groups"].items()}, "predictions": predictions}
    write("parallel", _nan_to_none({**head, "measured": None}), markdown_predictions(predictions), out=results)
    print(f"predictions written to {os.path.join(results, 'parallel.json')} before any parallel run", flush=True)
    if args.predict:
        return
    with open(os.path.join(results, "parallel.json")) as f:
        predictions = json.load(f)["predictions"]  # the table compares with what was written, as written
    torch_python = None
    if not args.no_torch:
        import importlib.util
        torch_python = args.torch_python or (sys.executable if importlib.util.find_spec("torch") else None)
    if torch_python:
        variants = variants + ["torch", "torch1", "ddp2", "ddp4"] + (["ddp8"] if "mpi8r" in variants else [])
    else:
        print("PyTorch row skipped" + ("" if args.no_torch else " (torch not importable; see --torch-python)"))
    per_round, errors = run_rounds(args, variants, batches, setup["groups"], torch_python)
    with blas_threads(1):
        gf_after = gemm_gflops(repeats=3 if args.quick else 10)
    res = {**head, "predictions": predictions,
           "gemm_gflops_1thread": {"before": gf_before, "after": gf_after, "mean": (gf_before + gf_after) / 2},
           "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
           "measured": summarize(variants, per_round, predictions), "errors": errors}
    os.makedirs(results, exist_ok=True)
    png = os.path.join(results, "parallel.png")
    plot(png, res)
    write("parallel", _nan_to_none(res), markdown(res), out=results)
    print(f"\nwrote {os.path.join(results, 'parallel.json')}, parallel.md, {png}")


def measure_setup(args, variants, batches):
    """Block costs of every model, the groupings, parameter bytes and MPI message times (printed)."""
    from bll_ref.parallel import balanced_groups, describe
    reps = 2 if args.quick else 5
    models = sorted({VARIANTS[v][0] for v in variants if v in VARIANTS} | {"mlp8", "mlp16", "resnet18"})
    costs, pbytes, opt_s = {}, {}, {}
    for model in models:
        costs[model] = measure_blocks(batches, model, repeats=reps)  # medians: one slow repeat would set a stage
        pbytes[model] = stage_param_bytes(model)
        opt_s[model] = measure_opt_seconds(batches, model, repeats=reps)
        print(f"{model}: block costs at {N} rows (ms) "
              + ", ".join(f"{1e3 * c:.2f}" for c in costs[model][N])
              + "; of which optimiser steps " + ", ".join(f"{1e3 * c:.2f}" for c in opt_s[model]), flush=True)
    groups = {}
    for v in variants:
        if v in VARIANTS and VARIANTS[v][1] != "seq":
            model, _, stages, _ = VARIANTS[v]
            groups[v] = balanced_groups(costs[model][N], stages)
            print(f"{v}: {describe(groups[v], costs[model][N])}", flush=True)
    msg = {}
    for link in ("shm", "tcp"):
        ping = run_pingpong(args.reps, args.timeout, tcp=link == "tcp")
        if "error" in ping:
            raise SystemExit(f"ping-pong over {link} failed: {ping['error']}")
        msg[link] = ping
        print(f"MPI message over {link}, ping-pong median / 2: {ping_text(ping)}", flush=True)
    rates = {}
    for k in copy_counts(os.cpu_count() or 1):
        res = run_copy(k, args.timeout)
        if "error" in res:
            raise SystemExit(f"copy rate with {k} processes failed: {res['error']}")
        rates[str(k)] = res["bytes_per_s"]
    print(f"memory copy, k processes at once: {copy_text(rates)}", flush=True)
    return {"costs": {m: {str(n): c for n, c in cs.items()} for m, cs in costs.items()}, "param_bytes": pbytes,
            "opt_s": opt_s, "groups": groups, "message": msg, "copy_rates": rates}


def copy_text(rates):
    """"1: 25.8, 2: 12.1 GB/s each": the copy rate per process, by processes copying at once."""
    return ", ".join(f"{k}: {r / 1e9:.1f}" for k, r in sorted(rates.items(), key=lambda kv: int(kv[0]))) + " GB/s each"


def run_rounds(args, variants, batches, groups, torch_python):
    """{variant: [result of each round]}, {variant: first error}; a failed run counts as NaN."""
    per_round, errors = {v: [] for v in variants}, {}
    for r in range(args.rounds):
        for v in variants:
            if v in TORCH_ROWS:
                res = run_torch(torch_python, args.steps, args.warmup, args.timeout, v)
            else:
                model, sched, stages, replicas = VARIANTS[v]
                if sched == "seq":
                    res = run_sequential(batches, args.warmup, model, replicas)
                elif sched == "threads":
                    res = run_threads(batches, args.warmup, groups[v])
                else:
                    res = run_mpi(v, args.steps, args.warmup, groups[v], args.timeout)
            if "error" in res:
                errors.setdefault(v, res["error"])
                print(f"round {r + 1} {v}: FAILED\n{res['error']}", flush=True)
                res = {"steps_per_s": float("nan"), "steps_per_s_whole": float("nan")}
            else:
                print(f"round {r + 1} {v}: {res['steps_per_s']:.2f} steps/s "
                      f"(whole run {res['steps_per_s_whole']:.2f})", flush=True)
            per_round[v].append(res)
    return per_round, errors


def reference_of(v, variants):
    """The sequential variant whose losses ``v`` must equal (same model and micro-batches)."""
    model, _, _, replicas = VARIANTS[v]
    for u in variants:
        if u in VARIANTS and VARIANTS[u][:2] == (model, "seq") and VARIANTS[u][3] == replicas:
            return u
    return None


def summarize(variants, per_round, predictions):
    """Medians over rounds, speed-ups against the sequential run of the same model, the errors of
    the predictions written before the runs, and whether the losses equal the reference's."""
    out = {"steps_per_s": {}, "speedup": {}, "losses_equal_reference": {}, "error_pct": {}, "per_round": {}}
    for v in variants:
        out["steps_per_s"][v] = _median([res["steps_per_s"] for res in per_round[v]])
        # the DDP rows against PyTorch's own one-process run; every other row against our sequential one
        base = "seq16" if v in VARIANTS and VARIANTS[v][0] == "mlp16" else "torch1" if v.startswith("ddp") else "seq"
        if base in per_round:
            out["speedup"][v] = _median([a["steps_per_s"] / b["steps_per_s"]
                                         for a, b in zip(per_round[v], per_round[base])])
        ref = reference_of(v, variants) if v in VARIANTS else None
        if ref is not None and ref != v:
            want = per_round[ref][0].get("losses")
            out["losses_equal_reference"][v] = {"reference": ref, "equal": all(
                res.get("losses") == want for res in per_round[v]) if want else None}
        pred = predictions["variants"].get(v, {}).get("here", {}).get("speedup")
        sp = out["speedup"].get(v, float("nan"))
        out["error_pct"][v] = 100 * (pred - sp) / sp if pred is not None and sp == sp and sp else float("nan")
        out["per_round"][v] = [{k: x for k, x in res.items() if k != "losses"} for res in per_round[v]]
    return out


def markdown_predictions(pred):
    md = (f"Predictions written {pred['written_at']} on {pred['cores']} CPUs, before any parallel run "
          "(benchmarks/parallel.py, pipeline model in its docstring).\n\n"
          f"| variant | predicted speed-up here | predicted, {BIG_CORES} cores |\n|---|---|---|")
    for v, row in pred["variants"].items():
        md += f"\n| {NAMES[v]} | {row['here']['speedup']:.2f} | {row[f'{BIG_CORES} cores']['speedup']:.2f} |"
    md += ("\n\nDeeper models, W ranks on W cores, the best stages x replicas the model finds (one host, "
           "records in shared memory / records sent over TCP, timed on loopback):\n\n| model | "
           + " | ".join(f"{w} ranks" for w in DEEP_RANKS)
           + " |\n|---|" + "---|" * len(DEEP_RANKS))
    for model, rows in pred["deep"].items():
        cells = []
        for w in DEEP_RANKS:
            d = rows.get(str(w))
            cells.append(" / ".join(f"{d[l]['stages']}x{d[l]['replicas']}: {d[l]['speedup']:.1f}x" for l in ("shm", "tcp")
                                    if l in d) if d else "-")
        md += f"\n| {model} | " + " | ".join(cells) + " |"
    return md


def markdown(res):
    m, pred, cfg = res["measured"], res["predictions"], res["config"]
    gf, load = res["gemm_gflops_1thread"], res["loadavg"]
    md = (f"BLL default recipe, batch {N}, float32, 1 BLAS thread per worker; median of {cfg['rounds']} interleaved "
          f"rounds of {cfg['steps']} timed steps after {cfg['warmup']} warm-up steps; {res['machine']['cpus']} CPUs, "
          f"1-minute load average {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end; float32 1024^3 "
          f"GEMM {gf['mean']:.0f} GFLOP/s on 1 thread\n\n"
          f"| variant | steps/s | speed-up | predicted (written first) | error % | predicted, {BIG_CORES} cores "
          "| losses = sequential |\n|---|---|---|---|---|---|---|")
    for v in cfg["variants"] + [t for t in TORCH_ROWS if t in m["steps_per_s"]]:
        p = pred["variants"].get(v, {})
        eq = m["losses_equal_reference"].get(v)
        eq_s = "-" if eq is None else f"{'yes' if eq['equal'] else 'NO'} ({eq['reference']})"
        md += (f"\n| {NAMES[v]} | {_fmt(m['steps_per_s'][v])} | {_fmt(m['speedup'].get(v))} | "
               f"{_fmt(p.get('here', {}).get('speedup'))} | {_fmt(m['error_pct'].get(v), '{:+.0f}')} | "
               f"{_fmt(p.get(f'{BIG_CORES} cores', {}).get('speedup'))} | {eq_s} |")
    md += (f"\n\nspeed-up: median over rounds of variant / sequential (same model) in the same round; predicted: "
           f"the pipeline model, from block costs, ping-pong message times and copy rates measured before any "
           f"parallel run and written to the results file then; error = (predicted - measured) / measured. The "
           f"{BIG_CORES}-core column is a prediction only unless this ran on such a machine. PyTorch rows: "
           f"backprop, whose steps/s against our sequential BLL step for 'torch' and the one-process 'torch1', and "
           f"against 'torch1' for the DDP rows (PyTorch's own data-parallel scaling; no prediction).")
    md += "\n\n" + markdown_predictions(pred)
    for link, ping in res["setup"]["message"].items():
        md += f"\n\nMPI message over {link} (2 ranks, ping-pong median / 2): {ping_text(ping)}"
    md += f"\n\nmemory copy rate, k processes copying at once: {copy_text(res['setup']['copy_rates'])}"
    if res["errors"]:
        md += "\n\nfailed variants: " + "; ".join(f"{v}: {e.splitlines()[0]}" for v, e in res["errors"].items())
    return md


def plot(path, res):
    """Measured speed-ups (points) and the predictions written before the runs, per rank count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    m, pred = res["measured"], res["predictions"]
    for v, p in pred["variants"].items():
        w = ranks_of(v)
        ax.plot([w], [p["here"]["speedup"]], "x", color="C0", markersize=8)
        ax.plot([w], [p[f"{BIG_CORES} cores"]["speedup"]], "+", color="C2", markersize=9)
        sp = m["speedup"].get(v)
        if sp is not None and sp == sp:
            ax.plot([w], [sp], "o", color="C3", markersize=6)
            ax.annotate(v, (w, sp), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for model, rows in pred["deep"].items():
        ws = [int(w) for w in rows]
        ax.plot(ws, [rows[str(w)]["shm"]["speedup"] for w in ws], "-", lw=1, label=f"predicted, {model}, W cores")
    ax.plot([], [], "x", color="C0", label="predicted, this machine")
    ax.plot([], [], "+", color="C2", label=f"predicted, {BIG_CORES} cores (not measured here)")
    ax.plot([], [], "o", color="C3", label="measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("MPI ranks (stages x replicas)")
    ax.set_ylabel("speed-up over sequential (steps/s ratio)")
    ax.set_title(f"BLL pipeline x replicas, batch {N}: predicted first, then measured")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
