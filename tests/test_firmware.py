"""The C golden model on an emulated Cortex-M4 (QEMU mps2-an386): exporters.firmware, ``bll-ref firmware``.

The tests that build firmware need arm-none-eabi-gcc, newlib and qemu-system-arm (`make firmware`
installs them); without them they skip, unless BLL_REQUIRE_FIRMWARE=1 (set by .ci/run), where a
missing toolchain is a failure.  Every QEMU run has a timeout.
"""
import dataclasses
import json

import numpy as np
import pytest

import test_export_golden as golden  # noqa: E402  (tests/ is on sys.path: conftest.py)
from bll_ref import layers as L
from bll_ref.cli import main as cli_main
from bll_ref.fixedpoint import records as R
from exporters import firmware, hdf5

QEMU_TIMEOUT = 120.0


def _export(tmp_path, which, width=8, rounding="nearest", overflow="saturate", n_traces=6):
    """An export of one of test_export_golden's models (together they hold every record kind)."""
    build, shape, _ = golden.MODELS[which]
    x = np.random.default_rng(len(which)).normal(size=(24,) + shape).astype(np.float32)
    path = tmp_path / f"{which}-w{width}.h5"
    hdf5.export(build(), path, x, width=width, rounding=rounding, overflow=overflow, n_traces=n_traces,
                meta={"model": which})
    return path


# ------------------------------------------------------------------------------------------------
# without the toolchain
# ------------------------------------------------------------------------------------------------
def _brute_force_macs(rec, in_shape, out_shape):
    """Count the multiplies of a Conv2d by walking every output, channel and tap (no formula)."""
    co, ci, kh, kw = rec.W.shape
    _, h, w = in_shape
    _, ho, wo = out_shape
    (sh, sw), (ph, pw) = rec.stride, rec.padding
    n = 0
    for oh in range(ho):
        for ow in range(wo):
            for u in range(kh):
                for v in range(kw):
                    ih, iw = oh * sh + u - ph, ow * sw + v - pw
                    n += (0 <= ih < h) and (0 <= iw < w)
    return co * ci * n


def test_mac_count_counts_in_bounds_taps_dense_and_scale(tmp_path):
    e = hdf5.read(_export(tmp_path, "cnn_avg"))
    shapes = [t.shape[1:] for t in e.traces]
    macs = firmware.mac_count(e.records, shapes)
    want = {}
    for i, rec in enumerate(e.records):
        if isinstance(rec, R.Conv2d):
            want[i] = _brute_force_macs(rec, shapes[rec.inputs[0]], shapes[i])
        elif isinstance(rec, R.Dense):
            want[i] = shapes[rec.inputs[0]][0] * shapes[i][0]
        elif isinstance(rec, R.Scale):
            want[i] = int(np.prod(shapes[i]))
    assert macs == want
    assert any(isinstance(r, R.Conv2d) and r.padding != (0, 0) for r in e.records)   # padding is skipped
    assert any(isinstance(r, R.Scale) for r in e.records)


@pytest.mark.parametrize("which,width", [("mlp", 8), ("cnn_avg", 16), ("resnet", 8)])
def test_planned_activation_bytes_equals_an_allocate_and_free_simulation(tmp_path, which, width):
    e = hdf5.read(_export(tmp_path, which, width))
    shapes = [t.shape[1:] for t in e.traces]
    consumers = {j: [i for i, r in enumerate(e.records) if j in r.inputs] for j in range(len(e.records))}
    live, peak = {}, 0
    for i, rec in enumerate(e.records):     # allocate record i, then free what nobody needs any more
        live[i] = int(np.prod(shapes[i])) * (1 if width <= 8 else 2)
        peak = max(peak, sum(live.values()))
        for j in list(live):
            if j != len(e.records) - 1 and all(c <= i for c in consumers[j]):
                del live[j]
    assert firmware.planned_activation_bytes(e.records, shapes) == peak
    if which == "resnet":
        assert any(len(r.inputs) == 2 for r in e.records)     # a residual keeps its input alive


