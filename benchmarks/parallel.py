"""Steps per second of BLL's pipeline schedules against the sequential loop, and the pipeline model.

Model: the 4-block MLP 784-1024-1024-1024-10, BLL default recipe, batch 128, float32, random
inputs and labels, one BLAS thread per worker. Variants, alternated in rounds so that machine
drift hits all alike (medians over rounds; speed-ups are medians of per-round ratios):

    seq      SequentialSchedule(blas=1)                    one process
    threads  ThreadPipeline, 2 workers                     one process
    mpi2     MPIPipeline, 2 ranks (mpiexec subprocess)     one process per rank
    mpi4     MPIPipeline, 4 ranks (mpiexec subprocess)
    torch    PyTorch-CPU BP, Adam, set_num_threads(2)      only where torch is importable

Every measurement builds a fresh model, runs ``--warmup`` steps (Numba kernels, caches, Adam
state), then times ``--steps`` steps. steps/s is the steady-state rate of the last stage,
(n - 1) / (t_n - t_1) over its step completion times, so pipeline fill and drain are left out
(the whole-run rate, fill and drain included, is the next column). The losses of the pipelined runs
are compared with the sequential run's: they must agree bit for bit (docs/architecture.md, "Why a
pipeline of block learners is exact").

Pipeline model (``bll_ref.parallel.pipeline_seconds_per_step``): a step takes the slowest group's
time plus one activation message. Block costs are each learner's forward + update alone
(``measure_learner_seconds``); the message time is an MPI ping-pong of one (128, 1024) float32
activation between 2 ranks (median round trip / 2). The same model, with 64 blocks each costing
the measured 1024x1024 hidden block and messages of latency + bytes / link rate, predicts the
speed-up of a deeper model for 4..64 workers on 1, 10 and 100 Gbit/s links.

    python benchmarks/parallel.py [--rounds 5] [--steps 60] [--warmup 10]
    python benchmarks/parallel.py --quick                      # smoke run, seconds
    python benchmarks/parallel.py --torch-python /tmp/torchvenv/bin/python

As root, mpiexec needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; the script sets
them for its own mpiexec subprocesses. 4 ranks on a 2-core machine are oversubscribed: the table
also gives the prediction on this machine's cores (total work over the cores; W > cores MPI ranks
busy-poll while waiting, so each runs at cores / W speed).

Writes benchmarks/results/parallel.{json,md,png}.
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

SIZES = (784, 1024, 1024, 1024, 10)
N = 128
SEED = 0
LINKS_GBIT = (1, 10, 100)
DEEP_BLOCKS = 64
DEEP_WORKERS = (4, 8, 16, 32, 64)
ACT_BYTES = N * 1024 * 4  # one (128, 1024) float32 activation
WORKERS = {"seq": 1, "threads": 2, "mpi2": 2, "mpi4": 4}


# --- the run every variant shares ------------------------------------------------------------
def make_batches(n):
    """``n`` random (x, y) batches: x (128, 784) float32, y (128,) int64; the same on every rank."""
    rng = np.random.default_rng(SEED)
    return [(rng.standard_normal((N, SIZES[0])).astype(np.float32), rng.integers(0, 10, N)) for _ in range(n)]


def build_method(x):
    from bll_ref import methods, models
    return methods.make("bll", models.mlp(SIZES, rng=SEED), sample_input=x[:8])


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
def run_sequential(batches, warmup):
    from bll_ref.parallel import SequentialSchedule
    m = build_method(batches[0][0])
    run = timed_run(lambda b, f: SequentialSchedule(blas=1).run_epoch(m, b, f), batches[:warmup], batches[warmup:])
    return {**rates(run, len(batches) - warmup), "losses": run["losses"]}


def run_threads(batches, warmup, groups):
    from bll_ref.parallel.threads import ThreadPipeline
    m = build_method(batches[0][0])
    pipe = ThreadPipeline(m, groups, blas=1)
    run = timed_run(lambda b, f: pipe.run_epoch(m, b, f), batches[:warmup], batches[warmup:])
    return {**rates(run, len(batches) - warmup), "losses": run["losses"]}


# --- subprocess variants ---------------------------------------------------------------------
def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def _subprocess_env(blas_one=True):
    env = dict(os.environ)
    if blas_one:
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # mpiexec refuses root unless told; this benchmark only starts local ranks of itself
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_subprocess(cmd, timeout, blas_one=True):
    """Run ``cmd`` (it writes a JSON file, named by the trailing --out) and return that JSON,
    or {"error": ...} with the end of its output. On timeout everything it started is ended."""
    fd, out = tempfile.mkstemp(prefix="bll_parallel_", suffix=".json")
    os.close(fd)
    proc = subprocess.Popen(cmd + ["--out", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_subprocess_env(blas_one), start_new_session=True, text=True)
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


def run_mpi(ranks, steps, warmup, groups, timeout):
    return run_subprocess([mpiexec(), "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "mpi4py",
                           os.path.abspath(__file__), "--mpi-worker", "pipeline", "--steps", str(steps),
                           "--warmup", str(warmup), "--groups", groups_arg(groups)], timeout)


def run_pingpong(reps, timeout):
    return run_subprocess([mpiexec(), "-n", "2", "--oversubscribe", sys.executable, "-m", "mpi4py",
                           os.path.abspath(__file__), "--mpi-worker", "pingpong", "--reps", str(reps)], timeout)


def run_torch(python, steps, warmup, timeout):
    return run_subprocess([python, os.path.abspath(__file__), "--torch-worker", "--steps", str(steps),
                           "--warmup", str(warmup)], timeout, blas_one=False)


# --- workers (run in the subprocesses) -------------------------------------------------------
def mpi_pipeline_worker(args):
    """One rank of the MPI variant; the last rank writes the result."""
    from bll_ref.parallel.mpi import MPIPipeline, world
    comm = world()
    groups = [[int(k) for k in g.split(",")] for g in args.groups.split(";")]
    batches = make_batches(args.warmup + args.steps)
    m = build_method(batches[0][0])
    pipe = MPIPipeline(m, comm, groups, batches[0][0][:8], blas=1)
    run = timed_run(lambda b, f: pipe.run_epoch(m, b, f), batches[:args.warmup], batches[args.warmup:],
                    barrier=comm.Barrier)
    if pipe.last:
        with open(args.out, "w") as f:
            json.dump({**rates(run, args.steps), "losses": run["losses"], "ranks": comm.Get_size()}, f)


def mpi_pingpong_worker(args):
    """Half the median round trip of an 8-byte and of a (128, 1024) float32 message, rank 0 <-> 1."""
    from mpi4py import MPI
    comm, rank = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank()
    out = {}
    for name, buf in (("small_8B", np.zeros(2, np.float32)), ("activation", np.zeros((N, 1024), np.float32))):
        times = []
        for i in range(args.reps + 10):  # the first 10 set up the connection
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


def torch_worker(args):
    """PyTorch BP on the same MLP (Adam, batch 128, 2 threads); same protocol as ours."""
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    layers = []
    for i, o in zip(SIZES[:-2], SIZES[1:-1]):
        layers += [torch.nn.Linear(i, o), torch.nn.LeakyReLU(0.01)]
    layers.append(torch.nn.Linear(SIZES[-2], SIZES[-1]))
    net = torch.nn.Sequential(*layers)
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
def measure_blocks(batches, repeats):
    from bll_ref.parallel import blas_threads, measure_learner_seconds
    x, y = batches[0]
    with blas_threads(1):
        return measure_learner_seconds(build_method(x), x, y, repeats=repeats)


def deep_speedups(block_s, message_s, workers=DEEP_WORKERS, blocks=DEEP_BLOCKS):
    """{workers: predicted speed-up over one worker} for a ``blocks``-block model, every block
    costing ``block_s``, every step sending one activation of ``message_s``."""
    from bll_ref.parallel import balanced_groups, pipeline_seconds_per_step
    costs = [block_s] * blocks
    return {w: sum(costs) / pipeline_seconds_per_step(costs, balanced_groups(costs, w), message_s) for w in workers}


def link_message_s(gbit, latency_s):
    return latency_s + ACT_BYTES * 8 / (gbit * 1e9)


def plot(path, res):
    """Measured speed-ups (points) and the pipeline model (lines) over workers, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    ws = [1, *DEEP_WORKERS]
    ax.plot(ws, ws, ":", color="0.5", label="ideal (speed-up = workers)")
    deep = res["deep_model"]["speedup"]
    # drawn widest first: on fast links the lines lie on top of each other
    for (link, sp), color, lw in reversed(list(zip(deep.items(), ("C0", "C1", "C2"), (1.5, 3.0, 4.5)))):
        ax.plot(ws, [1.0, *sp.values()], "-", color=color, lw=lw, alpha=0.8,
                label=f"predicted, {DEEP_BLOCKS}-block model, {link}")
    for key, style, what in (("predicted_speedup", "--", "MPI, shared memory"),
                             ("predicted_speedup_cores", "-.", f"MPI, this machine's {res['cores']} cores")):
        pts = {1: 1.0, **{WORKERS[v]: res[key][v] for v in ("mpi2", "mpi4") if v in res[key]}}
        if len(pts) > 1:
            ax.plot(sorted(pts), [pts[w] for w in sorted(pts)], style, color="C3",
                    label=f"predicted, 4-block MLP, {what}")
    for v, marker in (("threads", "s"), ("mpi2", "o"), ("mpi4", "D")):
        sp = res["speedup"].get(v, float("nan"))
        if sp == sp:  # NaN where the variant failed or was skipped
            ax.plot([WORKERS[v]], [sp], marker, color="C4" if v == "threads" else "C3", markersize=8,
                    linestyle="none", label=f"measured, 4-block MLP, {NAMES[v]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers (pipeline stages)")
    ax.set_ylabel("speed-up over sequential (steps/s ratio)")
    ax.set_title(f"BLL pipeline, batch {N}: measured vs pipeline model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan_to_none(v):
    """JSON has no NaN: a failed or skipped measurement is written as null."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


# --- main ------------------------------------------------------------------------------------
def _median(v):
    v = [x for x in v if x == x]
    return float(np.median(v)) if v else float("nan")


def _fmt(v, f="{:.2f}"):
    return "n/a" if v is None or v != v else f.format(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of all variants (medians over rounds)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of a few steps")
    ap.add_argument("--no-mpi", action="store_true", help="skip the MPI variants and the ping-pong")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-python", default=None,
                    help="interpreter with torch for the PyTorch row (default: this one, if it has torch)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds before an mpiexec/torch run is ended")
    ap.add_argument("--mpi-worker", choices=("pipeline", "pingpong"), help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--groups", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=200, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mpi_worker == "pipeline":
        return mpi_pipeline_worker(args)
    if args.mpi_worker == "pingpong":
        return mpi_pingpong_worker(args)
    if args.torch_worker:
        return torch_worker(args)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.reps = 1, 6, 2, 20
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the steady-state rate needs two step times)")
    run_benchmark(args)


def run_benchmark(args):
    from bll_ref.parallel import blas_threads
    from common import RESULTS, gemm_gflops, machine, write
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with blas_threads(1):
        gf_before = gemm_gflops(repeats=3 if args.quick else 10)
    print(f"float32 1024^3 GEMM, 1 BLAS thread: {gf_before:.0f} GFLOP/s", flush=True)
    batches = make_batches(args.warmup + args.steps)
    setup = measure_setup(args, batches)
    variants, torch_python = choose_variants(args)
    per_round, errors = run_rounds(args, variants, batches, setup["groups"], torch_python)
    with blas_threads(1):
        gf_after = gemm_gflops(repeats=3 if args.quick else 10)
    load_end = os.getloadavg()
    res = {"machine": machine(),
           "gemm_gflops_1thread": {"before": gf_before, "after": gf_after, "mean": (gf_before + gf_after) / 2},
           "loadavg": {"start": list(load_start), "end": list(load_end)},
           "env_threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                          "NUMBA_NUM_THREADS")},
           "config": {"sizes": SIZES, "batch": N, "rounds": args.rounds, "steps": args.steps,
                      "warmup": args.warmup, "quick": args.quick, "torch_python": torch_python},
           **summarize(setup, variants, per_round), "errors": errors}
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, "parallel.png")
    plot(png, res)
    write("parallel", _nan_to_none(res), markdown(res))
    print(f"\nwrote {os.path.join(RESULTS, 'parallel.json')}, parallel.md, {png}")


def measure_setup(args, batches):
    """Block costs, the 2- and 4-worker assignments and the MPI message times (printed)."""
    from bll_ref.parallel import balanced_groups, describe
    costs = measure_blocks(batches, repeats=4 if args.quick else 10)
    labels = [f"block {k + 1} ({i}->{o})" for k, (i, o) in enumerate(zip(SIZES[:-1], SIZES[1:]))]
    for lab, c in zip(labels, costs):
        print(f"  {lab}: {1e3 * c:.2f} ms forward + update", flush=True)
    groups = {w: balanced_groups(costs, w) for w in (2, 4)}
    for w, g in groups.items():
        print(f"{w} workers: {describe(g, costs)}", flush=True)
    ping, msg_s, lat_s = None, float("nan"), float("nan")
    if not args.no_mpi and mpiexec():
        ping = run_pingpong(args.reps, args.timeout)
        if "error" in ping:
            print(f"ping-pong failed: {ping['error']}", flush=True)
        else:
            msg_s, lat_s = ping["activation"]["one_way_s"], ping["small_8B"]["one_way_s"]
            print(f"MPI message, 2 ranks, ping-pong median / 2: (128, 1024) float32 {1e6 * msg_s:.0f} us, "
                  f"8 bytes {1e6 * lat_s:.1f} us", flush=True)
    return {"costs": costs, "labels": labels, "groups": groups, "message": ping, "message_s": msg_s,
            "latency_s": lat_s, "describe": {w: describe(g, costs) for w, g in groups.items()}}


def choose_variants(args):
    torch_python = None
    if not args.no_torch:
        import importlib.util
        torch_python = args.torch_python or (sys.executable if importlib.util.find_spec("torch") else None)
    mpi = not args.no_mpi and mpiexec() is not None
    if not mpi:
        print("MPI variants skipped" + ("" if args.no_mpi else " (no mpiexec found; pip install 'bll_ref[mpi]')"))
    if not torch_python:
        print("PyTorch row skipped" + ("" if args.no_torch else " (torch not importable; see --torch-python)"))
    return ["seq", "threads"] + (["mpi2", "mpi4"] if mpi else []) + (["torch"] if torch_python else []), torch_python


def run_rounds(args, variants, batches, groups, torch_python):
    """{variant: [result of each round]}, {variant: first error}; a failed run counts as NaN."""
    per_round, errors = {v: [] for v in variants + ["block_costs"]}, {}
    for r in range(args.rounds):
        # the model's block costs are measured in every round too, so drift hits them alike
        per_round["block_costs"].append(measure_blocks(batches, repeats=2 if args.quick else 5))
        for v in variants:
            if v == "seq":
                res = run_sequential(batches, args.warmup)
            elif v == "threads":
                res = run_threads(batches, args.warmup, groups[2])
            elif v.startswith("mpi"):
                res = run_mpi(WORKERS[v], args.steps, args.warmup, groups[WORKERS[v]], args.timeout)
            else:
                res = run_torch(torch_python, args.steps, args.warmup, args.timeout)
            if "error" in res:
                errors.setdefault(v, res["error"])
                print(f"round {r + 1} {v}: FAILED\n{res['error']}", flush=True)
                res = {"steps_per_s": float("nan"), "steps_per_s_whole": float("nan")}
            else:
                print(f"round {r + 1} {v}: {res['steps_per_s']:.2f} steps/s "
                      f"(whole run {res['steps_per_s_whole']:.2f})", flush=True)
            per_round[v].append(res)
    return per_round, errors


def summarize(setup, variants, per_round):
    """Medians over rounds, the pipeline model's predictions and their errors, the deep model."""
    from bll_ref.parallel import pipeline_seconds_per_step
    groups, msg_s, lat_s = setup["groups"], setup["message_s"], setup["latency_s"]
    costs = [float(c) for c in np.median(per_round["block_costs"], axis=0)]  # per block, over rounds
    # every measurement trains a fresh model on the same batches: the losses must match in every round
    seq_losses = per_round["seq"][0].get("losses")
    exact = {v: all(res["losses"] == seq_losses for res in per_round[v] if "losses" in res)
             for v in variants if v != "torch" and any("losses" in res for res in per_round[v])}
    sps = {v: _median([res["steps_per_s"] for res in per_round[v]]) for v in variants}
    sps_whole = {v: _median([res["steps_per_s_whole"] for res in per_round[v]]) for v in variants}
    speedup = {v: _median([res["steps_per_s"] / base["steps_per_s"]
                           for res, base in zip(per_round[v], per_round["seq"])]) for v in variants}
    total, cores = sum(costs), os.cpu_count() or 1
    pred_step = {"seq": total, "threads": pipeline_seconds_per_step(costs, groups[2], 0.0)}  # queues pass references
    for v in ("mpi2", "mpi4"):
        if v in variants:
            pred_step[v] = pipeline_seconds_per_step(costs, groups[WORKERS[v]], msg_s)
    predicted = {v: total / s for v, s in pred_step.items()}
    # With more workers than cores, the cores set the pace: never faster than the total work over
    # the cores; and MPI ranks busy-poll while they wait (OpenMPI's progress loop spins), so each of
    # W ranks on C < W cores holds a core all the time and runs at C / W speed.
    def on_cores(v, s):
        w = WORKERS.get(v, 1)
        if v.startswith("mpi") and w > cores:
            s = (s - msg_s) * w / cores + msg_s
        return max(s, total / min(cores, w) + (msg_s if v.startswith("mpi") else 0.0))
    predicted_cores = {v: total / on_cores(v, s) for v, s in pred_step.items()}
    block_s = float(np.median(costs[1:-1]))  # the 1024x1024 hidden blocks
    latency = lat_s if lat_s == lat_s else 0.0
    return {
        "variants": variants, "block_seconds": dict(zip(setup["labels"], costs)),
        "block_seconds_before_rounds": dict(zip(setup["labels"], setup["costs"])),
        "block_seconds_per_round": per_round["block_costs"],
        "groups": {str(w): g for w, g in groups.items()},
        "assignment": {str(w): d for w, d in setup["describe"].items()},
        "message": setup["message"], "message_s": msg_s, "latency_s": lat_s,
        "steps_per_s": sps, "steps_per_s_whole": sps_whole, "speedup": speedup,
        "predicted_step_s": pred_step, "predicted_speedup": predicted,
        "error_pct": {v: 100 * (predicted[v] - speedup[v]) / speedup[v] for v in predicted},
        "cores": cores, "predicted_speedup_cores": predicted_cores,
        "error_pct_cores": {v: 100 * (predicted_cores[v] - speedup[v]) / speedup[v] for v in predicted},
        "losses_equal_sequential": exact,
        "per_round": {v: [{k: x for k, x in res.items() if k != "losses"} for res in per_round[v]] for v in variants},
        "deep_model": {
            "blocks": DEEP_BLOCKS, "block_s": block_s, "latency_s": latency, "activation_bytes": ACT_BYTES,
            "message_s": {f"{g} Gbit/s": link_message_s(g, latency) for g in LINKS_GBIT},
            "speedup": {f"{g} Gbit/s": deep_speedups(block_s, link_message_s(g, latency)) for g in LINKS_GBIT},
            "speedup_shared_memory": deep_speedups(block_s, msg_s) if msg_s == msg_s else None},
    }


NAMES = {"seq": "sequential (1 process)", "threads": "threads, 2 workers", "mpi2": "MPI, 2 ranks",
         "mpi4": "MPI, 4 ranks", "torch": "PyTorch BP, 2 threads"}


def markdown(res):
    v_all, cfg, gf, load = res["variants"], res["config"], res["gemm_gflops_1thread"], res["loadavg"]
    md = (f"BLL default recipe, MLP {'-'.join(map(str, SIZES))}, batch {N}, float32, 1 BLAS thread per worker; "
          f"median of {cfg['rounds']} interleaved rounds of {cfg['steps']} timed steps after {cfg['warmup']} "
          f"warm-up steps; {res['cores']} CPUs, 1-minute load average {load['start'][0]:.2f} at start, "
          f"{load['end'][0]:.2f} at end; float32 1024^3 GEMM {gf['mean']:.0f} GFLOP/s on 1 thread "
          f"(before {gf['before']:.0f}, after {gf['after']:.0f})\n\n"
          f"| variant | steps/s | steps/s whole run | speed-up vs sequential | predicted speed-up | error % | "
          f"predicted, {res['cores']} cores | error % | losses = sequential |\n|---|---|---|---|---|---|---|---|---|")
    for v in v_all:
        ex = res["losses_equal_sequential"].get(v)
        md += (f"\n| {NAMES[v]} | {_fmt(res['steps_per_s'][v])} | {_fmt(res['steps_per_s_whole'][v])} | "
               f"{_fmt(res['speedup'][v])} | {_fmt(res['predicted_speedup'].get(v))} | "
               f"{_fmt(res['error_pct'].get(v), '{:+.0f}')} | {_fmt(res['predicted_speedup_cores'].get(v))} | "
               f"{_fmt(res['error_pct_cores'].get(v), '{:+.0f}')} | "
               f"{'-' if ex is None else ('yes' if ex else 'NO')} |")
    if "torch" in v_all:
        ratio = _median([a["steps_per_s"] / b["steps_per_s"]
                         for a, b in zip(res["per_round"]["threads"], res["per_round"]["torch"])])
        md += f"\n\nour BLL on 2 worker threads / PyTorch BP on 2 threads, steps/s (median over rounds): {_fmt(ratio)}"
    md += ("\n\nsteps/s: steady state of the last stage, (n - 1) / (t_n - t_1); whole run: n / time from the "
           "start, pipeline fill and drain included. speed-up: median over rounds of variant / sequential in "
           "the same round. predicted: sum of block costs / (slowest group + one message; none for threads); "
           f"predicted, {res['cores']} cores: no faster than the sum of block costs over min(cores, workers), "
           "and W > cores busy-polling MPI ranks each run at cores / W speed; "
           "error = (predicted - measured) / measured. losses = sequential: the same losses bit for bit.")
    costs = res["block_seconds"]
    md += ("\n\nper-block cost (forward + update of each learner alone; median over rounds, each round's a "
           "median over repeated steps; the assignment below used the costs measured before the rounds):"
           "\n\n| block | ms |\n|---|---|\n"
           + "\n".join(f"| {lab} | {1e3 * c:.2f} |" for lab, c in costs.items())
           + f"\n| sum | {1e3 * sum(costs.values()):.2f} |")
    if res["steps_per_s"]["seq"] == res["steps_per_s"]["seq"]:
        ratio = sum(costs.values()) * res["steps_per_s"]["seq"]
        md += f"\n\nsum of block costs / measured sequential step: {ratio:.2f}"
    md += "\n\nassignment: " + "; ".join(f"{w} workers: {d}" for w, d in res["assignment"].items())
    if res["message_s"] == res["message_s"]:
        md += (f"\n\nMPI message between 2 ranks (shared memory), ping-pong median / 2: (128, 1024) float32 "
               f"{1e6 * res['message_s']:.0f} us, 8 bytes {1e6 * res['latency_s']:.1f} us")
    deep = res["deep_model"]
    cols = list(deep["speedup"]) + (["shared memory (measured message)"] if deep["speedup_shared_memory"] else [])
    md += (f"\n\npredicted speed-up of a {DEEP_BLOCKS}-block model, each block the measured 1024x1024 hidden "
           f"block ({1e3 * deep['block_s']:.2f} ms), one message per step = {1e6 * deep['latency_s']:.1f} us "
           f"latency (the measured 8-byte shared-memory latency; a network adds 1-50 us, small next to a "
           f"block) + {ACT_BYTES} bytes / link rate "
           + ", ".join(f"{k}: {1e3 * m:.3f} ms" for k, m in deep["message_s"].items())
           + ":\n\n| workers | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for w in DEEP_WORKERS:
        md += f"\n| {w} | " + " | ".join(f"{sp[w]:.1f}" for sp in deep["speedup"].values())
        md += (f" | {deep['speedup_shared_memory'][w]:.1f} |" if deep["speedup_shared_memory"] else " |")
    if res["errors"]:
        md += "\n\nfailed variants: " + "; ".join(f"{v}: {e.splitlines()[0]}" for v, e in res["errors"].items())
    return md


if __name__ == "__main__":
    main()
