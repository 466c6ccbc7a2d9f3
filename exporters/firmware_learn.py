"""On-device learning on the emulated Cortex-M4, checked step by step against the Python twin.

    rep = run_learn(im, spec, workdir, x_codes, labels)    # im, spec from fixedpoint.learn.plan_learning

1. ``exporters.c_learn.write_learn_c`` writes the golden model with writable learned arrays and
   ``bll_learn_step``; ``fw_learn_data.h`` the labelled samples (input codes and labels, in flash).
2. ``exporters.firmware.compile_and_link`` builds ``fw.elf`` from ``<name>_learn.c`` (which includes
   the model) and ``firmware/learn_harness.c``.
3. QEMU's mps2-an386 runs it: after every step the device prints the instructions it took and a
   hash of every learned array, every ``dump_every`` steps and at the end every learned code.
4. The Python integer twin (``fixedpoint.learn.learn_step``) runs the same samples; every hash and
   every dumped code must be equal.  ``im`` ends with the twin's weights (= the device's when
   ``rep["bit_exact"]``).  ``workdir/learn_report.json`` holds the report.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from bll_ref.fileio import atomic_open, check_output, write_json_atomic
from bll_ref.fixedpoint.learn import learn_step, learned_arrays

from .c_learn import write_learn_c
from .firmware import (FIRMWARE_DIR, INSNS_PER_TICK, _first_line, _size_berkeley, _size_sections, _stack_bound,
                       check_workdir, compile_and_link, find_toolchain, qemu_problem, run_qemu)

__all__ = ["weights_hash", "twin_run", "update_ram", "check_samples", "build_learn", "parse_learn_output",
           "run_learn", "LEARN_WORKFILES"]

LEARN_WORKFILES = ("fw_learn_data.h", "learn_harness.o", "learn_harness.su", "learn_qemu.out", "learn_report.json")
_SEED, _A, _C, _M = 0x9E3779B97F4A7C15, 6364136223846793005, 1442695040888963407, (1 << 64) - 1
_K_CACHE = {}


def _keys(n):
    """K_k = s_k | 1 of the harness's LCG (firmware/learn_harness.c), as uint64."""
    if n not in _K_CACHE:
        s, out = _SEED, np.empty(n, np.uint64)
        for k in range(n):
            out[k] = s | 1
            s = (s * _A + _C) & _M
        _K_CACHE[n] = out
    return _K_CACHE[n]


def weights_hash(codes) -> int:
    """sum_k code_k * K_k mod 2**64, as the device computes it (learn_harness.c)."""
    c = np.asarray(codes, np.int64).reshape(-1).view(np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(c * _keys(len(c)), dtype=np.uint64))


def check_samples(im, spec, x_codes, labels):
    """``(x, labels)``: int64 ``(n, *input_shape)`` codes and ``(n,)`` labels, after the checks
    bll_learn_step makes:
    ValueError for a label outside the classes or codes outside the input format."""
    x = np.asarray(x_codes)
    y = np.asarray(labels)
    shape = tuple(im.records[0].shape)
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape or len(x) == 0 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"on-device samples must be integer codes (n, {', '.join(map(str, shape))}), "
                         f"got {x.shape} {x.dtype}")
    f = im.input_fmt
    if x.min() < f.min_code or x.max() > f.max_code:
        raise ValueError(f"on-device samples have codes outside the input format {f.hls_type}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be ({len(x)},) integers, got {y.shape} {y.dtype}")
    bad = np.flatnonzero((y < 0) | (y >= spec.n_classes))
    if bad.size:
        raise ValueError(f"label {int(y[bad[0]])} of sample {int(bad[0])} is outside the classes "
                         f"0..{spec.n_classes - 1}; nothing written")
    return x.astype(np.int64), y.astype(np.int64)


def twin_run(im, spec, x_codes, labels, dump_every) -> dict:
    """The Python integer twin over the samples (updates ``im`` in place): per-step hashes
    (n, arrays) of Python ints, the dumps {step: [codes per array]}, per-step losses."""
    n = len(x_codes)
    hashes, dumps, losses = [], {}, []
    for s in range(n):
        r = learn_step(im, spec, x_codes[s:s + 1], int(labels[s]))
        losses.append(r["loss"])
        arrs = learned_arrays(im, spec)
        hashes.append([weights_hash(a) for _, a in arrs])
        if (s + 1) % dump_every == 0 or s == n - 1:
            dumps[s] = [a.copy() for _, a in arrs]
    return {"hashes": hashes, "dumps": dumps, "losses": losses}


