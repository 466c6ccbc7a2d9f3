"""The C golden model on an emulated Cortex-M4: cross-compile, run under QEMU, check every code.

    bll-ref firmware EXPORT.h5 --workdir DIR [--samples N] [--timeout S] [--name NAME]   (run_firmware)

Steps (files in DIR):

1. ``exporters.c_header.write_c`` writes the C99 golden model (``<name>.h``, ``<name>.c``); ``fw_inputs.h``
   the export's traced input codes (``ExportedModel.traces[0]``), in flash, for ``firmware/harness.c``.
2. ``arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -O2`` builds ``fw.elf`` from the model, the harness,
   ``firmware/startup.c``, ``firmware/mps2_an386.ld`` and newlib's semihosting stdio (rdimon.specs).
3. ``qemu-system-arm -M mps2-an386 -icount shift=0`` runs it (under a timeout): the Cortex-M4 prints,
   over semihosting, the SysTick ticks of each inference and the codes of EVERY record.
4. Every printed code is compared with the traces stored in the HDF5 file, and the figures are
   printed: flash and RAM (``arm-none-eabi-size``; the model object alone and the whole image),
   MACs and instructions per inference, QEMU wall time.  ``DIR/firmware_report.json`` holds them.

Exit status of ``bll-ref firmware`` (docs/firmware.md): 0 all codes equal the HDF5 traces, 1 a code
differs / the firmware faulted, hung or printed garbage, 2 bad input or environment (unreadable
export, toolchain missing: ``make firmware`` installs gcc-arm-none-eabi, newlib, qemu-system-arm).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import time

import numpy as np

from bll_ref.fileio import atomic_open, check_output, write_json_atomic
from bll_ref.fixedpoint import records as R

from . import hdf5
from .c_header import write_c

__all__ = ["FirmwareError", "ToolchainMissing", "find_toolchain", "mac_count", "planned_activation_bytes",
           "compile_and_link", "build", "run_qemu", "qemu_problem", "parse_output", "run_firmware", "check_workdir",
           "FIRMWARE_DIR", "MACHINE", "ARM_CFLAGS", "ICOUNT", "INSNS_PER_TICK"]

FIRMWARE_DIR = pathlib.Path(__file__).resolve().parent.parent / "firmware"
MACHINE = "mps2-an386"          # QEMU's ARM MPS2 board with the AN386 image: a Cortex-M4
# -icount shift=0: the virtual clock advances exactly 1 ns per guest instruction (deterministic, independent
# of the host's load); SysTick runs on the board's 25 MHz system clock (QEMU hw/arm/mps2.c SYSCLK_FRQ), so
# one tick = 40 instructions.  tests/test_firmware.py checks the ratio with a loop of known length.
ICOUNT = ("-icount", "shift=0,align=off,sleep=off")
INSNS_PER_TICK = 40
ARM_CFLAGS = ("-mcpu=cortex-m4", "-mthumb", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror",
              "-ffunction-sections", "-fdata-sections")
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
_CTYPE = {"int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "uint8": "uint8_t", "uint16": "uint16_t"}


class FirmwareError(RuntimeError):
    """The firmware could not be built (exit 2): names the step and the log to read."""


class ToolchainMissing(FirmwareError):
    """A cross tool or QEMU is not on PATH."""


def find_toolchain() -> dict:
    """Paths of arm-none-eabi-gcc, arm-none-eabi-size and qemu-system-arm; ToolchainMissing
    (naming ``make firmware``) if any is missing."""
    found = {t: shutil.which(t) for t in TOOLS}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise ToolchainMissing(f"{', '.join(missing)} not found on PATH; run `make firmware` (as root it "
                               f"installs the Debian packages {PACKAGES}) or install them yourself")
    # newlib's semihosting library for the Cortex-M4 multilib (gcc prints the bare name if absent)
    lib = subprocess.run([found["arm-none-eabi-gcc"], "-mcpu=cortex-m4", "-mthumb",
                          "-print-file-name=librdimon.a"], capture_output=True, text=True, timeout=60)
    if os.sep not in lib.stdout.strip():
        raise ToolchainMissing("newlib for arm-none-eabi (librdimon.a) not found; run `make firmware` "
                               "(installs libnewlib-arm-none-eabi) or install it yourself")
    return found


# ---------------- MACs
def _taps(n_out, k, s, p, n_in):
    """Sum over output positions of the kernel taps that fall inside the input (not padding)."""
    o = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] - p
    return int(np.count_nonzero((o >= 0) & (o < n_in)))


def mac_count(records, shapes) -> dict:
    """Multiply-accumulates of one inference, per record index, as the C golden model does them.

    Dense: in * out; Conv2d: out_channels * in_channels * the in-bounds taps (the C skips zero
    padding); Scale (a BatchNorm on its own): one per element.  Other records do no MACs (the
    per-element multiply of LeakyReLU and AvgPool2d's division by the window size are not counted).

    records : list of Record; shapes : per-record output shape without the batch axis.
    """
    macs = {}
    for i, rec in enumerate(records):
        if isinstance(rec, R.Dense):
            macs[i] = int(rec.W.shape[0] * rec.W.shape[1])
        elif isinstance(rec, R.Conv2d):
            co, ci, kh, kw = rec.W.shape
            _, h, w = shapes[rec.inputs[0]]
            _, ho, wo = shapes[i]
            (sh, sw), (ph, pw) = rec.stride, rec.padding
            macs[i] = int(co * ci * _taps(ho, kh, sh, ph, h) * _taps(wo, kw, sw, pw, w))
        elif isinstance(rec, R.Scale):
            macs[i] = int(np.prod(shapes[i]))
    return macs


def planned_activation_bytes(records, shapes) -> int:
    """Peak activation memory of a deployment that frees each record's codes after their last use
    and packs a code in 1, 2 or 4 bytes (width <= 8, <= 16, else): the largest, over records i, of
    the bytes of record i plus those of every earlier record still needed by i or a later record.
    An estimate (no in-place ReLU / Flatten, no buffer reuse within a layer); the golden model
    itself keeps every record, as int32, in one trace buffer."""
    last = list(range(len(records)))
    last[-1] = len(records)                        # the output outlives the run
    for i, rec in enumerate(records):
        for j in rec.inputs:
            last[j] = max(last[j], i)
    nbytes = [int(np.prod(s)) * (1 if r.out_fmt.width <= 8 else 2 if r.out_fmt.width <= 16 else 4)
              for r, s in zip(records, shapes)]
    return max(sum(nbytes[j] for j in range(i) if last[j] >= i) + nbytes[i] for i in range(len(records)))


# ---------------- build
def _inputs_header(name, x) -> str:
    """fw_inputs.h: the model's header, the FW_* names harness.c uses, and the input codes."""
    P = name.upper()
    ctype = _CTYPE.get(x.dtype.name, "int32_t")
    flat = x.reshape(len(x), -1).astype(np.int64)
    rows = ",\n".join("    {" + ", ".join(str(v) if v > -(1 << 31) else "(-2147483647 - 1)" for v in r) + "}"
                      for r in flat.tolist())
    return (f"/* fw_inputs.h: generated by exporters/firmware.py for firmware/harness.c: {len(x)} stored\n"
            f"   calibration input samples of the export (codes of record 0), model {name}. */\n"
            f"#ifndef FW_INPUTS_H\n#define FW_INPUTS_H\n#include \"{name}.h\"\n"
            f"#define FW_RUN {name}_run\n#define FW_N_RECORDS {P}_N_RECORDS\n"
            f"#define FW_TRACE_SIZE {P}_TRACE_SIZE\n#define FW_INPUT_SIZE {P}_INPUT_SIZE\n"
            f"#define FW_OFFSETS {name}_offsets\n#define FW_N_SAMPLES {len(x)}\n"
            f"static const {ctype} fw_input[FW_N_SAMPLES][FW_INPUT_SIZE] = {{\n{rows}\n}};\n"
            f"#endif\n")


def _tool(cmd, log, what):
    """Run one build command, append it and its output to ``log``; FirmwareError if it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        first = next((ln for ln in res.stderr.splitlines() if "error" in ln.lower()),
                     (res.stderr.strip().splitlines() or ["no message"])[0])
        hint = ("; is libnewlib-arm-none-eabi installed? (`make firmware`)" if "rdimon" in res.stderr
                or "stdio.h" in res.stderr else "")
        raise FirmwareError(f"{what} failed (exit {res.returncode}): {first.strip()}{hint} (full log: {log})")
    return res.stdout


def _size_berkeley(size_tool, path):
    """text, data, bss of an object or ELF (arm-none-eabi-size, Berkeley format)."""
    out = subprocess.run([size_tool, str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def _size_sections(size_tool, path):
    """{section name: bytes} of an object file (arm-none-eabi-size -A)."""
    out = subprocess.run([size_tool, "-A", str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    sections = {}
    for ln in out.splitlines():
        m = re.match(r"(\.\S+)\s+(\d+)\s+\d+\s*$", ln)
        if m:
            sections[m.group(1)] = int(m.group(2))
    return sections


def _stack_bound(su_path):
    """Sum of the stack frames of every function in a -fstack-usage file: an upper bound on the
    model's stack depth (no recursion, so no function is twice on one call chain)."""
    total, static = 0, True
    for ln in pathlib.Path(su_path).read_text().splitlines():
        parts = ln.rsplit("\t", 2)
        if len(parts) == 3:
            total += int(parts[1])
            static &= parts[2].strip() == "static"
    return total, static


def compile_and_link(sources, elf, *, tools=None) -> list:
    """Cross-compile ``sources`` (list of (path, extra gcc flags)) and firmware/startup.c for the
    Cortex-M4 and link them with firmware/mps2_an386.ld and newlib's semihosting stdio into
    ``elf``.  Objects, ``build.log`` and the link map go next to ``elf``; returns the object paths
    (startup.o last).  FirmwareError naming the failing step and the log."""
    tools = tools or find_toolchain()
    out = pathlib.Path(elf).parent
    log = out / "build.log"
    log.write_text("")
    gcc, objs = tools["arm-none-eabi-gcc"], []
    for src, extra in [*sources, (FIRMWARE_DIR / "startup.c", [])]:
        obj = out / (pathlib.Path(src).stem + ".o")
        _tool([gcc, *ARM_CFLAGS, *extra, "-c", str(src), "-o", str(obj)], log, f"arm-none-eabi-gcc {src}")
        objs.append(obj)
    # -nostartfiles: startup.c is the start-up code (no crt0); rdimon.specs links newlib + librdimon
    _tool([gcc, "-mcpu=cortex-m4", "-mthumb", "--specs=rdimon.specs", "-nostartfiles",
           "-T", str(FIRMWARE_DIR / "mps2_an386.ld"), "-Wl,--gc-sections", f"-Wl,-Map={out / 'fw.map'}",
           *map(str, objs), "-o", str(elf)], log, f"linking {elf}")
    return objs


def check_workdir(workdir, name="bll_model", inputs=()):
    """Before any work: every file the build and the run write in ``workdir`` that exists already
    must be a regular file (no device, FIFO, socket or directory) and none of ``inputs``;
    ValueError naming the path otherwise."""
    if not os.path.isdir(workdir):
        return
    names = [f"{name}{s}" for s in (".h", ".c", "_test.c", ".o", ".su")] + [
        "fw_inputs.h", "fw.elf", "fw.map", "build.log", "harness.o", "harness.su", "startup.o",
        "startup.su", "qemu.out", "firmware_report.json"]
    for n in names:
        try:
            check_output(os.path.join(workdir, n), inputs)
        except OSError as e:
            raise ValueError(e.strerror) from None


def build(e, workdir, *, name="bll_model", samples=None, tools=None, harness_cflags=()) -> dict:
    """Write the model and the inputs into ``workdir`` and cross-compile ``fw.elf``.

    e : ExportedModel (``exporters.hdf5.read``); samples : how many stored samples to embed
    (None: all); harness_cflags : extra flags for harness.c (e.g. ``-DSYST_PERIOD=4096``).
    Returns a dict: elf path, the samples' input codes, sizes of the model object and of the
    image, stack bound.  FirmwareError if a step fails (its log is ``build.log``).
    """
    check_workdir(workdir, name)
    tools = tools or find_toolchain()
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(e.traces[0]) if samples is None else samples
    if not 1 <= n <= len(e.traces[0]):
        raise ValueError(f"--samples must be 1..{len(e.traces[0])} (the traced samples of the export), got {n}")
    x = e.traces[0][:n]
    # one test vector in the header is enough: the harness runs fw_inputs.h, the host checks
    write_c(e.records, out, name=name, test_inputs=x[:1], traces=[t[:1] for t in e.traces])
    with atomic_open(out / "fw_inputs.h", "w") as f:
        f.write(_inputs_header(name, x))
    elf = out / "fw.elf"
    objs = compile_and_link([(out / f"{name}.c", ["-fstack-usage"]),
                             (FIRMWARE_DIR / "harness.c", [f"-I{out}", *harness_cflags])], elf, tools=tools)
    size = tools["arm-none-eabi-size"]
    sec = _size_sections(size, objs[0])
    stack, static = _stack_bound(out / f"{name}.su")
    return {"elf": elf, "inputs": x, "gcc": _first_line([tools["arm-none-eabi-gcc"], "--version"]),
            "model_object": {**_size_berkeley(size, objs[0]),
                             "code": sum(v for k, v in sec.items() if k.startswith(".text")),
                             "const": sum(v for k, v in sec.items() if k.startswith(".rodata")),
                             "stack_bound": stack, "stack_static": static},
            "image": _size_berkeley(size, elf)}


def _first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


# ---------------- run and check
def run_qemu(elf, *, timeout=120.0, qemu="qemu-system-arm"):
    """Run ``elf`` on QEMU's mps2-an386 with semihosting and instruction counting (ICOUNT): (stdout,
    exit status or None on timeout, wall s); UART and monitor off: stdout is what semihosting printed."""
    cmd = [qemu, "-M", MACHINE, "-nographic", "-monitor", "none", "-serial", "null", *ICOUNT,
           "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return out, None, time.perf_counter() - t
    return res.stdout + res.stderr, res.returncode, time.perf_counter() - t


def qemu_problem(rc, text, limit, out_file):
    """Why a run of ``run_qemu`` failed, in one line (a time-out: rc None; a FAULT / ERROR line; a
    non-zero exit), or None."""
    if rc is None:
        return f"QEMU did not finish within {limit}; its output is in {out_file}"
    bad = [ln.strip() for ln in text.splitlines() if "FAULT" in ln or "ERROR" in ln]
    return bad[0] if bad else None if rc == 0 else f"QEMU exited with status {rc}; its output is in {out_file}"


def parse_output(text, n_samples, sizes):
    """What the firmware printed (the protocol of firmware/harness.c): ``(codes, ticks)``, codes a
    list (one per record) of (n_samples, size) int64 arrays, ticks the (n_samples,) SysTick ticks
    of each inference.  ValueError naming the first line that does not fit."""
    codes = [np.zeros((n_samples, s), np.int64) for s in sizes]
    seen = np.zeros((n_samples, len(sizes)), bool)
    ticks = np.full(n_samples, -1, np.int64)
    done = False
    for ln in text.splitlines():
        if not ln.strip():
            continue
        f = ln.split()
        if f[0] == "DONE" and len(f) == 2 and f[1] == str(n_samples):
            done = True
            continue
        if f[0] == "C" and len(f) == 3 and f[1].isdigit() and f[2].isdigit() and int(f[1]) < n_samples:
            ticks[int(f[1])] = int(f[2])
            continue
        try:
            if f[0] != "T" or len(f) < 3:
                raise ValueError
            s, r = int(f[1]), int(f[2])
            row = np.array([int(v) for v in f[3:]], np.int64)
        except ValueError:
            raise ValueError(f"unexpected firmware output: {ln[:120]!r}") from None
        if not (0 <= s < n_samples and 0 <= r < len(sizes)) or len(row) != sizes[r] or seen[s, r]:
            raise ValueError(f"unexpected firmware output line for sample {s} record {r} ({len(row)} codes)")
        codes[r][s] = row
        seen[s, r] = True
    if not done or not seen.all() or (ticks < 0).any():
        missing = np.argwhere(~seen)
        where = (f"sample {missing[0][0]} record {missing[0][1]}" if len(missing) else
                 f"tick count of sample {np.argmax(ticks < 0)}" if (ticks < 0).any() else "DONE line")
        raise ValueError(f"firmware output ends early: no {where}")
    return codes, ticks


def run_firmware(path, workdir, *, name="bll_model", samples=None, timeout=120.0, log=print,
                 harness_cflags=()) -> dict:
    """Build the firmware of the export at ``path`` in ``workdir``, run it under QEMU and compare
    every printed code with the file's traces.  Returns the report (also written to
    ``workdir/firmware_report.json``); ``report["ok"]`` is True iff every code matches.
    ToolchainMissing / FirmwareError / ValueError for the exit-2 cases."""
    check_workdir(workdir, name, inputs=[path])
    tools = find_toolchain()
    e = hdf5.read(path)
    b = build(e, workdir, name=name, samples=samples, tools=tools, harness_cflags=harness_cflags)
    n = len(b["inputs"])
    shapes = [tuple(t.shape[1:]) for t in e.traces]
    sizes = [int(np.prod(s)) for s in shapes]
    macs = mac_count(e.records, shapes)
    text, rc, wall = run_qemu(b["elf"], timeout=timeout, qemu=tools["qemu-system-arm"])
    with atomic_open(pathlib.Path(workdir) / "qemu.out", "w") as f:
        f.write(text)
    rep = {"export": os.fspath(path), "machine": MACHINE, "cpu": "cortex-m4", "gcc": b["gcc"],
           "cflags": list(ARM_CFLAGS), "qemu": _first_line([tools["qemu-system-arm"], "--version"]),
           "n_samples": n, "n_records": len(e.records), "trace_size": sum(sizes),
           "macs_per_inference": sum(macs.values()),
           "macs_by_record": {f"{i} {e.records[i].kind} {e.records[i].name}": m for i, m in macs.items()},
           "model_object": b["model_object"], "image": b["image"], "ram_trace_buffer": 4 * sum(sizes),
           "ram_planned_activations": planned_activation_bytes(e.records, shapes),
           "qemu_wall_s": round(wall, 3), "qemu_exit": rc}
    problem = qemu_problem(rc, text, f"{timeout:g} s (--timeout)", f"{workdir}/qemu.out")
    if problem is None:
        try:
            got, ticks = parse_output(text, n, sizes)
            insns = ticks * INSNS_PER_TICK
            rep["instructions_per_inference"] = {"min": int(insns.min()), "max": int(insns.max()),
                                                 "mean": round(float(insns.mean()))}
        except ValueError as err:
            problem = f"{err} (in {workdir}/qemu.out)"
    if problem is None:
        want = [np.asarray(t[:n]).reshape(n, -1).astype(np.int64) for t in e.traces]
        rep["mismatches_by_record"] = {f"{i} {r.kind} {r.name}": int(np.count_nonzero(g != w))
                                       for i, (r, g, w) in enumerate(zip(e.records, got, want))}
        n_diff = sum(rep["mismatches_by_record"].values())
        if n_diff:
            problem = (f"{n_diff} of {n * sum(sizes)} codes differ from the HDF5 traces "
                       f"(per record: {rep['mismatches_by_record']})")
    rep["ok"], rep["problem"] = problem is None, problem
    write_json_atomic(pathlib.Path(workdir) / "firmware_report.json", rep)
    _print_report(rep, e, shapes, log)
    return rep


def _print_report(rep, e, shapes, log):
    mo, im = rep["model_object"], rep["image"]
    log(f"firmware: QEMU {rep['machine']} (Cortex-M4), {rep['gcc']}, {' '.join(rep['cflags'][:4])}")
    log(f"model: {rep['n_records']} records, input {shapes[0]} -> output {shapes[-1]}; "
        f"{rep['macs_per_inference']:,} MACs per inference")
    log(f"flash: model {mo['text'] + mo['data']:,} B (code {mo['code']:,} B, weights and tables "
        f"{mo['const']:,} B); whole image {im['text'] + im['data']:,} B (with startup, newlib printf, "
        f"{rep['n_samples']} input samples)")
    log(f"RAM:   model {rep['ram_trace_buffer'] + mo['data'] + mo['bss']:,} B (int32 trace buffer of every "
        f"record) + stack <= {mo['stack_bound']} B; whole image .data+.bss {im['data'] + im['bss']:,} B; "
        f"a deployment freeing codes after their last use: ~{rep['ram_planned_activations']:,} B")
    ins = rep.get("instructions_per_inference")
    if ins:
        log(f"time:  {ins['mean']:,} Cortex-M4 instructions per inference (QEMU -icount, +-{INSNS_PER_TICK}; "
            f"{ins['mean'] / max(1, rep['macs_per_inference']):.1f} per MAC; range {ins['min']:,}..{ins['max']:,})")
    log(f"QEMU:  {rep['n_samples']} inferences in {rep['qemu_wall_s']:.2f} s wall (with QEMU start-up "
        f"and the printing of every code)")
    if rep["ok"]:
        log(f"OK: the Cortex-M4 reproduces all {rep['n_samples'] * rep['trace_size']:,} codes "
            f"({rep['n_records']} records x {rep['n_samples']} samples) of the HDF5 traces bit for bit")
    else:
        log(f"MISMATCH: {rep['problem']}")
