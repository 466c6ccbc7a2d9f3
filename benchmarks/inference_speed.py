"""Inference throughput (images/s) on the 10k Fashion-MNIST test images, one thread, three ways
side by side in one run, for an MLP and a CNN exported at 8 bits:

- float    ``model.forward(x, train=False)`` of the checkpoint (float32);
- integer  ``IntegerModel.infer(x)`` (quantize, integer-only ``run``, dequantize) of the exported
           file's records: the path of ``bll-ref verify``'s accuracy report, in its batches of
           1000 (verify's bit-exact trace check itself runs only the few stored traced examples);
- C        the C99 golden model (``exporters.c_header.write_c``, ``bll-ref c-header``) compiled
           with the project's flags (``cc -std=c99 ... -O2``), ``<name>_run`` once per image in a
           timed loop of a small harness written by this script (file I/O and process start are
           outside the timed loop).

The three are interleaved batch by batch (float, integer, C on batch 1, then batch 2, ...), so
machine drift hits all alike; images/s = images / summed time, and the spread over batches is
reported. The run also checks that the C outputs equal the Python integer outputs bit for bit on
every test image, reports the three accuracies, profiles one integer batch (the share of each
record's ``run`` (file:line) and of the hottest functions (cProfile), so a slow part of the
integer path can be named), and sweeps the batch size of the float and integer paths.

    python benchmarks/inference_speed.py --mlp runs/infer/mlp/checkpoint.npz --cnn runs/infer/cnn/checkpoint.npz

Checkpoints (timing does not need well-trained models; 1 epoch each, ~1 min on 2 cores):

    bll-ref train --method bp --model mlp --epochs 1 --out runs/infer/mlp
    bll-ref train --method bp --model cnn --epochs 1 --limit-train 10000 --out runs/infer/cnn

Thread counts are pinned to 1 (OPENBLAS/OMP/MKL/NUMBA) unless already set; they are recorded.
Writes benchmarks/results/inference_speed.{json,md}.
"""
from __future__ import annotations

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    __import__("os").environ.setdefault(_v, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_gflops, machine, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bll_ref import checkpoint, data  # noqa: E402
from bll_ref.fixedpoint import IntegerModel  # noqa: E402
from exporters import export, find_c_compiler, verify, write_c  # noqa: E402
from exporters.c_header import CFLAGS  # noqa: E402

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
NAME = "bench_model"

# The timed C loop: <name>_run on every image of a binary int32 file; the output codes of each
# image go to a binary file (checked against Python), the seconds of the loop to stdout.
HARNESS = r"""#define _POSIX_C_SOURCE 199309L
#include "@name@.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int32_t trace[@P@_TRACE_SIZE];

int main(int argc, char **argv)
{
    long n, s;
    FILE *f;
    int32_t *in, *out;
    struct timespec t0, t1;
    if (argc != 4)
        return 2;
    n = atol(argv[3]);
    in = malloc((size_t)n * @P@_INPUT_SIZE * sizeof *in);
    out = malloc((size_t)n * @P@_OUTPUT_SIZE * sizeof *out);
    f = fopen(argv[1], "rb");
    if (in == NULL || out == NULL || f == NULL
        || fread(in, sizeof *in, (size_t)n * @P@_INPUT_SIZE, f) != (size_t)n * @P@_INPUT_SIZE)
        return 2;
    fclose(f);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (s = 0; s < n; ++s) {
        if (@name@_run(in + s * @P@_INPUT_SIZE, trace) != 0)
            return 3;
        memcpy(out + s * @P@_OUTPUT_SIZE, trace + @P@_OUTPUT_OFFSET, @P@_OUTPUT_SIZE * sizeof *out);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    f = fopen(argv[2], "wb");
    if (f == NULL || fwrite(out, sizeof *out, (size_t)n * @P@_OUTPUT_SIZE, f) != (size_t)n * @P@_OUTPUT_SIZE)
        return 2;
    fclose(f);
    printf("%.9f\n", (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    free(in);
    free(out);
    return 0;
}
"""


def build_c(im, codes, workdir):
    """Write the golden model + harness into ``workdir``, compile with CFLAGS; the executable."""
    cc = find_c_compiler()
    if cc is None:
        raise SystemExit("no C compiler found ($CC, cc, gcc, clang): install one (apt-get install gcc)")
    write_c(im, workdir, name=NAME, test_inputs=codes[:2])
    main = pathlib.Path(workdir) / "bench_main.c"
    main.write_text(HARNESS.replace("@name@", NAME).replace("@P@", NAME.upper()))
    exe = pathlib.Path(workdir) / "bench_c"
    cmd = [cc, *CFLAGS, "-o", str(exe), str(pathlib.Path(workdir) / f"{NAME}.c"), str(main)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"compiling the C golden model failed: {' '.join(cmd)}\n{res.stderr}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return exe, " ".join(cmd), (version[0] if version else cc)


def run_c(exe, codes, workdir):
    """(seconds of the timed loop, output codes (n, OUTPUT_SIZE) int32) for one batch of codes."""
    fin, fout = os.path.join(workdir, "in.bin"), os.path.join(workdir, "out.bin")
    np.ascontiguousarray(codes.reshape(len(codes), -1), dtype=np.int32).tofile(fin)
    res = subprocess.run([str(exe), fin, fout, str(len(codes))], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"the C benchmark harness failed (exit {res.returncode}): {res.stderr}")
    return float(res.stdout.strip()), np.fromfile(fout, dtype=np.int32).reshape(len(codes), -1)


def _where(fn):
    """'path:line' of a function, relative to the repository."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        path = os.path.relpath(inspect.getsourcefile(fn), ROOT)
        return f"{path}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        return getattr(fn, "__qualname__", repr(fn))


def profile_integer(im, x, top=8):
    """Shares of one ``im.infer(x)``: per record ``run`` (by wrapping each record's bound run),
    the rest of IntegerModel (input checks, quantize, int64 casts between records, dequantize),
    and the cProfile functions with the most own time."""
    spent, orig = {}, {}

    def timed(i, run):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return run(*a, **k)
            finally:
                spent[i] = spent.get(i, 0.0) + time.perf_counter() - t
        return wrapper
    for i, rec in enumerate(im.records[1:], 1):
        orig[i] = rec.run
        rec.run = timed(i, rec.run)
    try:
        t = time.perf_counter()
        im.infer(x)
        total = time.perf_counter() - t
    finally:
        for i, rec in enumerate(im.records[1:], 1):
            del rec.run                         # back to the class's method
    records = [{"index": i, "kind": im.records[i].kind, "name": im.records[i].name,
                "where": _where(type(im.records[i]).run), "seconds": s, "share": s / total}
               for i, s in spent.items()]
    rest = total - sum(spent.values())
    records.append({"index": None, "kind": "IntegerModel (quantize, casts, dequantize)", "name": "",
                    "where": _where(IntegerModel.run), "seconds": rest, "share": rest / total})
    pr = cProfile.Profile()
    pr.enable()
    im.infer(x)
    pr.disable()
    st = pstats.Stats(pr)
    total_p = st.total_tt
    funcs = []
    for (path, line, name), (_, _, tt, _, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = f"{os.path.relpath(path, ROOT)}:{line}" if path.startswith(ROOT) else (path if line == 0 else f"{path}:{line}")
        funcs.append({"function": name, "where": where, "own_seconds": tt, "share": tt / total_p})
    return {"batch": len(x), "seconds": total, "records": records, "functions": funcs}


def bench_model(kind, ckpt, args, workdir):
    model, meta, aux = checkpoint.load(ckpt)
    images = kind == "cnn"
    d, src = data.load("fashion-mnist", images=images, limit_train=args.calibration, limit_test=args.limit)
    x, y = d["x_test"], d["y_test"]
    h5 = os.path.join(workdir, f"{kind}.h5")
    e = export(model, h5, d["x_train"][:args.calibration], width=args.width, percentile=99.9,
               n_traces=16, aux=aux, meta=meta)
    rep = verify(h5)                           # the bit-exact check of bll-ref verify
    im = IntegerModel.from_records(e.records)
    codes = im.quantize_input(x)
    exe, cc_cmd, cc_version = build_c(im, codes, workdir)
    b = args.batch
    batches = [(i, min(i + b, len(x))) for i in range(0, len(x), b)]
    # warm-up (numba im2col compiles, BLAS threads start, page cache) on a few images
    model.forward(x[:8], train=False), im.infer(x[:8]), run_c(exe, codes[:8], workdir)
    times = {"float": [], "integer": [], "c": []}
    pred = {"float": [], "integer": [], "c": []}
    c_equal = True
    for lo, hi in batches:
        t = time.perf_counter()
        out_f = model.forward(x[lo:hi], train=False)
        times["float"].append(time.perf_counter() - t)
        t = time.perf_counter()
        out_i = im.infer(x[lo:hi])
        times["integer"].append(time.perf_counter() - t)
        sec, out_c = run_c(exe, codes[lo:hi], workdir)
        times["c"].append(sec)
        # the integer output codes (dequantize is an exact ldexp): C must give them bit for bit
        ref_codes = np.ldexp(out_i, im.output_fmt.frac).astype(np.int64)
        c_equal &= bool(np.array_equal(out_c, ref_codes.reshape(len(ref_codes), -1)))
        for k, o in (("float", out_f), ("integer", out_i), ("c", out_c)):
            pred[k].append(np.argmax(o.reshape(len(o), -1), axis=1))
        print(f"  {kind} images {lo}-{hi}: float {times['float'][-1]:.3f}s  integer {times['integer'][-1]:.3f}s  "
              f"C {times['c'][-1]:.3f}s", flush=True)
    n = len(x)
    res = {"model": kind, "checkpoint": os.path.relpath(os.path.abspath(ckpt), ROOT), "images": n, "batch": b,
           "width": args.width, "records": len(im.records), "verify_ok": rep["ok"], "c_bit_exact": c_equal,
           "c_compile": cc_cmd, "c_compiler": cc_version, "methods": {}}
    for k in times:
        per_img = [(hi - lo) / t for (lo, hi), t in zip(batches, times[k])]
        res["methods"][k] = {"seconds": float(sum(times[k])), "images_per_s": n / float(sum(times[k])),
                             "batch_images_per_s_min": float(min(per_img)),
                             "batch_images_per_s_max": float(max(per_img)),
                             "accuracy": float(np.mean(np.concatenate(pred[k]) == y)),
                             "batch_seconds": [float(t) for t in times[k]]}
    res["profile_integer"] = profile_integer(im, x[:b])
    res["batch_sweep"] = batch_sweep(model, im, x[:args.sweep_images], args.sweep)
    return res


def batch_sweep(model, im, x, sizes, rounds=2):
    """Float and integer images/s on ``x`` at several batch sizes, interleaved, best of ``rounds``
    (large batches make large int64 temporaries: the integer path is sensitive to the size)."""
    best = {(k, s): float("inf") for k in ("float", "integer") for s in sizes}
    for _ in range(rounds):
        for s in sizes:
            for k, f in (("float", lambda v: model.forward(v, train=False)), ("integer", im.infer)):
                t = time.perf_counter()
                for i in range(0, len(x), s):
                    f(x[i:i + s])
                best[k, s] = min(best[k, s], time.perf_counter() - t)
    return [{"batch": s, "images": len(x), "float_images_per_s": len(x) / best["float", s],
             "integer_images_per_s": len(x) / best["integer", s]} for s in sizes]


def table(results, gemm, load):
    rows = ["| model | path | images/s | vs float | s for 10k | batch spread (img/s) | accuracy % |",
            "|---|---|---|---|---|---|---|"]
    label = {"float": "float32 forward", "integer": "integer (IntegerModel.infer, verify's path)",
             "c": "C golden model (cc -O2)"}
    for r in results:
        f = r["methods"]["float"]["images_per_s"]
        for k, m in r["methods"].items():
            rows.append(f"| {r['model']} | {label[k]} | {m['images_per_s']:,.0f} | {m['images_per_s'] / f:.2f}x | "
                        f"{m['seconds'] * 10000 / r['images']:.1f} | {m['batch_images_per_s_min']:,.0f}-"
                        f"{m['batch_images_per_s_max']:,.0f} | {100 * m['accuracy']:.2f} |")
    lines = ["\n".join(rows), ""]
    for r in results:
        lines.append(f"{r['model']}: {r['records']} integer records, {r['width']} bits; verify (stored traces) "
                     f"{'bit-exact' if r['verify_ok'] else 'MISMATCH'}; C outputs vs Python integer outputs on all "
                     f"{r['images']} images: {'bit-exact' if r['c_bit_exact'] else 'MISMATCH'}.")
    lines += ["", "Batch size (first test images, best of 2, interleaved; verify uses 1000):", "",
              "| model | batch | float img/s | integer img/s | integer / float |", "|---|---|---|---|---|"]
    for r in results:
        for q in r["batch_sweep"]:
            lines.append(f"| {r['model']} | {q['batch']} | {q['float_images_per_s']:,.0f} | "
                         f"{q['integer_images_per_s']:,.0f} | {q['integer_images_per_s'] / q['float_images_per_s']:.2f}x |")
    for r in results:
        p = r["profile_integer"]
        lines += ["", f"Integer path, {r['model']}, one batch of {p['batch']} ({p['seconds']:.2f} s): share per record",
                  "", "| record | kind | name | where | share |", "|---|---|---|---|---|"]
        for q in sorted(p["records"], key=lambda q: -q["share"])[:6]:
            lines.append(f"| {'' if q['index'] is None else q['index']} | {q['kind']} | {q['name']} | "
                         f"{q['where']} | {100 * q['share']:.1f}% |")
        lines += ["", "hottest functions (own time, cProfile):", "", "| function | where | share |", "|---|---|---|"]
        for q in p["functions"][:6]:
            lines.append(f"| {q['function']} | {q['where']} | {100 * q['share']:.1f}% |")
    lines += ["", f"One thread ({', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS)}); machine float32 "
              f"GEMM {gemm:.0f} GFLOP/s in the same run; load average {load['start'][0]:.1f} at the start, "
              f"{load['end'][0]:.1f} at the end on {os.cpu_count()} CPUs (other jobs slow all three paths "
              f"alike: they are interleaved batch by batch). Command: `python benchmarks/inference_speed.py "
              f"--mlp ... --cnn ...` (see its docstring)."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlp", default=os.path.join(ROOT, "runs", "infer", "mlp", "checkpoint.npz"))
    ap.add_argument("--cnn", default=os.path.join(ROOT, "runs", "infer", "cnn", "checkpoint.npz"))
    ap.add_argument("--models", default="mlp,cnn", help="which of mlp,cnn to run")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1000, help="images per batch (verify uses 1000)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default all 10k)")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--sweep", default="50,100,250,1000",
                    help="batch sizes of the float / integer batch-size sweep (comma-separated)")
    ap.add_argument("--sweep-images", type=int, default=1000, help="test images of the sweep")
    ap.add_argument("--out", default="inference_speed", help="results/<out>.{json,md}")
    args = ap.parse_args()
    try:
        args.sweep = [int(v) for v in args.sweep.split(",") if v]
    except ValueError:
        raise SystemExit(f"--sweep must be comma-separated batch sizes, got {args.sweep!r}") from None
    kinds = [k for k in args.models.split(",") if k]
    for k in kinds:
        if k not in ("mlp", "cnn"):
            raise SystemExit(f"--models: unknown model {k!r}; use mlp and/or cnn")
        if not os.path.exists(getattr(args, k)):
            raise SystemExit(f"no {k} checkpoint at {getattr(args, k)}; train one (see the docstring): "
                             f"bll-ref train --method bp --model {k} --epochs 1 --out runs/infer/{k}")
    load_start = os.getloadavg()
    gemm = gemm_gflops()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in kinds:
            wd = os.path.join(tmp, k)
            os.makedirs(wd)
            results.append(bench_model(k, getattr(args, k), args, wd))
    load = {"start": load_start, "end": os.getloadavg()}
    payload = {"machine": machine(), "threads": {v: os.environ.get(v) for v in THREAD_VARS},
               "gemm_gflops_f32": gemm, "load_average_1_5_15_min": load, "results": results}
    write(args.out, payload, table(results, gemm, load))


if __name__ == "__main__":
    main()