def update_ram(im, spec) -> dict:
    """RAM of the on-device BLL update beside the golden model's inference, and of a backprop
    update of the same blocks (docs/on-device-learning.md, "Memory"): both keep the learned
    weights (int16) and biases (int64) in RAM and read activations from the inference's trace;
    BLL adds only the output block's Q15 error vector (a hidden block recomputes its error per
    unit), while backprop also needs dL/dh (int32) of every layer from the lowest learned block up,
    two at a time (the error it is computing and the one it came from)."""
    params = sum(im.records[r.record].W.size * 2 + im.records[r.record].c.size * 8 for r in spec.rules)
    bll_buf = max([4 * im.records[r.record].c.size if r.kind == "softmax_ce" else 0 for r in spec.rules])
    lowest = min(r.record for r in spec.rules)
    dense_above = [i for i, rec in enumerate(im.records) if i >= lowest and rec.kind == "dense"]
    sizes = [4 * im.records[i].c.size for i in dense_above]          # dL/d(output) of each dense, int32
    bp_buf = max([sizes[k] + sizes[k + 1] for k in range(len(sizes) - 1)] + [sizes[-1]])
    return {"weights_and_biases": int(params), "bll_buffers": int(bll_buf), "backprop_buffers": int(bp_buf),
            "bll": int(params + bll_buf), "backprop": int(params + bp_buf)}


def build_learn(im, spec, workdir, x_codes, labels, *, name="bll_model", dump_every=50, tools=None) -> dict:
    """Check everything, then write the sources into ``workdir`` and build ``fw.elf``.  Returns the
    elf path and the learn object's sizes.  ValueError (nothing written) for bad samples or labels."""
    x, y = check_samples(im, spec, x_codes, labels)
    if isinstance(dump_every, bool) or not isinstance(dump_every, int) or dump_every < 1:
        raise ValueError(f"dump_every must be a positive integer, got {dump_every!r}")
    check_workdir(workdir, name)
    for f in LEARN_WORKFILES + (f"{name}_learn.h", f"{name}_learn.c", f"{name}_learn.o", f"{name}_learn.su"):
        if not os.path.isdir(workdir):
            break
        try:
            check_output(os.path.join(workdir, f), ())
        except OSError as e:
            raise ValueError(e.strerror) from None
    tools = tools or find_toolchain()
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    write_learn_c(im, spec, out, name=name, test_inputs=x[:1])
    ctype = {1: "int8_t", 2: "int16_t"}.get(im.input_fmt.code_dtype.itemsize, "int32_t")
    if not im.input_fmt.signed:
        ctype = "u" + ctype
    rows = ",\n".join("{" + ",".join(map(str, r)) + "}" for r in x.reshape(len(x), -1).tolist())
    P = name.upper()
    with atomic_open(out / "fw_learn_data.h", "w") as f:
        f.write(f"/* fw_learn_data.h: generated by exporters/firmware_learn.py for firmware/learn_harness.c:\n"
                f"   {len(x)} labelled on-device samples (input codes, labels) for {name}. */\n"
                f"#ifndef FW_LEARN_DATA_H\n#define FW_LEARN_DATA_H\n#include \"{name}_learn.h\"\n"
                f"#define FW_RUN {name}_run\n#define FW_TRACE_SIZE {P}_TRACE_SIZE\n"
                f"#define FW_INPUT_SIZE {P}_INPUT_SIZE\n#define FW_N_STEPS {len(x)}\n"
                f"#define FW_DUMP_EVERY {dump_every}\n"
                f"static const {ctype} fw_x[FW_N_STEPS][FW_INPUT_SIZE] = {{\n{rows}\n}};\n"
                f"static const int16_t fw_y[FW_N_STEPS] = {{{','.join(map(str, y.tolist()))}}};\n#endif\n")
    elf = out / "fw.elf"
    objs = compile_and_link([(out / f"{name}_learn.c", ["-fstack-usage"]),
                             (FIRMWARE_DIR / "learn_harness.c", [f"-I{out}"])], elf, tools=tools)
    size = tools["arm-none-eabi-size"]
    sec = _size_sections(size, objs[0])
    stack, _ = _stack_bound(out / f"{name}_learn.su")
    return {"elf": elf, "gcc": _first_line([tools["arm-none-eabi-gcc"], "--version"]),
            "learn_object": {**_size_berkeley(size, objs[0]),
                             "code": sum(v for k, v in sec.items() if k.startswith(".text")),
                             "const": sum(v for k, v in sec.items() if k.startswith(".rodata")),
                             "stack_bound": stack}}


