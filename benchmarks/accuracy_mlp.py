"""Fashion-MNIST accuracy table: MLP 784-1024-1024-1024-10 split into 4 blocks, Adam 1e-3,
batch 128, 10 epochs, the same data pipeline for every method (issue bars: BP >= 88.5 %,
BLL default >= BP - 1.0).

    python benchmarks/accuracy_mlp.py [--runs bp,bll_default,...] [--seeds 0,1,2] [--epochs 10]

Every finished run is stored in benchmarks/results/accuracy_mlp/<run>-seed<s>.json (a rerun skips
finished runs, so an interrupted benchmark resumes; ``--name NAME`` uses results/NAME/ instead, to
re-measure beside the stored runs after a kernel change). Each run is a ``bll_ref.training.train``
call, as ``bll-ref train`` makes it: its run directory is runs/bench/<run>-seed<s>/ (checkpoint.npz,
history.json; not committed; benchmarks/fixedpoint_accuracy.py exports the checkpoints); the table
goes to benchmarks/results/accuracy_mlp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, gemm_gflops, machine, write  # noqa: E402

from bll_ref import data  # noqa: E402
from bll_ref.fileio import write_json_atomic  # noqa: E402
from bll_ref.training import TrainConfig, train  # noqa: E402

SIZES = "784,1024,1024,1024,10"
CKPT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "bench")


# name -> (activation, method, TrainConfig options, description)
RUNS = {
    "bp": ("leaky_relu", "bp", {}, "BP"),
    "bp_sigmoid": ("sigmoid", "bp", {}, "BP (sigmoid)"),
    "fa": ("leaky_relu", "fa", {}, "FA"),
    "fa_sigmoid": ("sigmoid", "fa", {}, "FA (sigmoid)"),
    "bll_default": ("leaky_relu", "bll", {},
                    "BLL default: Gaussian on LN(a) + closed-form feedback + head, annealed tau=2"),
    "bll_head_only": ("leaky_relu", "bll", {"variational": "none"}, "BLL predictive head only (ablation)"),
    "bll_gauss_ln_const": ("leaky_relu", "bll", {"no_anneal": True}, "BLL Gaussian on LN(a) + head, constant weight"),
    "bll_eq8_literal_sigmoid": ("sigmoid", "bll", {"variational": "eq8", "feedback": "trained", "tau": 0.5,
                                                   "no_head": True},
                                "BLL paper-literal Eq. 8, trained linear feedback, m=1/(1+0.5 epoch), sigmoid"),
    "bll_eq8_head": ("leaky_relu", "bll", {"variational": "eq8", "feedback": "trained", "tau": 0.5},
                     "BLL Eq. 8 + head, trained feedback"),
    "bll_span2": ("leaky_relu", "bll", {"span": 2}, "BLL(2) default recipe"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="bp,fa,bll_default,bll_head_only,bll_eq8_literal_sigmoid")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from stored runs")
    ap.add_argument("--name", default="accuracy_mlp",
                    help="results/NAME/ for the runs and results/NAME.{json,md} for the table (default "
                         "accuracy_mlp; another name re-measures beside the stored runs)")
    args = ap.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
    if not args.name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--name must be letters, digits, - or _, got {args.name!r}")
    out_dir = os.path.join(RESULTS, args.name)
    os.makedirs(out_dir, exist_ok=True)
    d, _ = data.load("fashion-mnist", limit_train=args.limit_train, limit_test=100 if args.table_only else None)
    print(f"GEMM {gemm_gflops():.0f} GFLOP/s; {len(d['x_train'])} train / {len(d['x_test'])} test")
    for seed in ([] if args.table_only else (int(s) for s in args.seeds.split(","))):
        for name in names:
            path = os.path.join(out_dir, f"{name}-seed{seed}.json")
            if os.path.exists(path):
                prev = json.load(open(path))
                if prev.get("epochs_run") == args.epochs and prev.get("n_train") == len(d["x_train"]):
                    print(f"{name} seed {seed}: done already ({100 * prev['test_acc'][-1]:.2f}%)")
                    continue
            act, kind, opts, desc = RUNS[name]
            print(f"=== {name} seed {seed}: {desc}")
            run = f"{name}-seed{seed}" if args.name == "accuracy_mlp" else f"{args.name}-{name}-seed{seed}"
            cfg = TrainConfig(method=kind, sizes=SIZES, activation=act, epochs=args.epochs, seed=seed,
                              data="fashion-mnist", limit_train=args.limit_train, out=os.path.join(CKPT_DIR, run),
                              **opts)  # the run directory (checkpoint.npz, history.json) of bll-ref train
            t = time.perf_counter()
            hist = train(cfg).history
            hist.update(name=name, seed=seed, description=desc, seconds=time.perf_counter() - t,
                        epochs_run=args.epochs, n_train=len(d["x_train"]))
            write_json_atomic(path, hist)
    # table over everything stored for these runs
    rows, payload = [], {"machine": machine(), "runs": {}}
    for name in names:
        accs, per_epoch = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            path = os.path.join(out_dir, f"{name}-seed{seed}.json")
            if os.path.exists(path):
                h = json.load(open(path))
                accs.append(100 * h["test_acc"][-1])
                per_epoch.append(" ".join(f"{100 * a:.1f}" for a in h["test_acc"]))
        if not accs:
            continue
        payload["runs"][name] = {"final": accs, "per_epoch": per_epoch, "description": RUNS[name][3]}
        spread = f" ± {np.std(accs):.2f}" if len(accs) > 1 else ""
        rows.append(f"| {name} | {RUNS[name][3]} | {' / '.join(f'{a:.2f}' for a in accs)} | "
                    f"{np.mean(accs):.2f}{spread} | {per_epoch[0]} |")
    table = ("| run | what | final test acc % (per seed) | mean | per-epoch (first seed) |\n|---|---|---|---|---|\n"
             + "\n".join(rows))
    write(args.name, payload, table)


if __name__ == "__main__":
    main()
