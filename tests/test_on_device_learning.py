"""On-device block-local learning (issue 25): the integer update (bll_ref.fixedpoint.learn), its float
twin, the C update on QEMU's Cortex-M4 (exporters.c_learn, exporters.firmware_learn) and
``bll-ref firmware-learn``'s bad-input errors.

The QEMU test needs arm-none-eabi-gcc, newlib and qemu-system-arm: without them it skips, unless
BLL_REQUIRE_FIRMWARE=1 (CI), where a missing toolchain is a failure.  Every QEMU run has a timeout.
"""
import dataclasses
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref import models
from bll_ref.cli import main as cli_main
from bll_ref.data import load_fashion_mnist
from bll_ref.fixedpoint import compile_integer, dequantize
from bll_ref.loop import fit
from bll_ref.methods import make
from bll_ref.fixedpoint.learn import (E_FRAC, exp_table, learn_step, learned_arrays, parse_learn_blocks, plan_learning,
                                      softmax_q15)
from bll_ref.fixedpoint.learn_float import FloatTwin, fit_feedback, float_forward
from exporters import firmware_learn, hdf5
from exporters.learn_scenario import shift_pixels

QEMU_TIMEOUT = 120.0


def _integer_mlp(sizes, seed=3, n_cal=128, output_width=None):
    net = L.Sequential(*models.mlp(sizes, activation_name="relu", rng=seed))
    x = np.random.default_rng(seed).normal(size=(n_cal, sizes[0])).astype(np.float32)
    return net, x, compile_integer(net, x, width=8, output_width=output_width)


def _feedback(im, x, y, blocks):
    """Feedback tables of the learned hidden blocks, fitted on the integer codes of (x, y)."""
    tr = im.run(im.quantize_input(x))
    last = len(im.records) - 1
    return {r.block: fit_feedback(dequantize(tr[i], im.formats[i]), y, 10)
            for i, r in enumerate(im.records) if r.kind == "dense" and i != last and r.block in blocks}


@pytest.fixture(scope="module")
def small():
    net, x, im = _integer_mlp((784, 48, 32, 10), output_width=16)    # 16-bit logits: a coarser exp table
    y = np.arange(len(x)) % 10
    return im, x, y


# ------------------------------------------------------------------------------------------------
# the integer update against independent references
# ------------------------------------------------------------------------------------------------
def test_parse_learn_blocks_counts_from_one_and_names_a_missing_block():
    assert parse_learn_blocks("3", 3) == [2]
    assert parse_learn_blocks("2, 3", 3) == [1, 2]
    assert parse_learn_blocks("all", 3) == [0, 1, 2]
    for bad in ("4", "0", "x", "2,,3"):
        with pytest.raises(ValueError, match="does not exist"):
            parse_learn_blocks(bad, 3)


def test_widened_blocks_keep_every_inference_code(small):
    im0, x, y = small
    im, spec = plan_learning(im0, [0, 1, 2], 8, feedback=_feedback(im0, x, y, [0, 1]))
    codes = im0.quantize_input(x)
    for a, b in zip(im0.run(codes), im.run(codes)):
        np.testing.assert_array_equal(a, b)
    assert all(im.records[r.record].w_fmt.width == 16 for r in spec.rules)
    assert im0.records[spec.rules[0].record].W.dtype == np.int8        # the original is untouched


@pytest.mark.parametrize("frac, width, atol", [(3, 8, 3 * 2.0 ** -15), (9, 16, 0.01)])
def test_softmax_q15_against_exact_softmax(frac, width, atol):
    table, k = exp_table(frac, width)
    assert table[0] == 1 << E_FRAC and table[-1] > 0 and len(table) <= 256
    assert (k == 0) == (width == 8)
    assert round(2 ** 15 * math.exp(-(len(table) << k) / 2 ** frac)) == 0     # the table ends where E rounds to 0
    rng = np.random.default_rng(0)
    lim = 1 << (width - 1)
    for _ in range(50):
        z = rng.integers(-lim, lim, size=10) >> (0 if width == 8 else 4)
        p = softmax_q15(z, table, k)
        ez = np.exp((z - z.max()) / 2.0 ** frac)
        np.testing.assert_allclose(p / 2 ** 15, ez / ez.sum(), atol=atol)


