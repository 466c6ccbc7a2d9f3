"""``bll-ref export``, ``verify``, ``nir``, ``c-header`` and ``firmware``: parsing and printing around
``exporters``.

    bll-ref export CHECKPOINT --out model.h5 --width 8 [--rounding ..] [--overflow ..]
                   [--percentile P] [--calibration N] [--traces N] [--data auto|fashion-mnist|synthetic]
    bll-ref verify model.h5 [--no-accuracy] [--limit-test N]
    bll-ref firmware model.h5 --workdir DIR [--samples N] [--timeout S] [--name NAME]

verify exits 0 when integer inference rerun from the file reproduces every stored trace bit for
bit, 1 on any mismatch, 2 when the file is unreadable or invalid (the error names the dataset).
firmware (docs/firmware.md) exits 0 when the C golden model on the emulated Cortex-M4 prints every
code of the file's traces, 1 when a code differs or the firmware faulted, hung or printed garbage,
2 for bad input or environment (unreadable export; toolchain missing: the line names ``make firmware``).
"""
from __future__ import annotations

import argparse
import os
import subprocess

import numpy as np

from exporters import hdf5
from exporters.c_header import compile_c, find_c_compiler, write_c
from exporters.firmware import FirmwareError, run_firmware
from exporters.from_checkpoint import check_calibration, export_checkpoint, input_kind, training_inputs
from exporters.hls4ml_tb import INPUT_FILE, OUTPUT_FILE, PRECISION_FILE, write_tb
from exporters.nir import write_nir

from .. import checkpoint
from ..fileio import check_output, creatable_dir_problem, regular_input
from ..fixedpoint import OVERFLOW_MODES, ROUNDING_MODES
from ..fixedpoint.qformat import CALIBRATIONS
from .common import add_data_option

__all__ = ["add_export_commands", "cmd_export", "cmd_verify", "cmd_nir", "cmd_c_header", "cmd_firmware"]


