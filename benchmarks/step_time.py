"""Step time of one training step at batch 128 for the MLP 784-1024-1024-1024-10 (4 blocks):
BP, FA and BLL (default recipe and variants) interleaved in one run, with the machine's float32
GEMM rate measured in the same run and the fraction of the GEMM roofline each step reaches.
If torch is importable, PyTorch's BP step for the same model is timed interleaved with ours.

    OPENBLAS_NUM_THREADS=1 python benchmarks/step_time.py [--repeats 40] [--no-torch]

On a 2-core machine that other work shares, multi-threaded BLAS collapses (one GEMM waits for a
descheduled thread: 5-6x slower steps were measured); single-threaded BLAS gives stable numbers.
The thread settings are recorded in the JSON.

Writes benchmarks/results/step_time.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_gflops, interleaved, machine, write  # noqa: E402

from bll_ref import models  # noqa: E402
from bll_ref.methods import make  # noqa: E402

SIZES = (784, 1024, 1024, 1024, 10)
N = 128


def flops(sizes, n, skip_dx_blocks):
    """Forward + weight grads + input grads (input grads skipped where noted) in FLOP."""
    mm = [2 * n * i * o for i, o in zip(sizes[:-1], sizes[1:])]
    dx = [0 if k in skip_dx_blocks else f for k, f in enumerate(mm)]
    return sum(mm) * 2 + sum(dx)


def torch_step(x, y):
    import torch
    # same thread count as our BLAS (OPENBLAS_NUM_THREADS), so the comparison is like for like
    torch.set_num_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count())))
    torch.manual_seed(0)
    layers = []
    for i, o in zip(SIZES[:-2], SIZES[1:-1]):
        layers += [torch.nn.Linear(i, o), torch.nn.LeakyReLU(0.01)]
    layers.append(torch.nn.Linear(SIZES[-2], SIZES[-1]))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, SIZES[0])).astype(np.float32)
    y = rng.integers(0, 10, N)
    variants = {"bp": ("bp", {}), "fa": ("fa", {}), "bll_default": ("bll", {}),
                "bll_head_only": ("bll", {"variational": "none"}),
                "bll_eq8_trained": ("bll", {"variational": "eq8", "feedback": "trained", "tau": 0.5, "head": False})}
    methods = {k: make(kind, models.mlp(SIZES, rng=0), sample_input=x, **opts) for k, (kind, opts) in variants.items()}
    fns = {k: (lambda m=m: m.train_step(x, y)) for k, m in methods.items()}
    # the closed-form feedback solves of one BLL step (3 hidden blocks, 128 x 1024 each)
    from bll_ref.data import one_hot
    from bll_ref.feedback import LinearFeedback
    Y = one_hot(y, 10)
    A = rng.standard_normal((N, 1024)).astype(np.float32)
    fbs = [LinearFeedback(10, 1024) for _ in range(3)]
    fns["feedback_solves_x3"] = lambda: [f.fit(Y, A).predict(Y) for f in fbs]
    if not args.no_torch:
        try:
            fns["torch_bp"] = torch_step(x, y)
        except ImportError:
            pass
    gf_before = gemm_gflops()
    med, _ = interleaved(fns, repeats=args.repeats)
    gf_after = gemm_gflops()
    gf = (gf_before + gf_after) / 2
    fl = {"bp": flops(SIZES, N, {0}), "fa": flops(SIZES, N, {0}), "torch_bp": flops(SIZES, N, {0})}
    for k in methods:
        fl.setdefault(k, flops(SIZES, N, {0, 1, 2, 3}))
    fl["feedback_solves_x3"] = 3 * 2 * (2 * N * 10 * 1024)
    rows = ["| step | ms | ratio to our BP | GFLOP | fraction of GEMM roofline |", "|---|---|---|---|---|"]
    for k, t in med.items():
        rows.append(f"| {k} | {1e3 * t:.2f} | {t / med['bp']:.2f} | {fl[k] / 1e9:.2f} | "
                    f"{fl[k] / t / 1e9 / gf:.2f} |")
    table = (f"MLP {'-'.join(map(str, SIZES))}, batch {N}, float32, median of {args.repeats} interleaved "
             f"steps; float32 1024^3 GEMM {gf:.0f} GFLOP/s (before {gf_before:.0f}, after {gf_after:.0f})\n\n"
             + "\n".join(rows))
    table += (f"\n\nclosed-form feedback solves (3 blocks) / BLL default step: "
              f"{100 * med['feedback_solves_x3'] / med['bll_default']:.1f} %"
              f"\nBLL default step / BP step: {med['bll_default'] / med['bp']:.2f}")
    if "torch_bp" in med:
        table += f"\n\nour BP / PyTorch BP step time: {med['bp'] / med['torch_bp']:.2f}"
    threads = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    table += f"\n\nthread settings: {threads}"
    write("step_time", {"machine": machine(), "threads": threads, "gemm_gflops": gf, "median_s": med, "flop": fl},
          table)


if __name__ == "__main__":
    main()
