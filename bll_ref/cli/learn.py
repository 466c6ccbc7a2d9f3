"""``bll-ref firmware-learn``: on-device block-local learning on the emulated Cortex-M4
(docs/on-device-learning.md), parsing and printing around ``exporters.learn_scenario``.

    bll-ref firmware-learn model.h5 --workdir DIR [--learn-blocks 3|2,3|all] [--lr-shift 9,8]
                           [--samples N] [--test N] [--shift contrast|dark|invert]

Exit 0 when the device's learned codes equal the Python integer twin's after every step, 1 when
they differ or the firmware faulted or hung, 2 for bad input or environment (a block that does not
exist or cannot learn, a learning rate that overflows the accumulator: nothing is written).
"""
from __future__ import annotations

import os
import sys

from exporters import hdf5
from exporters.firmware import FirmwareError
from exporters.learn_scenario import SHIFTS, learn_scenario

from ..fileio import regular_input
from ..fixedpoint.learn import parse_learn_blocks

__all__ = ["add_learn_command", "cmd_firmware_learn"]


def add_learn_command(subparsers):
    p = subparsers.add_parser("firmware-learn", help="adapt an exported MLP to a shifted domain on the emulated "
                              "Cortex-M4 with the integer BLL update, checked bit for bit against its Python twin")
    p.add_argument("file", help="HDF5 file written by bll-ref export (an MLP on Fashion-MNIST)")
    p.add_argument("--workdir", required=True, help="directory for the C sources, fw.elf and learn_report.json")
    p.add_argument("--learn-blocks", default=None, metavar="BLOCKS",
                   help="blocks that learn on the device, counted from 1: e.g. 3, 2,3 or all (default: the "
                   "last block). A hidden block learns from the Gaussian term against its label's feedback "
                   "message, the last block from softmax cross-entropy")
    p.add_argument("--lr-shift", default="8", metavar="S",
                   help="learning rate 2**-S: one S for every learned block, or one per block (e.g. 9,8)")
    p.add_argument("--samples", type=int, default=1000, metavar="N",
                   help="labelled shifted samples the device learns from")
    p.add_argument("--test", type=int, default=2000, metavar="N", help="held-out test images for the accuracies")
    p.add_argument("--shift", choices=sorted(SHIFTS), default="contrast", help="the deployment domain's shift")
    p.add_argument("--dump-every", type=int, default=100, metavar="K",
                   help="the device prints every learned code every K steps (a hash of them every step)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="QEMU time limit in seconds")
    p.set_defaults(func=cmd_firmware_learn)


def _shifts(text, n):
    try:
        parts = [int(s) for s in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, n):
        raise ValueError(f"--lr-shift must be one integer or one per learned block ({n}), got {text!r}")
    return parts * (n if len(parts) == 1 else 1)


def cmd_firmware_learn(args):
    regular_input(args.file, "export file")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir {args.workdir} exists and is not a directory")
    e = hdf5.read(args.file)
    n_blocks = len({r.block for r in e.records if r.block is not None and r.block >= 0})
    blocks = parse_learn_blocks(args.learn_blocks if args.learn_blocks is not None else str(n_blocks), n_blocks)
    shifts = _shifts(args.lr_shift, len(blocks))
    if args.dump_every < 1:
        raise ValueError(f"--dump-every must be >= 1, got {args.dump_every}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        rep = learn_scenario(args.file, args.workdir, learn_blocks=blocks, lr_shifts=shifts, n_samples=args.samples,
                             n_test=args.test, shift=args.shift, dump_every=args.dump_every, timeout=args.timeout)
    except FirmwareError as err:
        print(f"bll-ref firmware-learn: error: {err}", file=sys.stderr)
        return 2
    _print(rep)
    return 0 if rep["bit_exact"] else 1


def _print(rep):
    a, ram, lo = rep["accuracy"], rep["ram"], rep["learn_object"]
    for r in rep["rules"]:
        print(f"block {r['block']}: {r['kind']}, learning rate 2**-{r['lr_shift']} "
              f"(weight update shift {r['w_shift']}, bias {r['c_shift']})")
    if rep["bit_exact"]:
        print(f"bit-exact: every learned code equals the Python twin's after each of {rep['steps']} steps "
              f"(per-step hashes; {rep['dumped_codes']:,} codes compared one by one)")
    else:
        print(f"MISMATCH: {rep['problem']}")
    li, lf = rep["loss_first_tenth"], rep["loss_last_tenth"]
    if li["integer"] is not None:
        print(f"loss (cross-entropy, first -> last tenth of the samples): integer {li['integer']:.3f} -> "
              f"{lf['integer']:.3f}, float twin {li['float']:.3f} -> {lf['float']:.3f}")
    print(f"accuracy on {rep['n_test']} test images: unshifted {100 * a['unshifted']:.1f} %, shifted "
          f"{100 * a['before']:.1f} % -> {100 * a['after']:.1f} % (float twin {100 * a['float_before']:.1f} % -> "
          f"{100 * a['float_after']:.1f} %; integer and float agree on {100 * rep['predictions_agree']:.1f} % of "
          f"the predictions); unshifted after {100 * a['after_unshifted']:.1f} %")
    print(f"RAM of the update beside inference: {ram['bll']:,} B = learned weights and biases "
          f"{ram['weights_and_biases']:,} B + buffers {ram['bll_buffers']} B; backprop of the same blocks "
          f"{ram['backprop']:,} B (buffers {ram['backprop_buffers']} B); stack <= {lo['stack_bound']} B")
    print(f"flash: learn + model object {lo['text']:,} B (code {lo['code']:,} B, weights and tables {lo['const']:,} B)")
    if "instructions_per_update" in rep:
        i = rep["instructions_per_update"]
        print(f"time: {i['mean']:,} Cortex-M4 instructions per update (inference {rep['instructions_per_inference']:,} "
              f"+ learning; range {i['min']:,}..{i['max']:,}); QEMU {rep['qemu_wall_s']:.2f} s wall")
    print(f"bar (A - B) >= (U - B) / 2: {'met' if rep['bar_met'] else 'NOT met'}")
    print(rep["summary"])
