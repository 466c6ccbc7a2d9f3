"""GPU acceptance check: the CuPy + numba.cuda path against the NumPy reference, on a real GPU.

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--smoke]

1. every layer's forward, input gradient and parameter gradients on the GPU against the same
   layer on the CPU (this runs every numba.cuda layer kernel against its Numba twin through the
   layer that calls it), float32 and float64, odd shapes; the sequence layers (Embedding,
   PositionalEncoding, SelfAttention) and Upsample2d included;
2. every local-loss kernel and the GPU softmax cross-entropy against the NumPy reference, incl.
   saturating inputs (|x| ~ 1e3); the Adam / SGD kernels against their NumPy twins;
3. run-to-run determinism: two 20-step BLL runs on the GPU end with bit-identical weights (one
   stream and one stream per block);
4. 20 steps of BLL, BP and FA on the GPU against the CPU from the same initial weights and
   batches: per-step losses within 1e-4 relative (float32) and 1e-9 (float64), the trained
   weights within 1e-3 / 1e-6; then, in float64, the BLL variants (Eq. 8, Bernoulli KL, no
   term, plain Gaussian, span 2), Pred-Sim (MLP, and CNN with std pooling), a transformer on
   token ids (BLL and BP), the CNN and ResNet-18;
5. (without --quick) 2 epochs of the MLP 784-1024-1024-1024-10 on Fashion-MNIST on the GPU and on
   the CPU, same seed: test accuracy within 0.5 points.

Writes gpu_check.json / .md (to --out, default benchmarks/results/) and prints a table last.
Exit 0 all checks pass, 1 a check failed, 2 no usable GPU (one line naming what is missing).
Finishes in well under 5 minutes on one H200 (the CPU half of check 5 dominates).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bll_ref import backend, models  # noqa: E402
from bll_ref import layers as L  # noqa: E402
from bll_ref.losses import local, output  # noqa: E402
from bll_ref.methods import make  # noqa: E402
from bll_ref.loop import fit  # noqa: E402
from bll_ref.optim import SGD, Adam  # noqa: E402

from common import machine, write  # noqa: E402

RESULTS = []  # (check, detail, worst error, limit, ok)


def record(check, detail, err, limit):
    ok = bool(np.isfinite(err) and err <= limit)
    RESULTS.append({"check": check, "detail": detail, "error": float(err), "limit": float(limit), "ok": ok})
    return ok


def rel(a, b):
    """max |a - b| / max(max |b|, tiny): one number per comparison."""
    a, b = np.asarray(backend.asnumpy(a), np.float64), np.asarray(backend.asnumpy(b), np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


TOL = {np.float32: 2e-5, np.float64: 1e-11}


# ---------------------------------------------------------------------------------------- layers
def _layer_cases(dt):
    r = 7
    return [
        ("Dense 37->29", L.Dense(37, 29, rng=r, dtype=dt), (5, 37)),
        ("ReLU", L.ReLU(), (7, 33)),
        ("LeakyReLU", L.LeakyReLU(0.01), (3, 5, 7, 9)),
        ("Sigmoid", L.Sigmoid(), (6, 31)),
        ("Tanh", L.Tanh(), (6, 31)),
        ("Flatten", L.Flatten(), (3, 4, 5, 5)),
        ("LayerNorm affine", L.LayerNorm(37, dtype=dt), (9, 37)),
        ("LayerNorm no affine", L.LayerNorm(1000, affine=False, dtype=dt), (5, 1000)),
        ("BatchNorm (N,C)", L.BatchNorm(13, dtype=dt), (11, 13)),
        ("BatchNorm NCHW", L.BatchNorm(5, dtype=dt), (3, 5, 7, 9)),
        ("Conv2d 3x3 s1 p1", L.Conv2d(3, 5, 3, padding=1, rng=r, dtype=dt), (2, 3, 9, 7)),
        ("Conv2d 3x3 s2 p1", L.Conv2d(4, 6, 3, stride=2, padding=1, rng=r, dtype=dt), (3, 4, 11, 10)),
        ("Conv2d 1x1 s2", L.Conv2d(5, 7, 1, stride=2, bias=False, rng=r, dtype=dt), (2, 5, 9, 9)),
        ("Conv2d 3x3 16->16 (Winograd on CPU)", L.Conv2d(16, 16, 3, padding=1, rng=r, dtype=dt), (2, 16, 8, 8)),
        ("MaxPool2d 2", L.MaxPool2d(2), (3, 5, 9, 8)),
        ("MaxPool2d 3 s2", L.MaxPool2d(3, stride=2), (2, 3, 11, 9)),
        ("AvgPool2d 2", L.AvgPool2d(2), (3, 5, 8, 8)),
        ("Residual (ResNet basic block)", models._basic_block(4, 8, 2, 3, dt), (2, 4, 10, 10)),
        ("Upsample2d 2", L.Upsample2d(2), (2, 3, 5, 4)),
        ("PositionalEncoding fixed", L.PositionalEncoding(9, 12, dtype=dt), (3, 7, 12)),
        ("PositionalEncoding learned", L.PositionalEncoding(9, 12, learned=True, rng=r, dtype=dt), (3, 9, 12)),
        ("SelfAttention", L.SelfAttention(12, rng=r, dtype=dt), (3, 7, 12)),
        ("SelfAttention causal", L.SelfAttention(12, causal=True, rng=r, dtype=dt), (3, 7, 12)),
    ]


def check_layers(cp):
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for name, layer, shape in _layer_cases(dt):
            x = (rng.standard_normal(shape) * 3).astype(dt)
            gpu = copy.deepcopy(layer).to("cuda")
            y_c = layer.forward(x, train=True)
            y_g = gpu.forward(cp.asarray(x), train=True)
            dy = rng.standard_normal(y_c.shape).astype(dt)
            dx_c = layer.backward(dy)
            dx_g = gpu.backward(cp.asarray(dy))
            err = max([rel(y_g, y_c), rel(dx_g, dx_c)] +
                      [rel(gpu.grads[k], layer.grads[k]) for k in layer.grads])
            if layer.buffers:
                err = max([err] + [rel(gpu.buffers[k], layer.buffers[k]) for k in layer.buffers])
            y_e = gpu.forward(cp.asarray(x), train=False)
            err = max(err, rel(y_e, layer.forward(x, train=False)))
            record("layer vs CPU", f"{name} {np.dtype(dt).name}", err, TOL[dt] * 10)
        # token ids in (integers: no dx); repeated ids, so the GPU's one-hot gradient adds them up
        layer = L.Embedding(11, 12, rng=7, dtype=dt)
        gpu = copy.deepcopy(layer).to("cuda")
        ids = rng.integers(0, 11, (5, 9))
        y_c, y_g = layer.forward(ids), gpu.forward(cp.asarray(ids))
        dy = rng.standard_normal(y_c.shape).astype(dt)
        layer.backward(dy)
        gpu.backward(cp.asarray(dy))
        record("layer vs CPU", f"Embedding {np.dtype(dt).name}",
               max(rel(y_g, y_c), rel(gpu.grads["E"], layer.grads["E"])), TOL[dt] * 10)


# ---------------------------------------------------------------------------------------- losses
def check_losses(cp, shapes=((128, 1024), (7, 333))):
    from bll_ref.losses import cuda as cl
    rng = np.random.default_rng(1)
    for dt in (np.float32, np.float64):
        for scale in (1.0, 1e3):
            for shape in shapes:
                a = (rng.standard_normal(shape) * scale).astype(dt)
                b = (rng.standard_normal(shape) * scale).astype(dt)
                tag = f"{shape} {np.dtype(dt).name} |x|~{scale:g}"
                ref = local.bernoulli_eq8(a, b, 0.5)
                got = cl.bernoulli_eq8(cp.asarray(a), cp.asarray(b), 0.5)
                record("Eq. 8 kernel vs NumPy", tag, max(rel(g, r) for g, r in zip(got, ref)), TOL[dt] * 10)
                for fam in ("gaussian", "bernoulli"):
                    ref = local.kl_ef_gradients(fam, a, b)
                    got = cl.kl_ef_gradients(fam, cp.asarray(a), cp.asarray(b))
                    record(f"{fam} KL kernel vs NumPy", tag, max(rel(g, r) for g, r in zip(got, ref)), TOL[dt] * 10)
        logits = (rng.standard_normal((129, 10)) * 30).astype(dt)
        y = rng.integers(0, 10, 129)
        ref = output.softmax_cross_entropy(logits, y)
        got = output.softmax_cross_entropy(cp.asarray(logits), y)
        record("softmax CE vs NumPy", np.dtype(dt).name, max(rel(g, r) for g, r in zip(got, ref)), TOL[dt] * 10)


def check_optimisers(cp, size=(300, 257)):
    rng = np.random.default_rng(2)
    for dt in (np.float32, np.float64):
        for name, make_opt in (("Adam", lambda l: Adam(l, lr=1e-2, weight_decay=1e-3)),
                               ("SGD momentum", lambda l: SGD(l, lr=1e-2, momentum=0.9, weight_decay=1e-3)),
                               ("SGD", lambda l: SGD(l, lr=1e-2))):
            cpu = L.Dense(*size, rng=3, dtype=dt)
            gpu = copy.deepcopy(cpu).to("cuda")
            oc, og = make_opt(cpu), make_opt(gpu)
            for _ in range(5):
                grads = {k: rng.standard_normal(v.shape).astype(dt) for k, v in cpu.params.items()}
                cpu.grads = grads
                gpu.grads = {k: cp.asarray(v) for k, v in grads.items()}
                oc.step()
                og.step()
            record("optimiser kernel vs NumPy", f"{name} {np.dtype(dt).name}, 5 steps",
                   max(rel(gpu.params[k], cpu.params[k]) for k in cpu.params), TOL[dt] * 10)


# ---------------------------------------------------------------------------------------- training
def _digest(method):
    h = hashlib.sha256()
    for k, v in sorted(method.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def _run_steps(method, x, y, steps, batch, schedule=None):
    losses = []
    for s in range(steps):
        xb, yb = x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
        loss = schedule.step(method, xb, yb) if schedule else method.train_step(xb, yb)
        losses.append(float(loss))
    return losses


def compare_runs(detail, losses_cpu, losses_gpu, cpu, gpu, loss_limit, state_limit):
    """Record two checks of a GPU run against the same run on the CPU: the per-step losses (max
    relative difference), and every weight, feedback weight and running statistic of the trained
    state (max over arrays of max |diff| / max |CPU array|), so an update that differs shows even
    where the losses agree. The state gets its own, looser limit: where a gradient is 0 in exact
    arithmetic (a conv bias before BatchNorm, attention's key bias) it holds rounding noise that
    differs between devices, and Adam scales such noise up to about lr * noise / eps per step.
    The optimiser moments themselves are left out (they are that noise)."""
    err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses_gpu, losses_cpu))
    record("GPU vs CPU losses", detail, err, loss_limit)
    sc, sg = cpu.state_dict(), gpu.state_dict()
    keys = [k for k in sc if not {"opt", "stats"} & set(k.split("/"))]
    err = max(rel(sg[k], sc[k]) for k in keys) if sc.keys() == sg.keys() and keys else float("inf")
    record("GPU vs CPU trained state", detail, err, state_limit)


def _mlp_method(name, dt, sizes, **kw):
    blocks = models.mlp(sizes, rng=5, dtype=dt)
    return make(name, blocks, sample_input=np.zeros((8, sizes[0]), dt), rng=5, **kw)


def check_training(cp, data, steps=20, batch=128, hidden=256, small=64, image_batch=32, image_steps=4,
                   resnet_width=4):
    """The defaults are the GPU run's; tests/test_gpu_path.py runs this with tiny ones on a stand-in."""
    from bll_ref.parallel.streams import StreamSchedule
    x, y = data["x_train"][:steps * batch], data["y_train"][:steps * batch]
    # determinism, and one stream vs a stream per block
    digests = {}
    for label, per_block in (("run 1", None), ("run 2", None), ("streams per block", True), ("one stream", False)):
        m = _mlp_method("bll", np.float32, (784, hidden, hidden, hidden, 10)).to("cuda")
        sched = StreamSchedule(m, streams_per_block=per_block) if per_block is not None else None
        _run_steps(m, x, y, steps, batch, sched)
        digests[label] = _digest(m)
    record("GPU run-to-run bit-identical", f"BLL {steps} steps, sequential",
           float(digests["run 1"] != digests["run 2"]), 0)
    record("GPU streams vs sequential", f"BLL {steps} steps, streams per block = sequential bits",
           float(digests["streams per block"] != digests["run 1"]), 0)
    record("GPU streams vs sequential", f"BLL {steps} steps, one stream = sequential bits",
           float(digests["one stream"] != digests["run 1"]), 0)
    # GPU against CPU
    for dt, limit, state_limit in ((np.float32, 1e-4, 1e-3), (np.float64, 1e-9, 1e-6)):
        xd = x.astype(dt)
        for name in ("bll", "bp", "fa"):
            cpu = _mlp_method(name, dt, (784, hidden, hidden, hidden, 10))
            gpu = copy.deepcopy(cpu).to("cuda")
            lc = _run_steps(cpu, xd, y, steps, batch)
            lg = _run_steps(gpu, xd, y, steps, batch)
            compare_runs(f"{name} {np.dtype(dt).name}, {steps} steps", lc, lg, cpu, gpu, limit, state_limit)
    # the other BLL variants run on the GPU and agree with the CPU (float64, where rounding is small)
    for opts in (dict(variational="eq8", feedback="trained"), dict(variational="bernoulli_kl", feedback="twin"),
                 dict(variational="none"), dict(variational="gauss", feedback_decay=0.9, anneal=False),
                 dict(span=2)):
        cpu = make("bll", models.mlp((784, small, small, 10), activation_name="sigmoid", rng=5, dtype=np.float64),
                   sample_input=np.zeros((8, 784)), rng=5, **opts)
        gpu = copy.deepcopy(cpu).to("cuda")
        xd, k = x.astype(np.float64), max(2, steps // 2)
        lc, lg = _run_steps(cpu, xd, y, k, batch), _run_steps(gpu, xd, y, k, batch)
        compare_runs(f"bll {opts} float64, {k} steps", lc, lg, cpu, gpu, 1e-8, 1e-5)
    # Pred-Sim (similarity matching; std pooling on the CNN's image features) and a transformer on
    # token ids through BLL and BP (float64 vs CPU)
    xi = data["x_train_img"][:image_steps * image_batch].astype(np.float64)
    tokens = np.random.default_rng(6).integers(0, 7, (steps * batch, 7))
    for label, blocks, xs, ys, kw in (
            ("Pred-Sim MLP", models.mlp((784, small, small, 10), rng=5, dtype=np.float64), x.astype(np.float64), y,
             dict(variational="sim")),
            ("Pred-Sim CNN", models.cnn(channels=(8, 8), rng=5, dtype=np.float64), xi, y, dict(variational="sim")),
            ("transformer", models.transformer(vocab=7, length=7, dim=small, n_blocks=2, rng=5, dtype=np.float64),
             tokens, tokens[:, ::-1].copy(), dict(n_classes=7))):
        k = max(2, steps // 2)   # two steps at least: the second loss sees the first update
        n = len(xs) // k
        for name in ("bll", "bp"):
            if name == "bp" and label.startswith("Pred-Sim"):
                continue
            cpu = make(name, copy.deepcopy(blocks), sample_input=xs[:4], rng=5, **(kw if name == "bll" else {}))
            gpu = copy.deepcopy(cpu).to("cuda")
            lc, lg = _run_steps(cpu, xs, ys, k, n), _run_steps(gpu, xs, ys, k, n)
            compare_runs(f"{name} {label} float64, {k} steps of {n}", lc, lg, cpu, gpu, 1e-8, 1e-5)
    # CNN and ResNet blocks through BLL on the GPU (float64 vs CPU)
    for label, blocks in (("CNN 4-block", models.cnn(channels=(8, 16, 16), rng=5, dtype=np.float64)),
                          (f"ResNet-18 width {resnet_width}",
                           models.resnet18(width=resnet_width, rng=5, dtype=np.float64))):
        for name in ("bll", "bp"):
            cpu = make(name, copy.deepcopy(blocks), sample_input=xi[:8], rng=5)
            gpu = copy.deepcopy(cpu).to("cuda")
            lc, lg = (_run_steps(cpu, xi, y, image_steps, image_batch),
                      _run_steps(gpu, xi, y, image_steps, image_batch))
            compare_runs(f"{name} {label} float64, {image_steps} steps", lc, lg, cpu, gpu, 1e-8, 1e-5)


def check_fashion(data, epochs=2, sizes=(784, 1024, 1024, 1024, 10)):
    out = {}
    for device in ("cuda", "cpu"):
        blocks = models.mlp(sizes, rng=0)
        m = make("bll", blocks, sample_input=data["x_train"][:8], rng=0)
        if device == "cuda":
            m.to("cuda")
        t = time.perf_counter()
        hist = fit(m, {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}, epochs=epochs,
                   batch_size=128, rng=0, log=None, train_eval=0)
        out[device] = (hist["test_acc"][-1], time.perf_counter() - t)
        print(f"  {device}: {epochs} epochs, test accuracy {100 * out[device][0]:.2f} %, "
              f"{out[device][1]:.1f} s", flush=True)
    diff = abs(out["cuda"][0] - out["cpu"][0]) * 100
    record(f"{data['name']} {epochs} epochs GPU vs CPU",
           f"BLL MLP: GPU {100 * out['cuda'][0]:.2f} % in {out['cuda'][1]:.1f} s, "
           f"CPU {100 * out['cpu'][0]:.2f} % in {out['cpu'][1]:.1f} s (points apart)", diff, 0.5)


def _data(full, n=4096, n_test=512):
    from bll_ref import data as D
    if full and D.fashion_mnist_available():
        d = D.load_fashion_mnist()
        d["name"] = "Fashion-MNIST"
    else:
        rng = np.random.default_rng(0)
        d = {"x_train": rng.random((n, 784), np.float32), "y_train": rng.integers(0, 10, n),
             "x_test": rng.random((n_test, 784), np.float32), "y_test": rng.integers(0, 10, n_test),
             "name": "random synthetic data"}
    d["x_train_img"] = d["x_train"][:512].reshape(-1, 1, 28, 28)
    return d


#: ``--smoke``: the sizes each section takes instead of its defaults.
SMOKE = {"data": dict(n=128, n_test=64), "losses": dict(shapes=((7, 333),)), "optimisers": dict(size=(37, 29)),
         "training": dict(steps=2, batch=4, hidden=8, small=8, image_batch=2, image_steps=2, resnet_width=1),
         "fashion": dict(epochs=1, sizes=(784, 16, 16, 10))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for gpu_check.json/.md (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="skip the 2-epoch Fashion-MNIST comparison")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes and synthetic data: checks that the script runs, in seconds (its numbers "
                         "mean little; the tests run it on a CuPy stand-in)")
    args = ap.parse_args(argv)
    try:
        cp = backend.require_cuda()
    except backend.DeviceError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"{k}: {v}" for k, v in backend.device_info()), flush=True)
    size = SMOKE if args.smoke else {k: {} for k in SMOKE}
    data = _data(full=not (args.quick or args.smoke), **size["data"])
    t0 = time.perf_counter()
    sections = [("layers", lambda: check_layers(cp)), ("losses", lambda: check_losses(cp, **size["losses"])),
                ("optimisers", lambda: check_optimisers(cp, **size["optimisers"])),
                ("training", lambda: check_training(cp, data, **size["training"]))]
    if not args.quick:
        sections.append(("fashion", lambda: check_fashion(data, **size["fashion"])))
    for name, fn in sections:
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a crash is a failed check, and the other sections still run
            traceback.print_exc()
            RESULTS.append({"check": f"{name} section", "detail": f"raised {type(e).__name__}: {e}"[:300],
                            "error": float("inf"), "limit": 0.0, "ok": False})
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)
    rows = ["| check | case | error | limit | ok |", "|---|---|---|---|---|"]
    rows += [f"| {r['check']} | {r['detail']} | {r['error']:.2e} | {r['limit']:.0e} | {'yes' if r['ok'] else '**NO**'} |"
             for r in RESULTS]
    n_ok = sum(r["ok"] for r in RESULTS)
    rows.append(f"\n{n_ok}/{len(RESULTS)} checks pass in {time.perf_counter() - t0:.0f} s")
    write("gpu_check", {"machine": machine(), "device": backend.device_info(), "results": RESULTS},
          "\n".join(rows), out=args.out)
    return 0 if n_ok == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
