"""Export a BLL-trained network to hardware formats and check every one of them.

What it shows
-------------
The firmware hand-off, end to end, in one script:
  1. train a small MLP (784-128-128-10, ReLU, 3 blocks) block-locally with BLL (default recipe);
  2. export it to ONE HDF5 file per bit width (8 and 16): float weights, integer codes with their
     Q formats, feedback weights, calibration inputs and the integer trace of every layer;
  3. verify each file: integer inference re-run from the file alone must reproduce the stored
     traces bit for bit; float vs fixed-point test accuracy;
  4. write the NIR graph (``model.nir``) and read it back with the real ``nir`` package when it
     is installed (ReLU maps to rate-coded IF neurons; see exporters/nir.py);
  5. write the C header + C99 golden model, compile it with the system C compiler and run its
     self-test against the traces (skipped with a note when there is no compiler).

Run
---
    python examples/export_to_hardware.py                # ~1 minute on 2 cores
    python examples/export_to_hardware.py --epochs 3 --out-dir out/hw

Expected output (numbers vary slightly with the machine's BLAS)::

    data: Fashion-MNIST (20000 train / 10000 test) from /usr/share/datasets/fashion-mnist
    ...
    | width | verify | float acc % | fixed acc % | file KiB |
    | 8 | bit-exact | 85.9 | 85.6 | 180 |
    | 16 | bit-exact | 85.9 | 85.9 | 300 |
    NIR: out/hw/model.nir read back by nir.read: 7 nodes, Affine weights equal
    C golden model: out/hw/c/bll_model_test: all 7 layers match the Python traces

The same steps from the command line (see README "Hardware export")::

    bll-ref train --method bll --sizes 784,128,128,10 --activation relu --epochs 2 --out runs/hw
    bll-ref export runs/hw/checkpoint.npz --out runs/hw/model-w8.h5 --width 8
    bll-ref verify runs/hw/model-w8.h5
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

from bll_ref import data
from bll_ref.methods import evaluate
from bll_ref.training import TrainConfig, train


def _data(n_train, n_test):
    return data.load("auto", limit_train=n_train, limit_test=n_test, rng=0)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--widths", default="8,16")
    ap.add_argument("--out-dir", default="out/hw")
    args = ap.parse_args(argv)
    from exporters import export, verify
    from exporters.c_header import write_c
    from exporters.nir import write_nir
    from exporters.c_header import compile_c, find_c_compiler
    from bll_ref.fixedpoint import IntegerModel

    os.makedirs(args.out_dir, exist_ok=True)
    d = _data(args.n_train, args.n_test)
    # the run bll-ref train --sizes 784,H,H,10 --activation relu would make (run directory: OUT/run)
    cfg = TrainConfig(method="bll", sizes=f"784,{args.hidden},{args.hidden},10", activation="relu",
                      epochs=args.epochs, limit_train=args.n_train, limit_test=args.n_test,
                      out=os.path.join(args.out_dir, "run"))
    print(f"1. training 3 blocks with BLL for {args.epochs} epochs")
    method = train(cfg, log=None).method
    model, blocks = method.model, method.model.layers
    float_acc = evaluate(model, d["x_test"], d["y_test"])

    print("2./3. export + verify")
    rows, exported = [], {}
    calib, labels = d["x_train"][:256], d["y_train"][:256]
    for width in (int(w) for w in args.widths.split(",")):
        path = os.path.join(args.out_dir, f"model-w{width}.h5")
        e = export(model, path, calib, width=width, n_traces=16, aux=method.aux_state(),
                   meta={"method": "bll", "model": "mlp"}, labels=labels)
        report = verify(path)
        im = IntegerModel.from_records(e.records)
        logits = np.concatenate([im.infer(d["x_test"][i:i + 1000]) for i in range(0, len(d["x_test"]), 1000)])
        fixed_acc = float(np.mean(logits.argmax(axis=1) == d["y_test"]))
        rows.append((width, "bit-exact" if report["ok"] else f"{report['n_mismatched']} layers differ",
                     100 * float_acc, 100 * fixed_acc, report["file_size"] / 1024))
        exported[width] = e
    print("| width | verify | float acc % | fixed acc % | file KiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0f} |")

    nir_path = os.path.join(args.out_dir, "model.nir")
    write_nir(model, nir_path, input_shape=(784,))
    try:
        import nir
        g = nir.read(nir_path)
        W = blocks[0][0].params["W"]
        same = np.array_equal(np.asarray(g.nodes["0.0"].weight), W.T)
        print(f"4. NIR: {nir_path} read back by nir.read: {len(g.nodes)} nodes, "
              f"Affine weights {'equal' if same else 'DIFFER'}")
    except ImportError:
        print(f"4. NIR: wrote {nir_path} (install 'nir' to read it back)")

    c_dir = os.path.join(args.out_dir, "c")
    e = exported[max(exported)]
    write_c(e.records, c_dir, test_inputs=e.traces[0][:4], traces=[t[:4] for t in e.traces])
    if find_c_compiler() is None:
        print(f"5. C: wrote {c_dir}/bll_model.[hc]; no C compiler found, golden-model test skipped")
        return 0
    exe = compile_c(c_dir)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    status = f"all {len(e.records)} layers match the Python traces" if res.returncode == 0 else \
        f"MISMATCH (exit {res.returncode}):\n{res.stdout}"
    print(f"5. C golden model: {exe}: {status}")
    return 0 if res.returncode == 0 and all(r[1] == "bit-exact" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