def test_parse_output_reads_codes_and_refuses_short_or_garbled_output():
    text = "C 0 17\nT 0 0 1 -2\nT 0 1 3\nC 1 18\nT 1 0 4 5\nT 1 1 -6\nDONE 2\n"
    got, ticks = firmware.parse_output(text, 2, [2, 1])
    assert [g.tolist() for g in got] == [[[1, -2], [4, 5]], [[3], [-6]]] and ticks.tolist() == [17, 18]
    for bad, msg in [(text.replace("DONE 2\n", ""), "ends early"),
                     (text.replace("C 1 18\n", ""), "tick count of sample 1"),
                     (text.replace("T 1 1 -6\n", ""), "sample 1 record 1"),
                     (text.replace("T 0 1 3", "T 0 1 3 4"), "2 codes"),
                     (text.replace("-6", "x6"), "unexpected firmware output"),
                     (text + "T 0 0 1 -2\n", "sample 0 record 0"),
                     ("FAULT HardFault\n" + text, "unexpected firmware output")]:
        with pytest.raises(ValueError, match=msg):
            firmware.parse_output(bad, 2, [2, 1])


def test_missing_toolchain_exits_2_with_one_line_naming_make_firmware(tmp_path, monkeypatch, capsys):
    path = _export(tmp_path, "mlp")
    monkeypatch.setattr(firmware.shutil, "which", lambda name: None)
    assert cli_main(["firmware", str(path), "--workdir", str(tmp_path / "fw")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make firmware" in err and "qemu-system-arm" in err


def test_unreadable_export_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(firmware, "find_toolchain", lambda: {})   # reached before any tool runs
    assert cli_main(["firmware", str(tmp_path / "missing.h5"), "--workdir", str(tmp_path / "fw")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.h5" in err


# ------------------------------------------------------------------------------------------------
# on the emulated Cortex-M4
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,width,rounding,overflow", [
    ("mlp", 8, "nearest", "saturate"), ("mlp_lut", 4, "floor", "wrap"),
    ("cnn", 8, "nearest_even", "saturate"), ("cnn_avg", 16, "nearest", "wrap"),
    ("resnet", 6, "floor", "saturate")])
def test_cortex_m4_reproduces_every_code_of_the_hdf5_traces(tmp_path, toolchain, which, width, rounding,
                                                            overflow, capsys):
    path = _export(tmp_path, which, width, rounding, overflow)
    rep = firmware.run_firmware(path, tmp_path / "fw", timeout=QEMU_TIMEOUT)
    # our own comparison of what the board printed with what the file holds, code by code
    e = hdf5.read(path)
    n = len(e.traces[0])
    got, ticks = firmware.parse_output((tmp_path / "fw" / "qemu.out").read_text(), n,
                                       [int(np.prod(t.shape[1:])) for t in e.traces])
    for i, (g, t) in enumerate(zip(got, e.traces)):
        assert np.array_equal(g, t.reshape(n, -1).astype(np.int64)), f"record {i} {e.records[i].kind}"
    assert rep["ok"] and rep["problem"] is None and rep["qemu_exit"] == 0 and rep["n_samples"] == n == 6
    assert set(rep["mismatches_by_record"].values()) == {0}
    assert rep["trace_size"] == sum(int(np.prod(t.shape[1:])) for t in e.traces)
    mo = rep["model_object"]
    # the weights are const (flash); the golden model keeps no state of its own in RAM
    assert mo["const"] > 0 and mo["code"] > 0 and mo["data"] == 0 and mo["bss"] == 0
    assert rep["image"]["text"] > mo["text"] and rep["image"]["bss"] >= rep["ram_trace_buffer"]
    ins = rep["instructions_per_inference"]
    assert ins["min"] == ticks.min() * firmware.INSNS_PER_TICK and ins["max"] >= ins["mean"] >= ins["min"]
    assert ins["min"] > rep["macs_per_inference"]       # at least one instruction per MAC
    assert rep["macs_per_inference"] == sum(firmware.mac_count(e.records, [t.shape[1:] for t in e.traces]).values())
    assert "OK: the Cortex-M4 reproduces all" in capsys.readouterr().out
    assert (tmp_path / "fw" / "firmware_report.json").exists()


def test_a_code_that_differs_from_the_file_exits_1_and_is_counted(tmp_path, toolchain, monkeypatch, capsys):
    path = _export(tmp_path, "mlp")
    e = hdf5.read(path)
    traces = [t.copy() for t in e.traces]
    traces[-1][2, 1] += 1                     # sample 2: write_c checks only sample 0
    monkeypatch.setattr(hdf5, "read", lambda p: dataclasses.replace(e, traces=traces))
    assert cli_main(["firmware", str(path), "--workdir", str(tmp_path / "fw"),
                     "--timeout", str(QEMU_TIMEOUT)]) == 1
    rep = json.loads((tmp_path / "fw" / "firmware_report.json").read_text())
    last = list(rep["mismatches_by_record"])[-1]
    assert rep["mismatches_by_record"][last] == 1 and sum(rep["mismatches_by_record"].values()) == 1
    assert "MISMATCH: 1 of" in capsys.readouterr().out


def test_qemu_timeout_is_a_failure_not_a_hang(tmp_path, toolchain):
    path = _export(tmp_path, "cnn")
    rep = firmware.run_firmware(path, tmp_path / "fw", timeout=0.001, log=lambda s: None)
    assert not rep["ok"] and rep["qemu_exit"] is None and "did not finish within" in rep["problem"]


def test_startup_exit_status_and_fault_handler(tmp_path, toolchain):
    """startup.c: main's return value reaches QEMU's exit status through semihosting SYS_EXIT
    (0 -> 0, anything else -> 1), printf goes out over semihosting, and a fault prints its name and
    ends the run instead of hanging."""
    progs = {"ok": "return 0;", "three": "return 3;",
             "fault": "__builtin_trap(); return 0;"}       # UDF: UsageFault, escalated to HardFault
    for name, body in progs.items():
        d = tmp_path / name
        d.mkdir()
        (d / "main.c").write_text("#include <stdio.h>\nint main(void)\n{\n    printf(\"hello %d\\n\", 42);\n"
                                  f"    {body}\n}}\n")
        firmware.compile_and_link([(d / "main.c", [])], d / "fw.elf", tools=toolchain)
        out, rc, _ = firmware.run_qemu(d / "fw.elf", timeout=QEMU_TIMEOUT, qemu=toolchain["qemu-system-arm"])
        assert out.startswith("hello 42\n"), name
        assert rc == (0 if name == "ok" else 1), name
        assert ("FAULT HardFault" in out) == (name == "fault")


def test_systick_ticks_are_40_instructions_under_icount(tmp_path, toolchain):
    """The conversion INSNS_PER_TICK, checked with a loop of known length: 2 * 10**6 Thumb
    instructions (subs + bne) must take 50,000 ticks (+ a few for the reads around it)."""
    (tmp_path / "main.c").write_text(r'''
#include <stdint.h>
#include <stdio.h>
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
int main(void)
{
    uint32_t t0, t1, n = 1000000u;
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 5u;
    t0 = SYST_CVR;
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n) : : "cc");
    t1 = SYST_CVR;
    printf("ticks %lu\n", (unsigned long)((t0 - t1) & 0xFFFFFFu));
    return 0;
}
''')
    firmware.compile_and_link([(tmp_path / "main.c", [])], tmp_path / "fw.elf", tools=toolchain)
    out, rc, _ = firmware.run_qemu(tmp_path / "fw.elf", timeout=QEMU_TIMEOUT, qemu=toolchain["qemu-system-arm"])
    assert rc == 0, out
    ticks = int(out.split()[1])
    assert 2_000_000 // firmware.INSNS_PER_TICK <= ticks <= 2_000_000 // firmware.INSNS_PER_TICK + 2, out


def test_instruction_count_survives_systick_wraps(tmp_path, toolchain):
    """harness.c counts SysTick wraps: with a period of 16 ticks (several wraps per inference) the
    instruction count equals the one without wraps, up to the handler's own instructions."""
    path = _export(tmp_path, "cnn")
    counts = []
    for d, flags in (("long", ()), ("short", ("-DSYST_PERIOD=16",))):
        rep = firmware.run_firmware(path, tmp_path / d, timeout=QEMU_TIMEOUT, log=lambda s: None,
                                    harness_cflags=flags)
        assert rep["ok"], rep["problem"]
        counts.append(rep["instructions_per_inference"]["mean"])
    assert counts[1] / 16 / firmware.INSNS_PER_TICK > 10                    # it did wrap, many times
    assert abs(counts[1] - counts[0]) <= 0.03 * counts[0], counts


def test_dense_only_model_without_bias_runs(tmp_path, toolchain):
    """A model with a single record kind besides the input builds (no unused helper warnings)."""
    model = L.Sequential(L.Sequential(L.Dense(5, 3, bias=False, rng=0)))
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    path = tmp_path / "d.h5"
    hdf5.export(model, path, x, n_traces=3)
    assert firmware.run_firmware(path, tmp_path / "fw", timeout=QEMU_TIMEOUT, log=lambda s: None)["ok"]