def _rs_exact(v, s):
    """round half toward +inf of v / 2**s with exact rationals (independent of round_shift)."""
    return math.floor(Fraction(int(v), 2 ** s) + Fraction(1, 2)) if s > 0 else int(v) * 2 ** -s


def test_learn_step_equals_an_elementwise_reference(small):
    im0, x, y = small
    im, spec = plan_learning(im0, [1, 2], [4, 6], feedback=_feedback(im0, x, y, [1]))
    codes = im.quantize_input(x[:3])
    for s in range(3):
        before = {r.record: (im.records[r.record].W.astype(np.int64).copy(), im.records[r.record].c.copy())
                  for r in spec.rules}
        trace = im.run(codes[s:s + 1])
        learn_step(im, spec, codes[s:s + 1], int(y[s]))
        for r in spec.rules:
            W0, c0 = before[r.record]
            rec = im.records[r.record]
            xin, out = trace[r.x_record][0].astype(np.int64), trace[r.record][0].astype(np.int64)
            if r.kind == "softmax_ce":
                js = [_rs_exact(d, spec.exp_shift) for d in out.max() - out]
                E = [int(spec.exp_table[j]) if j < len(spec.exp_table) else 0 for j in js]
                e = [math.floor(Fraction(Ej * 2 ** 15, sum(E)) + Fraction(1, 2)) for Ej in E]
                e[int(y[s])] -= 2 ** 15
            else:
                e = list(out - spec.feedback[r.record][int(y[s])])
            lo, hi = rec.w_fmt.min_code, rec.w_fmt.max_code
            for i in range(0, W0.shape[0], 7):
                for o in range(W0.shape[1]):
                    want = min(hi, max(lo, int(W0[i, o]) - _rs_exact(int(xin[i]) * e[o], r.w_shift)))
                    assert int(rec.W[i, o]) == want, (r.kind, i, o)
            for o in range(W0.shape[1]):
                assert int(rec.c[o]) == int(c0[o]) - _rs_exact(e[o], r.c_shift)


def test_learning_rate_that_overflows_or_vanishes_is_refused(small):
    im0, x, y = small
    fb = _feedback(im0, x, y, [1])
    with pytest.raises(ValueError, match="overflows the int32 accumulator; use --lr-shift"):
        plan_learning(im0, [1], -20, feedback=fb)
    with pytest.raises(ValueError, match="rounds to zero"):
        plan_learning(im0, [2], 40)
    with pytest.raises(ValueError, match="feedback message"):
        plan_learning(im0, [1], 8)
    with pytest.raises(ValueError, match="blocks 1..3"):
        plan_learning(im0, [3], 8)


def test_label_outside_the_classes_is_refused_and_nothing_written(small, tmp_path):
    im0, x, y = small
    im, spec = plan_learning(im0, [2], 8)
    codes = im.quantize_input(x[:4])
    with pytest.raises(ValueError, match="outside the classes"):
        learn_step(im, spec, codes[:1], 10)
    work = tmp_path / "wd"
    with pytest.raises(ValueError, match="label 10 of sample 2 is outside the classes 0..9"):
        firmware_learn.build_learn(im, spec, work, codes, np.array([1, 2, 10, 3]), tools={})
    assert not work.exists()


def test_bll_update_needs_less_ram_than_backprop_and_fits_64k():
    _, _, im0 = _integer_mlp((784, 128, 128, 10), n_cal=32)
    rng = np.random.default_rng(1)
    fb = {1: rng.uniform(0, 2, size=(10, 128))}
    im, spec = plan_learning(im0, [1, 2], [9, 8], feedback=fb)
    ram = firmware_learn.update_ram(im, spec)
    assert ram["weights_and_biases"] == 128 * 128 * 2 + 128 * 8 + 128 * 10 * 2 + 10 * 8
    assert ram["bll"] < ram["backprop"] and ram["bll"] <= 64 * 1024
    assert ram["backprop"] - ram["bll"] == 128 * 4 + 10 * 4 - 10 * 4     # backprop's dL/dh of block 2


