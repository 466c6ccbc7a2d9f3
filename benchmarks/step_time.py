"""Training-step time against PyTorch-CPU and against this machine's limits, one thread each.

Three sections, each timed round-robin in one run (these machines drift 2x, so only ratios
measured side by side are reported):

- mlp: one step at batch 128 of the MLP 784-1024-1024-1024-10 (4 blocks): our BP, FA and BLL
  (default recipe and variants) and, where torch is importable, PyTorch's BP step with its default
  Adam and with ``Adam(fused=True)``; then a per-phase table (forward GEMMs, backward GEMMs,
  element-wise, local losses, feedback solves, optimiser, other) for BP and the BLL default step,
  each phase against its own limit measured in the same run (GEMM rate, in-place update bandwidth);
- conv: one Conv2d forward + backward, batch 128, 32 -> 64 channels, 14x14, 3x3, padding 1: the
  default (Winograd at this shape) and the im2col path;
- cnn: one BP step and one BLL step of ``models.cnn()`` (3 conv blocks 32-64-128 + linear) at
  batch 128 on 28x28 inputs, against PyTorch's BP step of the same network.

    OPENBLAS_NUM_THREADS=1 python benchmarks/step_time.py [--repeats 30] [--sections mlp,conv,cnn]
        [--torch-site DIR ...]   # directories that hold torch, appended to sys.path, if it is not importable
        [--name NAME]            # results/NAME.{json,md} instead of results/step_time.{json,md}

On a 2-core machine that other work shares, multi-threaded BLAS collapses (one GEMM waits for a
descheduled thread); single-threaded BLAS gives stable numbers. torch gets the same thread count.
Writes benchmarks/results/step_time.{json,md} (or NAME.{json,md} with --name).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_gflops, interleaved, interleaved_bursts, machine, write  # noqa: E402
from phases import MEMORY_ELEMENTS, PHASES, phase_table, update_bandwidth  # noqa: E402
from torch_ddp import build_net as torch_mlp  # noqa: E402 (the MLP of SIZES, seed 0)

from bll_ref import models  # noqa: E402
from bll_ref.layers import Conv2d  # noqa: E402
from bll_ref.methods import make  # noqa: E402

SIZES = (784, 1024, 1024, 1024, 10)
N = 128
POOL = 16  # distinct random batches per contender (see batches())
BURST = 4  # steps per contender per round: 1 cold (after another contender) + 3 warm (see interleaved_bursts)
CONV = dict(n=128, cin=32, cout=64, size=14, k=3, padding=1)


def mlp_flops(sizes, n, skip_dx_blocks):
    """Forward + weight grads + input grads (input grads skipped where noted) in FLOP."""
    mm = [2 * n * i * o for i, o in zip(sizes[:-1], sizes[1:])]
    dx = [0 if k in skip_dx_blocks else f for k, f in enumerate(mm)]
    return sum(mm) * 2 + sum(dx)


def gemm_time_at_shapes(sizes, n, skip_dx_blocks, repeats=20, copies=4):
    """Seconds the step's own GEMMs take alone: per layer x @ W, x.T @ dy and (unless skipped)
    dy @ W.T at batch n, each timed over ``copies`` distinct operand sets in turn (so a weight is
    not reused from cache, as in a step), median, summed. The roofline of the issue: FLOPs at the
    rate BLAS reaches for these shapes (M = 128 runs below the 1024^3 rate)."""
    rng = np.random.default_rng(1)
    total = 0.0
    for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        ops = [(rng.standard_normal((n, i)).astype(np.float32), rng.standard_normal((i, o)).astype(np.float32),
                rng.standard_normal((n, o)).astype(np.float32)) for _ in range(copies)]
        calls = [lambda x, W, dy: x @ W, lambda x, W, dy: x.T @ dy]
        if k not in skip_dx_blocks:
            calls.append(lambda x, W, dy: dy @ W.T)
        for call in calls:
            med, _ = interleaved({j: (lambda a=a: call(*a)) for j, a in enumerate(ops)}, repeats=repeats)
            total += float(np.median(list(med.values())))
    return total


def torch_optimizer_ms(torch, pool, fused, steps=30):
    """Median ms of PyTorch's Adam ``step()`` inside its own MLP training loop (same model)."""
    times = []
    step = _torch_step(torch, torch_mlp(torch), pool, fused, opt_times=times)
    for _ in range(steps + 3):
        step()
    return 1e3 * float(np.median(times[3:]))


def _threads():
    return int(os.environ.get("OPENBLAS_NUM_THREADS", "1"))


def import_torch(site_dirs):
    try:
        import torch
    except ImportError:
        sys.path.extend(site_dirs or [])
        try:
            import torch
        except ImportError:
            return None
    torch.set_num_threads(_threads())  # same thread count as our BLAS: like for like
    return torch