def add_export_commands(subparsers):
    """export, verify, nir, c-header and firmware, added to bll-ref's sub-parsers."""
    p = subparsers.add_parser("export", help="export a checkpoint as one fixed-point HDF5 file "
                              "(float + integer weights, calibration traces; docs/hdf5-format.md)")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train")
    p.add_argument("--out", default=None, help="HDF5 file to write (default: model-w<width>.h5 next "
                   "to the checkpoint)")
    p.add_argument("--width", type=int, default=8, help="bits of weights and activations, 2..16 (8 or 16 "
                   "for typical hardware; default 8)")
    p.add_argument("--rounding", choices=ROUNDING_MODES, default="nearest",
                   help="how real values become integer codes (docs/hdf5-format.md)")
    p.add_argument("--overflow", choices=OVERFLOW_MODES, default="saturate",
                   help="codes beyond the format's range: clamp (saturate) or two's-complement wrap")
    p.add_argument("--percentile", type=float, default=99.9,
                   help="activation calibration: clip |x| at this percentile (default 99.9; 100 = no "
                   "clipping, which costs 16-20 points at 8 bits on BLL-trained MLPs whose activations "
                   "have long tails, see benchmarks/results/fixedpoint_accuracy.md)")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training examples that calibrate the activation formats (default 256)")
    p.add_argument("--calibration-method", choices=CALIBRATIONS, default=None,
                   help="activation formats: percentile (clip |x| at --percentile) or mse (least squared "
                   "quantisation error); default percentile from 8 bits up, mse below (the best measured, "
                   "benchmarks/results/fixedpoint_accuracy.md), or what finetune-q trained the checkpoint for")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="one power-of-two weight format per output channel (docs/hdf5-format.md section 12); "
                   "default off from 8 bits up, on below, or what finetune-q trained the checkpoint for")
    p.add_argument("--output-width", type=int, default=None, metavar="BITS",
                   help="bits of the model's output (logits); default 16, the best measured "
                   "(benchmarks/results/fixedpoint_accuracy.md); --output-width 8 for an all-8-bit model")
    p.add_argument("--output-calibration", choices=("range", "argmax"), default=None,
                   help="format of the output: range (as every activation) or argmax (the largest frac that holds "
                   "every calibration row's runner-up; the winner may saturate); default argmax for outputs "
                   "narrower than 16 bits with --overflow saturate, else range")
    p.add_argument("--traces", type=int, default=16, metavar="N",
                   help="calibration examples whose per-layer output codes are stored (default 16)")
    add_data_option(p, "calibration data")
    p.add_argument("--tb-dir", default=None, metavar="DIR",
                   help="also write hls4ml test vectors of the traced examples (tb_input_features.dat, "
                   "tb_output_predictions.dat) and a per-layer ap_fixed precision table to DIR "
                   "(docs/hls4ml-testbench.md)")
    p.add_argument("--tb-layout", choices=("channels_first", "channels_last"), default="channels_first",
                   help="order of image values in the test vectors (channels_last for hls4ml's "
                   "channels-last models)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("verify", help="rerun integer inference from an exported HDF5 file and "
                              "compare with its stored traces (exit 1 on any mismatch)")
    p.add_argument("file", help="HDF5 file written by bll-ref export")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="also report float vs fixed-point test accuracy when the data is available")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="use the first N test examples (default: all)")
    add_data_option(p, "test data for --accuracy")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("nir", help="write a checkpoint's network as a NIR graph file (.nir)")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train")
    p.add_argument("--out", required=True, help="NIR file to write, e.g. model.nir")
    p.add_argument("--quant", default=None, metavar="EXPORT.h5",
                   help="an HDF5 export of the same checkpoint: every node then carries its integer codes "
                   "and Q formats in metadata['quant'] (docs/nir-quant.md)")
    p.set_defaults(func=cmd_nir)

    p = subparsers.add_parser("c-header", help="write the C header + C99 golden model of an exported "
                              "HDF5 file (weights, formats, test vectors) and optionally compile and run it")
    p.add_argument("file", help="HDF5 file written by bll-ref export")
    p.add_argument("--out-dir", required=True, help="directory for NAME.h, NAME.c, NAME_test.c (created if missing)")
    p.add_argument("--name", default="bll_model", help="C identifier prefixing files, functions, macros")
    p.add_argument("--vectors", type=int, default=4, help="traced examples embedded as test vectors")
    p.add_argument("--compile", action="store_true", help="compile with the system C compiler and run the "
                   "self-test against the stored traces (exit 1 on mismatch)")
    p.set_defaults(func=cmd_c_header)

    p = subparsers.add_parser("firmware", help="cross-compile the C golden model of an exported HDF5 file for a "
                              "Cortex-M4, run it on QEMU (mps2-an386) and check every code against the file's "
                              "traces (exit 1 on any difference; docs/firmware.md)")
    p.add_argument("file", help="HDF5 file written by bll-ref export")
    p.add_argument("--workdir", required=True, help="directory for the C sources, objects, fw.elf, logs")
    p.add_argument("--name", default="bll_model", help="C identifier of the model (default bll_model)")
    p.add_argument("--samples", type=int, default=None,
                   help="stored calibration samples to run (default: all traced samples of the export)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds QEMU may run (default 120)")
    p.set_defaults(func=cmd_firmware)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def cmd_export(args):
    check_calibration(args.calibration, args.traces)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"model-w{args.width}.h5")
    _refuse_overwrite(args.checkpoint, [out])
    if args.tb_dir:
        if os.path.exists(args.tb_dir) and not os.path.isdir(args.tb_dir):
            raise ValueError(f"--tb-dir {args.tb_dir} is a file, not a directory; give a directory for "
                             "the test vectors")
        _creatable_dir("--tb-dir", args.tb_dir)  # before the .h5 is written, not after
        if os.path.isdir(args.tb_dir):
            _refuse_overwrite([args.checkpoint, out], [os.path.join(args.tb_dir, f)
                                                       for f in (INPUT_FILE, OUTPUT_FILE, PRECISION_FILE)])
    e, agree = export_checkpoint(args.checkpoint, out, width=args.width, rounding=args.rounding,
                                 overflow=args.overflow, percentile=args.percentile, n_calibration=args.calibration,
                                 n_traces=args.traces, calibration=args.calibration_method,
                                 per_channel=args.per_channel, output_width=args.output_width,
                                 output_calibration=args.output_calibration, data=args.data)
    o = e.options
    print(f"{len(e.records)} integer records (width {args.width}, {args.rounding}, {args.overflow}; "
          f"{'per-channel' if o.get('per_channel') else 'per-tensor'} weights, "
          f"{o.get('calibration', 'percentile ' + format(args.percentile, 'g'))} activations, "
          f"{e.records[-1].out_fmt.width}-bit output) calibrated on {args.calibration} examples; "
          f"float/fixed argmax agreement on them {100 * agree:.1f}%")
    print(f"wrote {out} ({_size(os.path.getsize(out))}; traces of {args.traces} examples); "
          f"check it with: bll-ref verify {out}")
    if args.tb_dir:
        paths = write_tb(e, args.tb_dir, layout=args.tb_layout)
        print("wrote hls4ml test vectors " + ", ".join(paths.values()))
    return 0


