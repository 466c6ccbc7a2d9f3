"""``bll-ref qonnx``: the integer model of an export as a QONNX file (docs/qonnx.md)::

    bll-ref qonnx CHECKPOINT --quant EXPORT.h5 --out model.onnx [--batch N] [--luts table|function]

Exit 0 when written (``onnx.checker`` accepted it), 2 for bad input or environment: an export of
another checkpoint, a record QONNX cannot express exactly (wrapping formats, accumulators beyond
float32's 24 bits), onnx not installed; one line, and nothing written.
"""
from __future__ import annotations

import os

import numpy as np

from exporters import hdf5
from exporters.qonnx import LUT_MODES, write_qonnx

from .. import checkpoint
from ..fileio import check_output, regular_input
from ..layers import state_dict

__all__ = ["add_qonnx_command", "cmd_qonnx"]


def add_qonnx_command(subparsers):
    p = subparsers.add_parser("qonnx", help="write the integer model of an HDF5 export as QONNX (ONNX with "
                              "QONNX Quant nodes, for FINN and hls4ml's ONNX frontend; docs/qonnx.md)")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train (the export must be of it)")
    p.add_argument("--quant", required=True, metavar="EXPORT.h5", help="the HDF5 export of that checkpoint "
                   "(bll-ref export): its integer records become the graph")
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. model.onnx")
    p.add_argument("--batch", type=int, default=1, help="fixed batch dimension of the graph (default 1)")
    p.add_argument("--luts", choices=LUT_MODES, default="table",
                   help="sigmoid / tanh as their exact tables (Gather; default) or as ONNX Sigmoid / Tanh + Quant "
                   "(what hls4ml's ONNX frontend reads; not guaranteed bit-exact in float32)")
    p.set_defaults(func=cmd_qonnx)


def cmd_qonnx(args):
    for src in (args.checkpoint, args.quant):
        try:
            check_output(args.out, [src])
        except OSError as e:
            raise ValueError(e.strerror) from None
    regular_input(args.quant, "file written by bll-ref export")
    model, _, _ = checkpoint.load(args.checkpoint)
    e = hdf5.read(args.quant)
    _check_same_model(model, e, args)
    write_qonnx(e, args.out, batch=args.batch, luts=args.luts)
    n = len(e.records)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes; {n} integer records of {args.quant}, width "
          f"{e.options.get('width')} {e.options.get('rounding')}); run it with "
          "qonnx.core.onnx_exec.execute_onnx(ModelWrapper(path), {'x': x})")
    return 0


def _check_same_model(model, e, args):
    """The export holds the checkpoint's float weights (an export of another run is refused)."""
    own = state_dict(model)
    same = model.config() == e.model_config and set(own) == set(e.float_state) and all(
        np.array_equal(own[k], e.float_state[k]) for k in own)
    if not same:
        raise ValueError(f"{args.quant} was not exported from {args.checkpoint} (its float model differs); "
                         f"export this checkpoint with bll-ref export {args.checkpoint} --out EXPORT.h5")
