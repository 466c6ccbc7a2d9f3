"""Paper 001 Table 1 on Fashion-MNIST: BP, FA, BLL, head-only and Pred-Sim on ResNet-18 (or the 4-block CNN).

What it does
------------
Trains every (method, seed) pair on the same data and writes each run to its own JSON under
``OUT/runs/`` (a run whose JSON exists with the same settings is skipped, so the table can be
assembled from runs made at different times, on different days or machines), then assembles

* ``OUT/table.md`` / ``OUT/table.json``: one row per method, test top-1, test top-3 and train top-1
  (%, mean +- std over the seeds found), shaped like paper 001 Table 1, with the paper's
  ResNet-18 numbers next to ours;
* ``OUT/curves.png``: test top-1, test top-3 and train top-1 per epoch, mean over seeds, +- std shaded.

Methods (``--methods``, comma-separated; each built by ``bll_ref.methods.make``):

    bp       end-to-end backprop          fa       feedback alignment
    bll      BLL default recipe (Gaussian term on LN(a), closed-form feedback, annealed, + heads)
    head     BLL head-only ablation (variational='none')
    predsim  Pred-Sim, Nøkland & Eidnes 2019 (variational='sim': similarity matching + heads)

and any BLL variant as ``NAME+key=value+...`` with BLL keywords, e.g. ``bll+var_weight=0.3``,
``bll+anneal=false``, ``bll+feedback_decay=0.9``, ``bll+variational=bernoulli_kl``
(the documented knobs: variational weight, anneal on/off, feedback decay, Bernoulli vs Gaussian).
``--study`` adds five such variants (var_weight 0.3 and 3, no anneal, feedback_decay 0.9,
bernoulli_kl). Tune on ``--val N`` (the last N training images are held
out and reported in place of the test set, which is then never evaluated); report test numbers
only for the settings chosen on validation.

Models: ``--model resnet18`` (``bll_ref.models.resnet18``, ``--width`` base channels, default 8)
or ``--model cnn`` (``bll_ref.models.cnn``, ``--channels``, default 16,32,64; same table).

Commands
--------
    # the tables (one (method, seed) per call is fine: rerun to resume / add seeds)
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/resnet_fashion_mnist.py --seeds 0,1,2 --out runs/resnet18
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/resnet_fashion_mnist.py --model cnn --epochs 8 \\
        --seeds 0,1,2 --out runs/cnn
    # the variational-term study on a validation split (test set untouched)
    .venv/bin/python examples/resnet_fashion_mnist.py --val 10000 --study --methods bll,head,predsim \\
        --seeds 0 --out runs/resnet18-val
    # only assemble the table from the JSONs already there
    .venv/bin/python examples/resnet_fashion_mnist.py --out runs/resnet18 --table-only

Cost (measured 2026-11-30 with ``--time-steps``, full Fashion-MNIST, batch 128,
OPENBLAS_NUM_THREADS=1, on the 2 shared CPU cores at load average 6-11, so CPU seconds of the
process are the meaningful number; wall was 2-4x that):

    width | s CPU / step (bp, fa, bll, head, predsim) | CPU min / epoch (469 steps + 20k eval)
    16    | 0.79 0.80 0.83 0.81 0.85                   | 7.0-7.9
    8     | 0.27-0.35 0.27-0.34 0.32-0.43 0.29-0.42 0.29-0.38 | 2.4-3.6

(two sessions for width 8; eval ~0.85 CPU s per 1000 images in chunks of 250). Defaults: width 8,
4 epochs = 10-14.5 CPU minutes per (method, seed) run, within the ~15 min budget; width 16 would
allow 2 epochs. At equal compute on a 5000-image slice, judged on 1000 held-out training images
(seed 0), width 8 x 3 epochs beat width 16 x 1 epoch: BP 79.2 vs 76.5 %, BLL 81.7 vs 68.1 %
(BLL needs the epochs). On an idle machine run two (method, seed) jobs side by side, one per core.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

from bll_ref import data, models
from bll_ref.fileio import atomic_open, write_json_atomic
from bll_ref.loop import fit
from bll_ref.methods import make

PAPER = {"bp": (92.7, 99.3, 96.0), "fa": (87.9, 98.6, 92.1), "bll": (91.2, 98.8, 91.0)}  # 001 Table 1, F-MNIST, ResNet-18
PRESETS = {"bp": ("bp", {}), "fa": ("fa", {}), "bll": ("bll", {}), "head": ("bll", {"variational": "none"}),
           "predsim": ("bll", {"variational": "sim"})}
STUDY = ("bll+var_weight=0.3", "bll+var_weight=3", "bll+anneal=false", "bll+feedback_decay=0.9",
         "bll+variational=bernoulli_kl")
DEFAULTS = {"resnet18": {"epochs": 4, "width": 8}, "cnn": {"epochs": 8}}  # ~15 min per run: see Cost


def parse_spec(spec):
    """'bll+var_weight=0.3+anneal=false' -> ("bll", {"var_weight": 0.3, "anneal": False})."""
    name, *pairs = spec.split("+")
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; choose from {sorted(PRESETS)}")
    method, opts = PRESETS[name][0], dict(PRESETS[name][1])
    if pairs and method != "bll":
        raise ValueError(f"{spec!r}: options after '+' are BLL keywords; {name!r} takes none")
    for p in pairs:
        key, sep, raw = p.partition("=")
        if not sep or not key:
            raise ValueError(f"{spec!r}: expected NAME+key=value, got {p!r}")
        low = raw.lower()
        value = True if low == "true" else False if low == "false" else raw
        if isinstance(value, str):
            try:
                value = float(raw) if any(c in raw for c in ".e") else int(raw)
            except ValueError:
                pass
        opts[key] = value
    return method, opts


def settings(args) -> dict:
    """What makes two runs of one (method, seed) comparable; stored in every run JSON."""
    model = {"name": args.model, **({"width": args.width} if args.model == "resnet18" else
                                     {"channels": list(args.channels)})}
    return {"model": model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "limit_train": args.limit_train, "limit_test": args.limit_test, "val": args.val,
            "train_eval": args.train_eval, "data": "synthetic" if args.synthetic else "auto"}


def settings_key(s) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]


def run_path(out, spec, seed):
    safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in spec.replace("+", "__"))
    return os.path.join(out, "runs", f"{safe}-seed{seed}.json")


def load_split(args, log):
    """(data dict for fit, source, eval_set): with --val N the last N training images are the
    evaluation set and the test set is not loaded into the run at all."""
    d, source = data.load("synthetic" if args.synthetic else "auto", images=True,
                          limit_train=args.limit_train, limit_test=args.limit_test, rng=0, log=log)
    if source == "synthetic" and not args.synthetic:
        log("NOTE: synthetic 28x28 bar images - these numbers say nothing about the paper")
    if not args.val:
        return d, source, "test"
    n = len(d["x_train"])
    if not 0 < args.val < n:
        raise ValueError(f"--val {args.val} must be between 1 and the {n - 1} training images less one")
    cut = n - args.val
    return ({"x_train": d["x_train"][:cut], "y_train": d["y_train"][:cut],
             "x_test": d["x_train"][cut:], "y_test": d["y_train"][cut:]}, source, "val")


def build(args, seed):
    if args.model == "resnet18":
        return models.resnet18(width=args.width, rng=seed)
    return models.cnn(channels=tuple(args.channels), rng=seed)


def run_one(args, spec, seed, d, source, eval_set, log):
    """Train one (method, seed), write its JSON, return the record."""
    method_name, opts = parse_spec(spec)
    blocks = build(args, seed)  # the seed fixes the initial weights and the batch order
    method = make(method_name, blocks, sample_input=d["x_train"][:8], rng=seed, lr=args.lr,
                  **({"n_classes": 10, **opts} if method_name == "bll" else {}))
    t0 = time.perf_counter()
    hist = fit(method, d, epochs=args.epochs, batch_size=args.batch_size, rng=seed, log=log,
               train_eval=args.train_eval, eval_batch=args.eval_batch, eval_name=eval_set)
    rec = {"spec": spec, "method": method_name, "options": opts, "seed": seed, "settings": settings(args),
           "settings_key": settings_key(settings(args)), "data": source, "eval_set": eval_set,
           "n_train": len(d["x_train"]), "n_eval": len(d["x_test"]), "seconds": time.perf_counter() - t0,
           "history": {k: hist[k] for k in ("epochs", "test_acc", "test_top3", "train_acc", "train_loss",
                                            "epoch_seconds", "train_eval_samples")},
           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__,
                       "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}}
    write_json_atomic(run_path(args.out, spec, seed), rec)
    return rec


def read_runs(out, key):
    """Every run JSON under OUT/runs made with the settings ``key`` -> {spec: {seed: record}}."""
    runs, other = {}, 0
    folder = os.path.join(out, "runs")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("settings_key") != key:
                other += 1
                continue
            runs.setdefault(rec["spec"], {})[rec["seed"]] = rec
    return runs, other


def _ms(values):
    v = 100 * np.asarray(values, float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (float("nan"), 0.0)


def table(runs, eval_set, order):
    """Markdown (paper 001 Table 1 layout) and the rows as data."""
    ev = "val" if eval_set == "val" else "test"
    lines = [f"| method | {ev}-1 % | {ev}-3 % | train-1 % | seeds | epochs | s / epoch | paper test-1 / test-3 / train-1 "
             f"| {ev}-1 minus bll's, same seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    base = runs.get("bll", {})
    for spec in [s for s in order if s in runs] + sorted(set(runs) - set(order)):
        recs = [runs[spec][s] for s in sorted(runs[spec])]
        h = [r["history"] for r in recs]
        top1, top3 = _ms([x["test_acc"][-1] for x in h]), _ms([x["test_top3"][-1] for x in h])
        train = _ms([x["train_acc"][-1] for x in h if x["train_acc"][-1] is not None])
        sec = float(np.mean([np.mean(x["epoch_seconds"]) for x in h]))
        paper = PAPER.get(spec)
        # paired by seed (same initial weights and batch order): far less noisy than two means
        shared = [k for k in sorted(runs[spec]) if k in base] if spec != "bll" else []
        delta = [100 * (runs[spec][k]["history"]["test_acc"][-1] - base[k]["history"]["test_acc"][-1])
                 for k in shared]
        rows.append({"spec": spec, "seeds": sorted(runs[spec]), "epochs": h[0]["epochs"][-1],
                     f"{ev}_top1": top1, f"{ev}_top3": top3, "train_top1": train, "seconds_per_epoch": sec,
                     "paper": paper, "minus_bll": (float(np.mean(delta)), shared) if delta else None})
        cell = lambda m: f"{m[0]:.2f} ± {m[1]:.2f}" if len(recs) > 1 else f"{m[0]:.2f}"  # no std of one seed
        minus = f"{np.mean(delta):+.2f} ({', '.join(f'{d:+.2f}' for d in delta)})" if delta else ""
        lines.append(f"| {spec} | {cell(top1)} | {cell(top3)} | {cell(train)} | {len(recs)} | "
                     f"{h[0]['epochs'][-1]} | {sec:.0f} | {' / '.join(map(str, paper)) if paper else ''} | {minus} |")
    return "\n".join(lines), rows


def curves(runs, order, path, eval_set):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    keys = (("test_acc", f"{eval_set} top-1"), ("test_top3", f"{eval_set} top-3"), ("train_acc", "train top-1"))
    for spec in [s for s in order if s in runs] + sorted(set(runs) - set(order)):
        hs = [r["history"] for r in runs[spec].values()]
        n = min(len(x["epochs"]) for x in hs)
        for ax, (key, title) in zip(axes, keys):
            vals = [[np.nan if v is None else v for v in x[key][:n]] for x in hs]
            v = 100 * np.asarray(vals, float)
            mean, std = v.mean(0), v.std(0)
            line, = ax.plot(range(1, n + 1), mean, "o-", ms=3, label=f"{spec} ({len(hs)} seed{'s' * (len(hs) > 1)})")
            ax.fill_between(range(1, n + 1), mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set(title=title, xlabel="epoch", ylabel="accuracy (%)")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize="small")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def time_steps(args, specs, n_steps, log=print):
    """Seconds per training step of each method (1 warm-up step, then ``n_steps`` timed, wall and
    this process's CPU time) and per 1000 evaluated images, extrapolated to one epoch over the
    training set plus the per-epoch evaluation (test set and train-1 subset). Writes timing.json."""
    d, source, eval_set = load_split(args, log)
    n, bs = len(d["x_train"]), args.batch_size
    steps = (n + bs - 1) // bs
    n_eval = len(d["x_test"]) + min(args.train_eval, n)
    rows = []
    for spec in specs:
        method_name, opts = parse_spec(spec)
        method = make(method_name, build(args, 0), sample_input=d["x_train"][:8], rng=0, lr=args.lr,
                      **({"n_classes": 10, **opts} if method_name == "bll" else {}))
        xb, yb = d["x_train"][:bs], d["y_train"][:bs]
        method.train_step(xb, yb)  # warm-up: Numba compilation, first allocations
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n_steps):
            j = (i + 1) * bs % max(n - bs, 1)
            method.train_step(d["x_train"][j:j + bs], d["y_train"][j:j + bs])
        wall, cpu = (time.perf_counter() - w0) / n_steps, (time.process_time() - c0) / n_steps
        m = min(1000, len(d["x_test"]))
        w0, c0 = time.perf_counter(), time.process_time()
        method.predict(d["x_test"][:m], batch_size=args.eval_batch)
        ev_wall, ev_cpu = (time.perf_counter() - w0) * 1000 / m, (time.process_time() - c0) * 1000 / m
        row = {"spec": spec, "step_wall_s": wall, "step_cpu_s": cpu, "eval_wall_s_per_1000": ev_wall,
               "eval_cpu_s_per_1000": ev_cpu, "steps_per_epoch": steps,
               "epoch_wall_s": steps * wall + n_eval / 1000 * ev_wall,
               "epoch_cpu_s": steps * cpu + n_eval / 1000 * ev_cpu}
        rows.append(row)
        log(f"{spec}: {wall:.3f} s/step wall ({cpu:.3f} CPU), eval {ev_wall:.2f} s / 1000 images "
            f"({ev_cpu:.2f} CPU); one epoch "
            f"({steps} steps + {n_eval} evaluated) ~ {row['epoch_wall_s'] / 60:.1f} min wall, "
            f"{row['epoch_cpu_s'] / 60:.1f} min CPU")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {"settings": settings(args), "data": source, "n_train": n, "batch_size": bs, "timed_steps": n_steps,
           "rows": rows, "loadavg": load, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "cpus": os.cpu_count()}
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "timing.json"), out)
    log(f"load average {load}; wrote {args.out}/timing.json")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("resnet18", "cnn"), default="resnet18")
    ap.add_argument("--width", type=int, default=None, help="resnet18 base channels (default 8; 64 = ResNet-18)")
    ap.add_argument("--channels", default="16,32,64", help="cnn conv widths")
    ap.add_argument("--methods", default="bp,fa,bll,head,predsim", help="comma-separated specs (see above)")
    ap.add_argument("--study", action="store_true", help="add the variational-term variants: " + ", ".join(STUDY))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (resnet18) / 8 (cnn)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--val", type=int, default=0, help="hold out the last N training images and report on them")
    ap.add_argument("--train-eval", type=int, default=10_000, help="training images for train top-1 (eval mode)")
    ap.add_argument("--eval-batch", type=int, default=250,
                    help="evaluation chunk (im2col of 1000 28x28 images at width 16 is 450 MB and slow)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic bar images instead of Fashion-MNIST")
    ap.add_argument("--out", default=None, help="directory for runs/, table.md, table.json, curves.png")
    ap.add_argument("--table-only", action="store_true", help="train nothing; assemble from the JSONs there")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="train nothing: time N steps of each method and extrapolate one epoch (timing.json)")
    args = ap.parse_args(argv)
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model != "resnet18" and args.width is not None:
        ap.error("--width applies to --model resnet18; use --channels for cnn")
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error("--channels and --seeds must be comma-separated integers")
    specs = args.methods.split(",") + (list(STUDY) if args.study else [])
    for s in specs:
        try:
            parse_spec(s)
        except ValueError as e:
            ap.error(str(e))
    args.out = args.out or os.path.join("runs", f"{args.model}-fashion-mnist")
    if not args.table_only:
        os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    log = None if args.quiet else print
    key = settings_key(settings(args))
    if args.time_steps > 0:
        return time_steps(args, specs, args.time_steps)

    if not args.table_only:
        todo = [(s, seed) for seed in seeds for s in specs if not os.path.exists(run_path(args.out, s, seed))]
        for s, seed in [(s, seed) for seed in seeds for s in specs if (s, seed) not in todo]:
            with open(run_path(args.out, s, seed), encoding="utf-8") as f:
                if json.load(f).get("settings_key") != key:
                    ap.error(f"{run_path(args.out, s, seed)} was made with other settings; use another --out")
            print(f"{s} seed {seed}: done already, skipped")
        if todo:
            try:
                d, source, eval_set = load_split(args, print)
            except (ValueError, FileNotFoundError) as e:
                ap.error(str(e))
            print(f"data: {source}, {len(d['x_train'])} train / {len(d['x_test'])} {eval_set} images; model "
                  f"{args.model} {settings(args)['model']}; {args.epochs} epochs, batch {args.batch_size}, "
                  f"Adam {args.lr}")
            for s, seed in todo:
                print(f"=== {s} seed {seed}")
                rec = run_one(args, s, seed, d, source, eval_set, log)
                h = rec["history"]
                print(f"{s} seed {seed}: {eval_set} top-1 {100 * h['test_acc'][-1]:.2f}%, top-3 "
                      f"{100 * h['test_top3'][-1]:.2f}%, train top-1 {100 * h['train_acc'][-1]:.2f}%, "
                      f"{rec['seconds']:.0f} s")
    runs, other = read_runs(args.out, key)
    if not runs:
        raise SystemExit(f"no runs with these settings under {args.out}/runs ({other} with other settings)")
    eval_set = next(iter(next(iter(runs.values())).values()))["eval_set"]
    md, rows = table(runs, eval_set, specs)
    note = (f"\n\n{args.model} {settings(args)['model']}, {args.epochs} epochs, batch {args.batch_size}, "
            f"Adam {args.lr}; mean ± std over seeds; {eval_set}-1/-3: top-1/top-3 on the "
            f"{'validation split (last ' + str(args.val) + ' training images)' if eval_set == 'val' else 'test set'}; "
            f"train-1: top-1 in eval mode on the first {args.train_eval} training images. Paper: ResNet-18, "
            f"001 Table 1." + (f" ({other} run JSONs with other settings ignored.)" if other else ""))
    with atomic_open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md + note + "\n")
    write_json_atomic(os.path.join(args.out, "table.json"), {"rows": rows, "settings": settings(args),
                                                             "eval_set": eval_set, "markdown": md})
    png = curves(runs, specs, os.path.join(args.out, "curves.png"), eval_set)
    print()
    print(md + note)
    print(f"wrote {args.out}/table.md, table.json" + (", curves.png" if png else " (no matplotlib: no curves.png)"))
    return {"table": md, "rows": rows, "runs": runs, "curves": png}


if __name__ == "__main__":
    main()
    sys.exit(0)