def torch_mlp_step(torch, pool, fused):
    return _torch_step(torch, torch_mlp(torch), pool, fused)


def torch_cnn(torch, channels=(32, 64, 128), size=28):
    layers, c, s = [], 1, size
    for co in channels:
        layers += [torch.nn.Conv2d(c, co, 3, padding=1), torch.nn.BatchNorm2d(co), torch.nn.MaxPool2d(2),
                   torch.nn.ReLU()]
        c, s = co, s // 2
    layers += [torch.nn.Flatten(), torch.nn.Linear(c * s * s, 10)]
    return torch.nn.Sequential(*layers)


def batches(shape, n=POOL, seed=0):
    """A pool of random batches with random labels, cycled through by every contender alike.
    Repeating one batch lets BP fit it: the loss gradient then underflows into float32
    denormals, whose arithmetic is microcode-slow (a 4x slower BP step was measured)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((N, *shape)).astype(np.float32), rng.integers(0, 10, N)) for _ in range(n)]


def cycling(step, pool):
    """A no-argument callable running step(x, y) on the pool's next batch."""
    state = {"i": 0}

    def run():
        x, y = pool[state["i"] % len(pool)]
        state["i"] += 1
        return step(x, y)
    return run


def _torch_step(torch, net, pool, fused, opt_times=None):
    """A no-argument PyTorch training step cycling through the pool; with ``opt_times`` (a list)
    the seconds of each ``opt.step()`` are appended to it."""
    opt = torch.optim.Adam(net.parameters(), 1e-3, fused=fused or None)
    tpool = [(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))) for x, y in pool]

    def step(xt, yt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        t = time.perf_counter()
        opt.step()
        if opt_times is not None:
            opt_times.append(time.perf_counter() - t)
    return cycling(step, tpool)


def section_mlp(args, torch, gf, bw, bw_mem):
    pool = batches((SIZES[0],))
    x = pool[0][0]
    variants = {"bp": ("bp", {}), "fa": ("fa", {}), "bll_default": ("bll", {}),
                "bll_head_only": ("bll", {"variational": "none"}),
                "bll_eq8_trained": ("bll", {"variational": "eq8", "feedback": "trained", "tau": 0.5, "head": False})}
    methods = {k: make(kind, models.mlp(SIZES, rng=0), sample_input=x, **opts) for k, (kind, opts) in variants.items()}
    fns = {k: cycling(m.train_step, pool) for k, m in methods.items()}
    if torch is not None:
        fns["torch_bp"] = torch_mlp_step(torch, pool, fused=False)
        fns["torch_bp_fused_adam"] = torch_mlp_step(torch, pool, fused=True)
    med, cold = interleaved_bursts(fns, repeats=args.repeats, burst=BURST)
    fl = {k: mlp_flops(SIZES, N, {0}) for k in ("bp", "fa", "torch_bp", "torch_bp_fused_adam")}
    for k in methods:
        fl.setdefault(k, mlp_flops(SIZES, N, {0, 1, 2, 3}))  # BLL: no input gradient at any block
    gemm_s = {"bp": gemm_time_at_shapes(SIZES, N, {0}), "bll": gemm_time_at_shapes(SIZES, N, {0, 1, 2, 3})}
    rows = ["| step | ms | ms after another contender | ratio to our BP | ratio to PyTorch BP | GFLOP | "
            "fraction of GEMM roofline (1024^3 rate) | fraction of GEMM roofline (its GEMMs alone) |",
            "|---|---|---|---|---|---|---|---|"]
    for k, t in med.items():
        vs_torch = f"{t / med['torch_bp']:.2f}" if "torch_bp" in med else "-"
        alone = gemm_s["bll" if k.startswith("bll") else "bp"]
        rows.append(f"| {k} | {1e3 * t:.2f} | {1e3 * cold[k]:.2f} | {t / med['bp']:.2f} | {vs_torch} | "
                    f"{fl[k] / 1e9:.2f} | {fl[k] / t / gf:.2f} | {alone / t:.2f} |")
    phases = {}
    bws = dict.fromkeys(PHASES, bw)
    bws["optimiser"] = bw_mem
    for k in ("bp", "bll_default"):
        total, table, by_name = phase_table(fns[k], args.repeats, gf, bws)
        phases[k] = {"total_ms": 1e3 * total, "phases": table, "by_call_ms": by_name}
    md = [f"### MLP {'-'.join(map(str, SIZES))}, batch {N}, float32, median of {args.repeats} rounds",
          "",
          f"Each round runs every contender {BURST} steps in a row: \"ms\" is the median of the steps that "
          "follow a step of the same model (as in training); \"after another contender\" is the first "
          "step of each burst, whose weights and optimiser state the other contenders' steps evicted "
          f"from cache. GEMMs alone: the step's own GEMM shapes timed by themselves, {1e3 * gemm_s['bp']:.1f} ms "
          f"for BP/FA, {1e3 * gemm_s['bll']:.1f} ms for BLL (no input gradients).", "", *rows, ""]
    for k, ph in phases.items():
        md += [f"Phases of the {k} step ({ph['total_ms']:.1f} ms under the phase clock; limits: GEMM "
               f"{gf / 1e9:.0f} GFLOP/s, element-wise and losses at the cache bandwidth {bw / 1e9:.1f} GB/s, "
               f"optimiser at the memory bandwidth {bw_mem / 1e9:.1f} GB/s):", "",
               "| phase | ms | share | limit ms | fraction of limit |", "|---|---|---|---|---|"]
        for name in PHASES:
            r = ph["phases"][name]
            frac = f"{r['fraction']:.2f}" if r["fraction"] else "-"
            md.append(f"| {name} | {r['ms']:.2f} | {100 * r['ms'] / ph['total_ms']:.0f} % | "
                      f"{r['limit_ms']:.2f} | {frac} |")
        md.append("")
    opt = phases["bll_default"]["phases"]["optimiser"]
    summary = {"bll_over_bp": med["bll_default"] / med["bp"],
               "bll_gemm_roofline_1024": fl["bll_default"] / med["bll_default"] / gf,
               "bll_gemm_roofline_own_shapes": gemm_s["bll"] / med["bll_default"],
               "optimiser_share_of_bll": opt["ms"] / phases["bll_default"]["total_ms"],
               "optimiser_fraction_of_memory_bandwidth": opt["fraction"],
               "optimiser_fraction_of_cache_bandwidth": opt["mbytes"] * 1e6 / bw / (opt["ms"] / 1e3)}
    if "torch_bp" in med:
        summary.update({"bp_over_torch_bp": med["bp"] / med["torch_bp"],
                        "bll_over_torch_bp": med["bll_default"] / med["torch_bp"],
                        "bp_over_torch_bp_fused_adam": med["bp"] / med["torch_bp_fused_adam"],
                        "bll_over_torch_bp_fused_adam": med["bll_default"] / med["torch_bp_fused_adam"],
                        "bp_over_torch_bp_cold": cold["bp"] / cold["torch_bp"],
                        "bll_over_torch_bp_cold": cold["bll_default"] / cold["torch_bp"],
                        "torch_adam_step_ms": torch_optimizer_ms(torch, pool, fused=False),
                        "torch_fused_adam_step_ms": torch_optimizer_ms(torch, pool, fused=True)})
    md += [f"- {k}: {v:.2f}" for k, v in summary.items()]
    return {"median_s": med, "cold_median_s": cold, "flop": fl, "gemm_alone_s": gemm_s, "phases": phases,
            "summary": summary}, "\n".join(md)


def section_conv(args, torch, gf):
    c = CONV
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c["n"], c["cin"], c["size"], c["size"])).astype(np.float32)
    dy = rng.standard_normal((c["n"], c["cout"], c["size"], c["size"])).astype(np.float32)

    def step(layer):
        def run():
            layer.forward(x)
            layer.backward(dy)
        return run
    # "ours": the default (algorithm="auto", Winograd at this shape); the im2col path beside it
    auto = Conv2d(c["cin"], c["cout"], c["k"], padding=c["padding"], rng=0)
    fns = {"ours": step(auto),
           "ours_im2col": step(Conv2d(c["cin"], c["cout"], c["k"], padding=c["padding"], algorithm="im2col", rng=0))}
    if torch is not None:
        tl = torch.nn.Conv2d(c["cin"], c["cout"], c["k"], padding=c["padding"])
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def theirs():
            xt.grad = None
            tl.zero_grad()
            tl(xt).backward(dyt)
        fns["torch"] = theirs
    med, cold = interleaved_bursts(fns, repeats=args.repeats, burst=BURST)
    flop = 3 * 2 * c["n"] * c["size"] ** 2 * c["cout"] * c["cin"] * c["k"] ** 2  # fwd, dW, dx
    md = [f"### Conv2d forward + backward: batch {c['n']}, {c['cin']} -> {c['cout']} channels, "
          f"{c['size']}x{c['size']}, {c['k']}x{c['k']}, padding {c['padding']}", "",
          f"\"ours\" is Conv2d's default (algorithm=\"auto\": {'Winograd F(2x2, 3x3)' if auto.winograd else 'im2col'} "
          "here); GFLOP/s count the direct convolution's multiply-adds for every contender.", "",
          "| | ms | ms after another contender | GFLOP/s | fraction of GEMM rate |", "|---|---|---|---|---|"]
    for k, t in med.items():
        md.append(f"| {k} | {1e3 * t:.2f} | {1e3 * cold[k]:.2f} | {flop / t / 1e9:.0f} | {flop / t / gf:.2f} |")
    summary = {"winograd_over_im2col": med["ours"] / med["ours_im2col"]}
    if "torch" in med:
        summary.update({"conv_over_torch": med["ours"] / med["torch"], "conv_over_torch_cold": cold["ours"] / cold["torch"],
                        "conv_im2col_over_torch": med["ours_im2col"] / med["torch"]})
    md += [f"- {k}: {v:.2f}" for k, v in summary.items()]
    return {"median_s": med, "cold_median_s": cold, "flop": flop, "summary": summary}, "\n".join(md)


