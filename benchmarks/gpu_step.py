"""Training-step time on one GPU: our BLL and BP (CuPy + numba.cuda) beside PyTorch-GPU BP.

    python benchmarks/gpu_step.py [--out DIR] [--steps N] [--smoke]

* the benchmark MLP 784-1024-1024-1024-10 (float32, Adam 1e-3, random batches) at batch 128 and
  4096: BP, BLL (default recipe) on one stream, BLL with one CUDA stream per block; PyTorch BP
  with its default Adam and with fused Adam when torch is importable (same shapes, same device);
* the 4-block CNN (32-64-128) and ResNet-18 at width 64 (the paper's network) at batch 128: BLL and
  BP step time and the per-epoch time it implies for Fashion-MNIST (60,000 images: 469 steps),
  beside PyTorch BP's.

Every contender is timed the same way: warm-up steps, then ``--steps`` back-to-back steps with
the GPU synchronised before the first and after the last (wall clock / steps: throughput,
launch overhead included, as in training; our fit loop reads the loss back every ~1/10 epoch).
Contenders alternate in rounds (machine drift hits all alike); the median round is reported.
Writes gpu_step.json / .md; exit 2 without a usable GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bll_ref import backend, models  # noqa: E402
from bll_ref.methods import make  # noqa: E402

from common import machine, write  # noqa: E402
from step_time import SIZES as MLP  # noqa: E402  the benchmark MLP and the PyTorch twins of step_time.py
from step_time import torch_cnn, torch_mlp  # noqa: E402

EPOCH_STEPS = 469  # ceil(60000 / 128)


def ours(name, blocks, x, y, streams=None):
    """A step function of our method ``name`` on the GPU (x, y host batches)."""
    m = make(name, blocks, sample_input=x[:8], rng=0).to("cuda")
    if streams is not None:
        from bll_ref.parallel.streams import StreamSchedule
        sched = StreamSchedule(m, streams_per_block=streams)
        return lambda: sched.step(m, x, y)
    return lambda: m.train_step(x, y)


def torch_step(torch, net, x, y, fused):
    net = net.cuda()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():  # the host batch goes to the GPU each step, as ours does
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt.cuda(non_blocking=False)), yt.cuda())
        loss.backward()
        opt.step()
        return loss
    return step


def torch_resnet18(torch, width=64):
    nn = torch.nn
    torch.manual_seed(0)

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.sc = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.sc(x))

    layers = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [Basic(cin, cout, 1 if i == 0 else 2), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def timed_rounds(fns, steps, rounds, sync, warm_up=3):
    """{name: median seconds per step} over ``rounds`` alternating rounds of ``steps`` steps."""
    for f in fns.values():  # warm-up: compilation, cuBLAS handles, memory pools
        for _ in range(warm_up):
            f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                f()
            sync()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed round (default 50)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-convnets", action="store_true", help="only the MLP")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models, 1 step, 1 round: checks that the script runs (the tests run it on a "
                         "CuPy stand-in); its times mean nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 1, 1
    mlp = (784, 16, 16, 16, 10) if args.smoke else MLP
    batches, image_batch = ((4, 8), 2) if args.smoke else ((128, 4096), 128)
    try:
        cp = backend.require_cuda()
    except backend.DeviceError as e:
        print(f"gpu_step: {e}", file=sys.stderr)
        return 2
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None

    def sync():
        cp.cuda.runtime.deviceSynchronize()

    rng = np.random.default_rng(0)
    rows, payload = [], {"machine": machine(), "device": backend.device_info(), "steps": args.steps,
                         "rounds": args.rounds, "results": []}

    def run(label, fns, batch, epoch_steps=None):
        steps = args.steps if epoch_steps is None or args.smoke else max(10, args.steps // 5)
        t = timed_rounds(fns, steps, args.rounds, sync, warm_up=1 if args.smoke else 3)
        for k, sec in t.items():
            r = {"model": label, "batch": batch, "contender": k, "ms_per_step": 1e3 * sec,
                 "samples_per_s": batch / sec}
            if epoch_steps:
                r["epoch_s"] = sec * epoch_steps
            payload["results"].append(r)
            epoch = f"{r['epoch_s']:.1f}" if epoch_steps else ""
            rows.append(f"| {label} | {batch} | {k} | {1e3 * sec:.3f} | {batch / sec:,.0f} | {epoch} |")
            print(rows[-1], flush=True)

    for batch in batches:
        x = rng.random((batch, 784), np.float32)
        y = rng.integers(0, 10, batch)
        fns = {"BP (ours)": ours("bp", models.mlp(mlp, rng=0), x, y),
               "BLL (ours), sequential": ours("bll", models.mlp(mlp, rng=0), x, y),
               "BLL (ours), one stream": ours("bll", models.mlp(mlp, rng=0), x, y, streams=False),
               "BLL (ours), stream per block": ours("bll", models.mlp(mlp, rng=0), x, y, streams=True)}
        if torch is not None:
            fns["PyTorch BP, Adam"] = torch_step(torch, torch_mlp(torch, mlp), x, y, fused=False)
            fns["PyTorch BP, fused Adam"] = torch_step(torch, torch_mlp(torch, mlp), x, y, fused=True)
        run("MLP " + "-".join(map(str, mlp)), fns, batch)
    if not args.no_convnets:
        x = rng.random((image_batch, 1, 28, 28), np.float32)
        y = rng.integers(0, 10, image_batch)
        channels, width = ((4, 4, 4), 1) if args.smoke else ((32, 64, 128), 64)
        for label, build, tnet in (("CNN " + "-".join(map(str, channels)), lambda: models.cnn(channels=channels, rng=0),
                                    lambda torch: torch_cnn(torch, channels)),
                                   (f"ResNet-18 width {width}", lambda: models.resnet18(width=width, rng=0),
                                    lambda torch: torch_resnet18(torch, width))):
            fns = {"BP (ours)": ours("bp", build(), x, y), "BLL (ours), sequential": ours("bll", build(), x, y),
                   "BLL (ours), stream per block": ours("bll", build(), x, y, streams=True)}
            if torch is not None:
                fns["PyTorch BP, fused Adam"] = torch_step(torch, tnet(torch), x, y, fused=True)
            run(label, fns, image_batch, EPOCH_STEPS)
    table = ["| model | batch | contender | ms / step | samples / s | epoch s (469 steps) |",
             "|---|---|---|---|---|---|", *rows]
    write("gpu_step", payload, "\n".join(table), out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