# ------------------------------------------------------------------------------------------------
# it learns, and the integers track the float twin
# ------------------------------------------------------------------------------------------------
def test_integer_update_learns_on_shifted_images_and_tracks_the_float_twin():
    """A small MLP trained briefly with BLL on 3,000 Fashion-MNIST images, then blocks 2 and 3 adapt
    to 1,000 low-contrast images one at a time: the loss falls, shifted accuracy rises, and the
    integer update stays close to its float twin."""
    d = load_fashion_mnist(normalize=False, dtype=np.float64, limit_train=4000, limit_test=400)
    norm = lambda v: ((v - 0.286) / 0.353).astype(np.float32)       # noqa: E731
    blocks = models.mlp((784, 64, 32, 10), activation_name="relu", rng=5)
    data = {"x_train": norm(d["x_train"][:3000]), "y_train": d["y_train"][:3000],
            "x_test": norm(d["x_test"][:100]), "y_test": d["y_test"][:100]}
    fit(make("bll", blocks, sample_input=data["x_train"][:2], rng=0), data, epochs=3, log=lambda *a: None,
        train_eval=0)
    x_fit, y_fit = data["x_train"][:1000], data["y_train"][:1000]
    im0 = compile_integer(L.Sequential(*blocks), x_fit, width=8, percentile=99.9)
    x_dev, y_dev = norm(shift_pixels(d["x_train"][3000:4000], "contrast")), d["y_train"][3000:4000]
    x_test, y_test = norm(shift_pixels(d["x_test"], "contrast")), d["y_test"]
    params = {i: (r.info["W_float"], r.info["c_float"]) for i, r in enumerate(im0.records) if r.kind == "dense"}
    fb_float = {1: fit_feedback(float_forward(im0.records, params, x_fit)[3], y_fit, 10)}
    im, spec = plan_learning(im0, [1, 2], [9, 8], feedback=_feedback(im0, x_fit, y_fit, [1]))
    twin = FloatTwin(im, spec, fb_float)
    codes_dev, codes_test = im.quantize_input(x_dev), im.quantize_input(x_test)
    before = np.mean(im.run(codes_test)[-1].argmax(1) == y_test)
    losses_i = [learn_step(im, spec, codes_dev[s:s + 1], int(y_dev[s]))["loss"] for s in range(len(codes_dev))]
    losses_f = [twin.step(x_dev[s:s + 1], int(y_dev[s])) for s in range(len(x_dev))]
    after = np.mean(im.run(codes_test)[-1].argmax(1) == y_test)
    after_f = np.mean(twin.logits(x_test).argmax(1) == y_test)
    agree = np.mean(im.run(codes_test)[-1].argmax(1) == twin.logits(x_test).argmax(1))
    assert np.mean(losses_i[-200:]) < np.mean(losses_i[:200]) - 0.3
    assert after > before + 0.1, (before, after)
    assert abs(after - after_f) < 0.05 and agree > 0.85, (after, after_f, agree)
    assert abs(np.mean(losses_i[-200:]) - np.mean(losses_f[-200:])) < 0.15