def section_cnn(args, torch):
    pool = batches((1, 28, 28))
    ours = {k: make(k, models.cnn(rng=0), sample_input=pool[0][0]) for k in ("bp", "bll")}
    fns = {f"ours_{k}": cycling(m.train_step, pool) for k, m in ours.items()}
    if torch is not None:
        torch.manual_seed(0)
        fns["torch_bp"] = _torch_step(torch, torch_cnn(torch), pool, fused=False)
    med, cold = interleaved_bursts(fns, repeats=args.repeats, burst=BURST)
    md = [f"### CNN step (models.cnn(): conv 32-64-128 + BN + maxpool + ReLU, linear), batch {N}, 28x28", "",
          "| step | ms | ms after another contender | ratio to PyTorch BP |", "|---|---|---|---|"]
    for k, t in med.items():
        ratio = f"{t / med['torch_bp']:.2f}" if "torch_bp" in med else "-"
        md.append(f"| {k} | {1e3 * t:.2f} | {1e3 * cold[k]:.2f} | {ratio} |")
    summary = ({"cnn_bp_over_torch_bp": med["ours_bp"] / med["torch_bp"],
                "cnn_bll_over_torch_bp": med["ours_bll"] / med["torch_bp"],
                "cnn_bp_over_torch_bp_cold": cold["ours_bp"] / cold["torch_bp"],
                "cnn_bll_over_torch_bp_cold": cold["ours_bll"] / cold["torch_bp"]} if "torch_bp" in med else {})
    md += [f"- {k}: {v:.2f}" for k, v in summary.items()]
    return {"median_s": med, "cold_median_s": cold, "summary": summary}, "\n".join(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds per section (default 30)")
    ap.add_argument("--sections", default="mlp,conv,cnn", help="comma-separated subset of mlp,conv,cnn")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--torch-site", nargs="*", default=[],
                    help="directories appended to sys.path to find torch (e.g. another venv's site-packages)")
    ap.add_argument("--name", default="step_time",
                    help="results/NAME.{json,md} (default %(default)s; another name keeps the stored table)")
    args = ap.parse_args()
    if not args.name.replace("_", "").replace("-", "").isalnum():
        ap.error(f"--name must be letters, digits, - or _, got {args.name!r}")
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - {"mlp", "conv", "cnn"})
    if unknown or args.repeats < 1:
        ap.error(f"unknown sections {unknown}" if unknown else "--repeats must be >= 1")
    torch = None if args.no_torch else import_torch(args.torch_site)
    gf_before, bw = gemm_gflops() * 1e9, update_bandwidth()
    bw_mem = update_bandwidth(MEMORY_ELEMENTS, repeats=10)
    payload = {"machine": machine(), "torch": getattr(torch, "__version__", None)}
    parts = []
    if "mlp" in sections:
        payload["mlp"], md = section_mlp(args, torch, gf_before, bw, bw_mem)
        parts.append(md)
    if "conv" in sections:
        payload["conv"], md = section_conv(args, torch, gf_before)
        parts.append(md)
    if "cnn" in sections:
        payload["cnn"], md = section_cnn(args, torch)
        parts.append(md)
    gf_after = gemm_gflops() * 1e9
    threads = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    payload.update({"threads": threads, "gemm_gflops_before": gf_before / 1e9, "gemm_gflops_after": gf_after / 1e9,
                    "update_bandwidth_gb_s": bw / 1e9, "memory_bandwidth_gb_s": bw_mem / 1e9})
    head = (f"float32 1024^3 GEMM {gf_before / 1e9:.0f} GFLOP/s before, {gf_after / 1e9:.0f} after; "
            f"in-place update a += s*b {bw / 1e9:.1f} GB/s on 4 MB arrays (cache), {bw_mem / 1e9:.1f} GB/s on "
            f"64 MB arrays (memory); torch {payload['torch'] or 'not importable'}; "
            f"threads {threads}")
    write(args.name, payload, head + "\n\n" + "\n\n".join(parts))


if __name__ == "__main__":
    main()