def _input_file(path):
    """An input that exists and is a regular file, said in one line before any work (a directory,
    FIFO or device gets a clear line, not HDF5's message)."""
    return regular_input(path, "file written by bll-ref export")


def _creatable_dir(option, path):
    """A directory that exists or can be created: its nearest existing ancestor is a writable
    directory (``FILE/sub`` failed only after the main output was written)."""
    problem = creatable_dir_problem(path)
    if problem:
        raise ValueError(f"{option} {path}: {problem}; give a writable directory")


def _refuse_overwrite(source, outputs):
    """Never write over the file a command reads (the same file after resolving links, or a hard
    link of it); and say now, before any work, when an output cannot be written (no such
    directory; a directory, device, FIFO or socket in the way: ``bll_ref.fileio.check_output``)."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    for out in outputs:
        try:
            check_output(out, sources)
        except OSError as e:
            raise ValueError(e.strerror) from None


def _size(n):
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------
def cmd_verify(args):
    if args.limit_test is not None and args.limit_test < 1:
        raise ValueError(f"--limit-test must be >= 1, got {args.limit_test}")
    rep = hdf5.verify(_input_file(args.file))
    o = rep["options"]
    print(f"{args.file}: {hdf5.FORMAT} v{rep['format_version']}, {_size(rep['file_size'])}, "
          f"{len(rep['records'])} records, width {o.get('width')} {o.get('rounding')}/{o.get('overflow')}, "
          f"traces of {rep['n_samples']} examples ({rep['created_by']})")
    wn = max([4] + [len(r["name"]) for r in rep["records"]])
    ws = max([5] + [len(str(tuple(r["shape"]))) for r in rep["records"]])
    wf = max([6] + [len(r["format"]) for r in rep["records"]])
    print(f"{'#':>4}  {'kind':<11} {'name':<{wn}}  {'shape':<{ws}}  {'format':<{wf}}  {'max |diff|':>10}")
    for r in rep["records"]:
        diff = "shape!" if r["max_abs_diff"] is None else str(r["max_abs_diff"])
        flag = "" if r["n_diff"] == 0 else f"  <- {r['n_diff']} codes differ"
        print(f"{r['index']:>4}  {r['kind']:<11} {r['name']:<{wn}}  {str(tuple(r['shape'])):<{ws}}  "
              f"{r['format']:<{wf}}  {diff:>10}{flag}")
    if args.accuracy:
        _report_accuracy(args)
    n = len(rep["records"])
    if rep["ok"]:
        print(f"OK: integer inference from the file reproduces all {n} stored traces bit for bit "
              f"({rep['n_samples']} examples)")
        return 0
    worst = max((r["max_abs_diff"] or 0) for r in rep["records"])
    print(f"MISMATCH: {rep['n_mismatched']} of {n} records differ from the stored traces "
          f"(largest difference {worst} codes); the file and this bll_ref disagree")
    return 1


def _report_accuracy(args):
    e = hdf5.read(args.file)
    images = len(e.records[0]["attrs"]["shape"]) == 3
    try:
        d = training_inputs(e.meta, args.data, images, limit_train=1, limit_test=args.limit_test)
    except FileNotFoundError as err:
        print(f"accuracy: skipped ({err})")
        return
    x, y = d["x_test"][:args.limit_test], d["y_test"][:args.limit_test]
    if x.shape[1:] != tuple(e.records[0]["attrs"]["shape"]):
        print(f"accuracy: skipped (test inputs {x.shape[1:]} do not fit the model input "
              f"{tuple(e.records[0]['attrs']['shape'])})")
        return
    model, im = e.float_model(), e.integer_model()
    pf, pq = [], []
    # batches of 100: the int64 temporaries of a conv layer's output stay in cache (at 1000 the CNN's
    # integer path ran 2.5x slower, benchmarks/inference_speed.py)
    step = 100
    for i in range(0, len(x), step):
        pf.append(np.argmax(model.forward(x[i:i + step], train=False), 1))
        pq.append(np.argmax(im.infer(x[i:i + step]), 1))
    pf, pq = np.concatenate(pf), np.concatenate(pq)
    print(f"accuracy on {len(x)} test examples: float {100 * np.mean(pf == y):.2f}%, fixed point "
          f"{100 * np.mean(pq == y):.2f}% (argmax agreement {100 * np.mean(pf == pq):.2f}%)")


# ------------------------------------------------------------------------------------------------
# nir / c-header
# ------------------------------------------------------------------------------------------------
def cmd_nir(args):
    _refuse_overwrite(args.checkpoint, [args.out])
    if getattr(args, "quant", None):
        _input_file(args.quant)
        _refuse_overwrite(args.quant, [args.out])
    model, meta, _ = checkpoint.load(args.checkpoint)
    shape = (1, 28, 28) if input_kind(meta, model.config()) == "image" else (model[0][0].in_features,)
    write_nir(model, args.out, input_shape=shape, quant=getattr(args, "quant", None))
    print(f"wrote {args.out} ({_size(os.path.getsize(args.out))}"
          f"{', with integer codes from ' + args.quant if getattr(args, 'quant', None) else ''}); "
          f"read it with nir.read('{args.out}')")
    return 0


def cmd_c_header(args):
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir} is a file, not a directory")
    if args.vectors < 1:
        raise ValueError(f"--vectors must be >= 1, got {args.vectors}")
    _creatable_dir("--out-dir", args.out_dir)
    if os.path.isdir(args.out_dir):  # (write_c creates a missing one, which cannot hold the input)
        outs = [f"{args.name}{s}" for s in (".h", ".c", "_test.c")] + [f"{args.name}_test"] * args.compile
        _refuse_overwrite(args.file, [os.path.join(args.out_dir, f) for f in outs])
    if args.compile and find_c_compiler() is None:  # said before anything is written
        raise ValueError("--compile: no C compiler found ($CC, cc, gcc, clang); install one (e.g. "
                         "apt-get install gcc) or leave out --compile")
    e = hdf5.read(_input_file(args.file))
    n = max(1, min(args.vectors, e.traces[0].shape[0]))
    paths = write_c(e.records, args.out_dir, name=args.name, test_inputs=e.traces[0][:n],
                    traces=[t[:n] for t in e.traces])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not args.compile:
        return 0
    try:
        exe = compile_c(args.out_dir, name=args.name)
    except RuntimeError as err:  # the compiler failed: an environment problem (exit 2), not a mismatch
        raise ValueError(str(err).splitlines()[0]) from None
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    print(res.stdout.rstrip())
    print(f"C golden model {'matches' if res.returncode == 0 else 'DOES NOT match'} the stored traces "
          f"({n} examples, {len(e.records)} layers)")
    return 0 if res.returncode == 0 else 1


# ------------------------------------------------------------------------------------------------
# firmware
# ------------------------------------------------------------------------------------------------
def cmd_firmware(args):
    try:
        rep = run_firmware(args.file, args.workdir, name=args.name, samples=args.samples, timeout=args.timeout)
    except (FirmwareError, subprocess.SubprocessError) as err:  # build failed, toolchain missing: exit 2
        raise ValueError(str(err)) from None
    return 0 if rep["ok"] else 1