# ------------------------------------------------------------------------------------------------
# the C update on the emulated Cortex-M4
# ------------------------------------------------------------------------------------------------
def test_c_update_on_cortex_m4_equals_the_python_twin_for_200_steps(small, toolchain, tmp_path):
    im0, x, y = small
    rng = np.random.default_rng(7)
    fb = _feedback(im0, x, y, [0, 1])
    # block 1 reads the signed input codes (its weight update shifts left), block 2 a ReLU's; block 3's
    # large rate drives weights to saturation
    im, spec = plan_learning(im0, [0, 1, 2], [8, 7, 1], feedback=fb)
    assert min(r.w_shift for r in spec.rules) <= 0 < max(r.w_shift for r in spec.rules)   # left and right shifts
    assert min(r.c_shift for r in spec.rules) < 0 and spec.exp_shift > 0                  # coarse exp table
    start = [a.copy() for _, a in learned_arrays(im, spec)]
    codes = im.quantize_input(rng.normal(size=(200, 784)).astype(np.float32) * 1.5)
    labels = rng.integers(0, 10, size=200)
    rep = firmware_learn.run_learn(im, spec, tmp_path / "wd", codes, labels, dump_every=20, timeout=QEMU_TIMEOUT)
    assert rep["bit_exact"], rep["problem"]
    assert rep["steps_differing"] == 0 and rep["dumped_codes"] == 10 * sum(a.size for a in start)
    end = learned_arrays(im, spec)
    assert all(np.count_nonzero(a != b) > 0 for a, (_, b) in zip(start, end))     # every array learned
    W3 = im.records[spec.rules[2].record].W
    assert W3.max() == 32767 or W3.min() == -32768                                 # saturation was exercised
    assert rep["instructions_per_update"]["mean"] > rep["instructions_per_inference"] > 0
    # the comparison can fail: a twin with a different weight shift in one block disagrees with the device
    text = (tmp_path / "wd" / "learn_qemu.out").read_text()
    im2, spec2 = plan_learning(im0, [0, 1, 2], [8, 7, 1], feedback=fb)
    spec2.rules[1] = dataclasses.replace(spec2.rules[1], w_shift=spec2.rules[1].w_shift + 1)
    twin2 = firmware_learn.twin_run(im2, spec2, codes, labels, 20)
    _, _, hashes, _ = firmware_learn.parse_learn_output(text, 200, [a.size for a in start], twin2["dumps"].keys())
    assert sum(h != t for h, t in zip(hashes, twin2["hashes"])) > 100


# ------------------------------------------------------------------------------------------------
# bll-ref firmware-learn: bad input, nothing written
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_784(tmp_path_factory):
    net, x, _ = _integer_mlp((784, 32, 16, 10), n_cal=32)
    path = tmp_path_factory.mktemp("exp") / "mlp.h5"
    hdf5.export(net, path, x, width=8, n_traces=4, meta={"data": "fashion-mnist"})
    return path


@pytest.mark.parametrize("argv, message", [
    (["--learn-blocks", "4"], "block '4' does not exist"),
    (["--learn-blocks", "2,3", "--lr-shift=-20,8"], "overflows the int32 accumulator"),
    (["--learn-blocks", "2,3", "--lr-shift", "1,2,3"], "one per learned block"),
])
def test_cli_bad_block_or_learning_rate_exits_2_and_writes_nothing(export_784, tmp_path, capsys, argv, message):
    work = tmp_path / "wd"
    rc = cli_main(["firmware-learn", str(export_784), "--workdir", str(work), "--samples", "20", "--test", "20", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not work.exists()


SUMMARY = re.compile(r"^on-device learning: unshifted \d+\.\d %, shifted before \d+\.\d %, after \d+\.\d % "
                     r"\(float twin \d+\.\d %\), \d+ samples, bit-exact (yes|no), RAM \d+ B \(backprop \d+ B\), "
                     r"instructions per update \d+$")


def test_cli_runs_the_scenario_and_prints_the_summary_last(export_784, toolchain, tmp_path, capsys):
    work = tmp_path / "wd"
    rc = cli_main(["firmware-learn", str(export_784), "--workdir", str(work), "--learn-blocks", "2,3",
                   "--lr-shift", "9,8", "--samples", "40", "--test", "100", "--dump-every", "10",
                   "--timeout", str(QEMU_TIMEOUT)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    m = SUMMARY.match(out[-1])
    assert m and m.group(1) == "yes", out[-1]
    rep = json.loads((work / "learn_report.json").read_text())
    assert rep["bit_exact"] and rep["steps"] == 40 and rep["summary"] == out[-1]
    assert rep["ram"]["bll"] < rep["ram"]["backprop"]