def parse_learn_output(text, n_steps, sizes, dump_steps):
    """(forward ticks, (n,) step ticks, hashes [[int]], dumps {step: [int64 arrays]}) from what
    learn_harness.c printed; ValueError naming the first line that does not fit."""
    ticks = np.full(n_steps, -1, np.int64)
    hashes, dumps, fwd, done = [None] * n_steps, {}, None, False
    for ln in text.splitlines():
        f = ln.split()
        if not f:
            continue
        try:
            if f[0] == "F" and len(f) == 2:
                fwd = int(f[1])
            elif f[0] == "S" and len(f) == 3 + len(sizes):
                s = int(f[1])
                ticks[s], hashes[s] = int(f[2]), [int(h, 16) for h in f[3:]]
            elif f[0] == "W" and len(f) >= 3:
                s, a = int(f[1]), int(f[2])
                row = np.array([int(v) for v in f[3:]], np.int64)
                if row.size != sizes[a]:
                    raise ValueError
                dumps.setdefault(s, [None] * len(sizes))[a] = row
            elif f[0] == "DONE" and f[1:] == [str(n_steps)]:
                done = True
            else:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"unexpected firmware output: {ln[:120]!r}") from None
    if not done or fwd is None or (ticks < 0).any() or set(dumps) != set(dump_steps) \
            or any(r is None for d in dumps.values() for r in d):
        raise ValueError("firmware output ends early (no DONE line, a step or a dump missing)")
    return fwd, ticks, hashes, dumps


def run_learn(im, spec, workdir, x_codes, labels, *, name="bll_model", dump_every=50, timeout=600.0,
              log=print) -> dict:
    """Build, run on QEMU, run the Python twin, compare; see the module docstring.  Returns the
    report (``bit_exact``, instructions, memory); ``im`` ends with the twin's weights."""
    tools = find_toolchain()
    x, y = check_samples(im, spec, x_codes, labels)
    b = build_learn(im, spec, workdir, x, y, name=name, dump_every=dump_every, tools=tools)
    text, rc, wall = run_qemu(b["elf"], timeout=timeout, qemu=tools["qemu-system-arm"])
    with atomic_open(pathlib.Path(workdir) / "learn_qemu.out", "w") as f:
        f.write(text)
    n = len(x)
    twin = twin_run(im, spec, x, y, dump_every)
    sizes = [a.size for _, a in learned_arrays(im, spec)]
    rep = {"machine": "mps2-an386", "cpu": "cortex-m4", "gcc": b["gcc"], "steps": n,
           "learn_blocks": [r.block + 1 for r in spec.rules],
           "rules": [{"block": r.block + 1, "record": r.record, "kind": r.kind, "lr_shift": r.lr_shift,
                      "w_shift": r.w_shift, "c_shift": r.c_shift} for r in spec.rules],
           "learn_object": b["learn_object"], "ram": update_ram(im, spec), "qemu_wall_s": round(wall, 3),
           "qemu_exit": rc, "twin_losses": twin["losses"]}
    problem = qemu_problem(rc, text, f"{timeout:g} s", f"{workdir}/learn_qemu.out")
    if problem is None:
        try:
            fwd, ticks, hashes, dumps = parse_learn_output(text, n, sizes, twin["dumps"].keys())
        except ValueError as err:
            problem = f"{err} (in {workdir}/learn_qemu.out)"
    if problem is None:
        rep["instructions_per_inference"] = int(fwd) * INSNS_PER_TICK
        ins = ticks * INSNS_PER_TICK
        rep["instructions_per_update"] = {"mean": round(float(ins.mean())), "min": int(ins.min()),
                                          "max": int(ins.max())}
        bad_steps = [s for s in range(n) if hashes[s] != twin["hashes"][s]]
        bad_codes = sum(int(np.count_nonzero(d != w)) for s in dumps for d, w in zip(dumps[s], twin["dumps"][s]))
        rep["steps_differing"], rep["dumped_codes_differing"] = len(bad_steps), bad_codes
        rep["dumped_codes"] = sum(a.size for d in dumps.values() for a in d)
        if bad_steps or bad_codes:
            problem = (f"the device's learned codes differ from the Python twin: {len(bad_steps)} of {n} steps "
                       f"(first {bad_steps[:1]}), {bad_codes} dumped codes")
    rep["bit_exact"], rep["problem"] = problem is None, problem
    write_json_atomic(pathlib.Path(workdir) / "learn_report.json", rep)
    return rep
