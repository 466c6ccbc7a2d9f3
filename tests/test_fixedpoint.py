"""Fixed point: hand-computed rounding/overflow/shift cases, exact-arithmetic property tests,
calibration, BN folding, and integer inference against the float layers."""
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bll_ref import layers as L
from bll_ref.fixedpoint import (
    RECORD_KINDS, IntegerModel, QFormat, Record, calibrate_activation, calibrate_weight, compile_integer,
    dequantize, fold_batchnorm, overflow, quantize, requantize, round_shift,
)
from bll_ref.cli import main
from bll_ref.fixedpoint.calibrate import calibrate_activation_mse, calibrate_argmax
from exporters import hdf5
from exporters.from_checkpoint import export_defaults, training_inputs
from bll_ref.fixedpoint import intops as I
from bll_ref.fixedpoint import records as R
from bll_ref.fixedpoint.walk import Affine, ChannelAffine, Junction, Op, walk

PROP = settings(max_examples=300, deadline=None)


# ------------------------------------------------------------------------------------------------
# exact references (Python integers / fractions: no float rounding anywhere)
# ------------------------------------------------------------------------------------------------
def ref_round(v: Fraction, rounding):
    if rounding == "floor":
        return math.floor(v)
    if rounding == "nearest":
        return math.floor(v + Fraction(1, 2))
    return round(v)                     # Fraction.__round__ is half-to-even


def ref_overflow(v: int, fmt):
    if fmt.overflow == "saturate":
        return min(max(v, fmt.min_code), fmt.max_code)
    return (v - fmt.min_code) % (1 << fmt.width) + fmt.min_code


def ref_quantize(x: float, fmt):
    return ref_overflow(ref_round(Fraction(x) * Fraction(2) ** fmt.frac, fmt.rounding), fmt)


formats = st.builds(
    QFormat, width=st.integers(2, 32), frac=st.integers(-8, 40), signed=st.booleans(),
    rounding=st.sampled_from(["floor", "nearest", "nearest_even"]),
    overflow=st.sampled_from(["saturate", "wrap"]))


# ------------------------------------------------------------------------------------------------
# QFormat
# ------------------------------------------------------------------------------------------------
def test_qformat_properties_and_hls_mapping():
    f = QFormat(8, 5)
    assert (f.min_code, f.max_code, f.code_dtype, f.step, f.int_bits) == (-128, 127, np.int8, 1 / 32, 3)
    assert f.hls_type == "ap_fixed<8,3,AP_RND,AP_SAT>"
    assert QFormat(12, 4, rounding="floor", overflow="wrap").hls_type == "ap_fixed<12,8,AP_TRN,AP_WRAP>"
    assert QFormat(16, 16, signed=False, rounding="nearest_even").hls_type == "ap_ufixed<16,0,AP_RND_CONV,AP_SAT>"
    assert QFormat(9, 0).code_dtype == np.int16 and QFormat(17, 0).code_dtype == np.int32
    assert QFormat(8, 0, signed=False).code_dtype == np.uint8
    u = QFormat(32, 0, signed=False)
    assert (u.min_code, u.max_code, u.code_dtype) == (0, 2 ** 32 - 1, np.uint32)
    for fmt in (f, u, QFormat(5, -3, rounding="floor", overflow="wrap")):
        d = json.loads(json.dumps(fmt.to_dict()))
        assert QFormat.from_dict(d) == fmt


@pytest.mark.parametrize("kw", [dict(width=1, frac=0), dict(width=33, frac=0), dict(width=8, frac=65),
                                dict(width=8, frac=0, rounding="round"), dict(width=8, frac=0, overflow="clip"),
                                dict(width=8.0, frac=0), dict(width=8, frac=True)])
def test_qformat_rejects_bad_fields(kw):
    with pytest.raises(ValueError):
        QFormat(**kw)


def test_qformat_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected"):
        QFormat.from_dict({"width": 8, "frac": 0, "bits": 3})


# ------------------------------------------------------------------------------------------------
# rounding and overflow, by hand
# ------------------------------------------------------------------------------------------------
TIES = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]


@pytest.mark.parametrize("rounding, expected", [
    ("floor", [-3, -2, -1, 0, 1, 2]),
    ("nearest", [-2, -1, 0, 1, 2, 3]),          # half toward +inf (AP_RND)
    ("nearest_even", [-2, -2, 0, 0, 2, 2]),     # half to even (AP_RND_CONV)
])
def test_rounding_ties_by_hand(rounding, expected):
    for frac in (0, 1, 3):   # the ties are in units of one step, whatever the step
        fmt = QFormat(8, frac, rounding=rounding)
        assert quantize(np.array(TIES) * 2.0 ** -frac, fmt).tolist() == expected


@pytest.mark.parametrize("rounding, x, code", [
    ("floor", 0.99, 0), ("floor", -0.01, -1), ("nearest", 0.49999999999999994, 0),
    ("nearest", -0.5000000000000001, -1), ("nearest", 2.0 ** 52 + 1, 127),
    ("nearest_even", 0.5000000000000001, 1),
    # the most negative code: -128 exact; -128.5 rounds to -128 (half up) or -129 -> saturates
    ("nearest", -128.0, -128), ("nearest", -128.5, -128), ("floor", -128.5, -128),
    ("nearest_even", -128.5, -128), ("nearest", -128.50000000000003, -128),
    ("nearest", 127.49, 127), ("nearest", 127.5, 127),
])
def test_rounding_edge_values(rounding, x, code):
    assert int(quantize(x, QFormat(8, 0, rounding=rounding))) == code


def test_saturate_by_hand():
    fmt = QFormat(8, 0)
    got = quantize([-1e9, -129, -128, 127, 128, 1e300], fmt)
    assert got.tolist() == [-128, -128, -128, 127, 127, 127] and got.dtype == np.int8
    assert quantize([-3, 300], QFormat(8, 0, signed=False)).tolist() == [0, 255]


def test_wrap_by_hand():
    fmt = QFormat(8, 0, overflow="wrap")
    assert quantize([128, 129, 255, 256, -129, -130, -256, 383], fmt).tolist() == \
        [-128, -127, -1, 0, 127, 126, 0, 127]
    assert quantize([256, -1, 257], QFormat(8, 0, signed=False, overflow="wrap")).tolist() == [0, 255, 1]
    assert int(quantize(1e300, fmt)) == 0   # a huge float is a multiple of 2**8
    assert overflow(np.array([128, -129, 2 ** 40 + 5]), fmt).tolist() == [-128, 127, 5]
    assert overflow(np.array([128, -129]), QFormat(8, 0)).tolist() == [127, -128]


def test_quantize_scales_by_frac_and_dequantizes_exactly():
    fmt = QFormat(8, 4)
    codes = quantize([0.0625, -0.03125, 7.9375, 8.0, -8.0], fmt)   # step 1/16
    assert codes.tolist() == [1, 0, 127, 127, -128]                # -0.5 steps -> 0 (half up)
    assert dequantize(codes, fmt).tolist() == [0.0625, 0.0, 7.9375, 7.9375, -8.0]
    assert quantize(96.0, QFormat(8, -2)).tolist() == 24            # negative frac: step 4


def test_quantize_rejects_nonfinite_and_dequantize_rejects_floats():
    with pytest.raises(ValueError, match="finite"):
        quantize([0.0, np.nan], QFormat(8, 0))
    with pytest.raises(ValueError, match="integer"):
        dequantize(np.array([1.0]), QFormat(8, 0))


def test_underflowed_negative_keeps_floor_semantics():
    # -5e-324 * 2**-1 underflows to -0.0 in float64; the exact floor is still -1
    assert int(quantize(-5e-324, QFormat(8, -1, rounding="floor"))) == -1
    assert int(quantize(-5e-324, QFormat(8, -1, rounding="nearest"))) == 0


# ------------------------------------------------------------------------------------------------
# integer shifts, by hand
# ------------------------------------------------------------------------------------------------
ACC = np.array([-7, -6, -5, -3, -2, -1, 0, 1, 2, 3, 5, 6, 7])      # / 2 and / 4 below


@pytest.mark.parametrize("shift, rounding, expected", [
    (1, "floor", [-4, -3, -3, -2, -1, -1, 0, 0, 1, 1, 2, 3, 3]),
    (1, "nearest", [-3, -3, -2, -1, -1, 0, 0, 1, 1, 2, 3, 3, 4]),
    (1, "nearest_even", [-4, -3, -2, -2, -1, 0, 0, 0, 1, 2, 2, 3, 4]),
    (2, "floor", [-2, -2, -2, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1]),
    (2, "nearest", [-2, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 2, 2]),
    (2, "nearest_even", [-2, -2, -1, -1, 0, 0, 0, 0, 0, 1, 1, 2, 2]),
])
def test_round_shift_by_hand(shift, rounding, expected):
    out = round_shift(ACC, shift, rounding)
    assert out.tolist() == expected and out.dtype == np.int64


def test_round_shift_identity_left_and_huge_shifts():
    assert round_shift(ACC, 0, "nearest").tolist() == ACC.tolist()
    assert round_shift(np.array([-3, 5]), -4).tolist() == [-48, 80]
    with pytest.raises(ValueError, match="overflows"):
        round_shift(np.array([2 ** 40]), -30)
    big = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max])
    assert round_shift(big, 64, "floor").tolist() == [-1, -1, 0, 0]
    assert round_shift(big, 70, "nearest").tolist() == [0, 0, 0, 0]
    assert round_shift(big, 63, "nearest").tolist() == [-1, 0, 0, 1]
    assert round_shift(np.array([np.iinfo(np.int64).max]), 1, "nearest").tolist() == [2 ** 62]
    with pytest.raises(ValueError, match="integer"):
        round_shift(np.array([1.5]), 1)


def test_requantize_by_hand():
    # acc with 6 frac bits -> Q(8, 2): divide by 16 with rounding, then saturate
    fmt = QFormat(8, 2)
    out = requantize(np.array([24, -24, 40, 100000, -100000]), 6, fmt)
    assert out.tolist() == [2, -1, 3, 127, -128] and out.dtype == np.int8
    # output finer than the accumulator: exact left shift, saturating
    assert requantize(np.array([3, -3, 1 << 40]), 0, QFormat(8, 4)).tolist() == [48, -48, 127]
    assert requantize(np.array([3, 9]), 0, QFormat(8, 4, overflow="wrap")).tolist() == [48, -112]


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)


@PROP
@given(x=st.lists(finite, min_size=1, max_size=8), fmt=formats)
def test_quantize_equals_exact_reference_and_stays_in_range(x, fmt):
    codes = quantize(np.array(x), fmt)
    assert codes.dtype == fmt.code_dtype
    assert codes.tolist() == [ref_quantize(v, fmt) for v in x]
    assert all(fmt.min_code <= c <= fmt.max_code for c in codes.tolist())


@PROP
@given(fmt=formats, u=st.floats(0, 1))
def test_error_bounds_within_range(fmt, u):
    x = (fmt.min_code + u * (fmt.max_code - fmt.min_code)) * fmt.step   # representable range
    err = dequantize(quantize(x, fmt), fmt) - x
    if fmt.rounding == "floor":
        assert -fmt.step < err <= 0
    else:
        assert abs(err) <= fmt.step / 2


@PROP
@given(v=st.integers(-(2 ** 62), 2 ** 62), fmt=formats)
def test_wrap_is_modular_and_saturate_clips(v, fmt):
    w = QFormat(fmt.width, 0, fmt.signed, fmt.rounding, "wrap")
    s = QFormat(fmt.width, 0, fmt.signed, fmt.rounding, "saturate")
    assert int(overflow(np.array([v]), w)[0]) == (v - w.min_code) % (1 << w.width) + w.min_code
    assert int(overflow(np.array([v]), s)[0]) == min(max(v, s.min_code), s.max_code)


@PROP
@given(acc=st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=8),
       shift=st.integers(0, 20), rounding=st.sampled_from(["floor", "nearest", "nearest_even"]))
def test_round_shift_equals_float_reference(acc, shift, rounding):
    a = np.array(acc, dtype=np.int64)
    v = a / 2.0 ** shift                              # exact: |acc| < 2**41
    ref = {"floor": np.floor(v), "nearest": np.floor(v + 0.5), "nearest_even": np.rint(v)}[rounding]
    assert round_shift(a, shift, rounding).tolist() == ref.astype(np.int64).tolist()


@PROP
@given(acc=st.lists(st.integers(-(2 ** 62), 2 ** 62), min_size=1, max_size=8),
       shift=st.integers(-80, 80), rounding=st.sampled_from(["floor", "nearest", "nearest_even"]))
def test_round_shift_equals_exact_reference(acc, shift, rounding):
    a = np.array(acc, dtype=np.int64)
    exact = [ref_round(Fraction(v) / Fraction(2) ** shift, rounding) for v in acc]
    if shift < 0 and any(abs(e) >= 2 ** 63 for e in exact):
        with pytest.raises(ValueError):
            round_shift(a, shift, rounding)
    else:
        assert round_shift(a, shift, rounding).tolist() == exact


@PROP
@given(acc=st.lists(st.integers(-(2 ** 50), 2 ** 50), min_size=1, max_size=8),
       acc_frac=st.integers(-10, 60), fmt=formats)
def test_requantize_equals_quantize_of_the_exact_value(acc, acc_frac, fmt):
    out = requantize(np.array(acc), acc_frac, fmt)
    assert out.dtype == fmt.code_dtype
    exact = [ref_overflow(ref_round(Fraction(v) / Fraction(2) ** acc_frac * Fraction(2) ** fmt.frac,
                                    fmt.rounding), fmt) for v in acc]
    assert out.tolist() == exact


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
@PROP
@given(w=st.lists(st.floats(-1e6, 1e6, allow_subnormal=False), min_size=1, max_size=16),
       width=st.integers(2, 16))
def test_calibrate_weight_picks_the_largest_fitting_frac(w, width):
    w = np.array(w)
    fmt = calibrate_weight(w, width)
    if not np.any(w):
        assert fmt.frac == width - 1
        return
    fits = lambda f: w.max() * 2.0 ** f <= fmt.max_code and w.min() * 2.0 ** f >= fmt.min_code
    if -64 < fmt.frac < 64:
        assert fits(fmt.frac) and not fits(fmt.frac + 1)
        err = np.abs(dequantize(quantize(w, fmt), fmt) - w)
        assert np.all(err <= fmt.step / 2)             # nothing saturated


def test_calibrate_by_hand():
    assert calibrate_weight([0.5, -0.25], 8).frac == 7          # 0.5 * 128 = 64 fits, 2**8 no
    assert calibrate_weight([-1.0, 0.5], 8).frac == 7           # -1 * 128 = -128 fits
    assert calibrate_weight([1.0], 8).frac == 6                 # 1 * 128 = 128 > 127
    assert calibrate_weight([3.0], 16).frac == 13               # I = 3 bits incl. sign
    assert calibrate_weight([0.0, 0.0], 8).frac == 7            # all zero: unit range
    assert calibrate_weight([200.0], 8).frac == -1              # step 2
    assert calibrate_weight([1.0], 8, signed=False).frac == 7   # unsigned: 128 <= 255
    assert calibrate_activation(np.zeros((4, 3)), 8).frac == 7
    x = np.concatenate([np.linspace(-1, 1, 999), [100.0]])
    assert calibrate_activation(x, 8).frac == 0                 # fits 100
    assert calibrate_activation(x, 8, percentile=99.0).frac == 7   # clips at |x| ~ 0.99 < 127/128
    with pytest.raises(ValueError, match="percentile"):
        calibrate_activation(x, 8, percentile=0.0)
    with pytest.raises(ValueError, match="finite"):
        calibrate_weight([np.inf], 8)


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------
def _randomise_bn(bn, rng):
    C = bn.num_features
    bn.params["gamma"][...] = rng.uniform(0.5, 1.5, C)
    bn.params["beta"][...] = rng.normal(0, 0.3, C)
    bn.buffers["running_mean"][...] = rng.normal(0, 0.3, C)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, C)


@pytest.mark.parametrize("conv", [False, True])
def test_fold_batchnorm_matches_layers(conv):
    rng = np.random.default_rng(0)
    lin = L.Conv2d(3, 5, 3, padding=1, rng=1, dtype=np.float64) if conv else L.Dense(6, 5, rng=1, dtype=np.float64)
    bn = L.BatchNorm(5, dtype=np.float64)
    _randomise_bn(bn, rng)
    x = rng.normal(size=(4, 3, 6, 6) if conv else (4, 6))
    ref = bn.forward(lin.forward(x, train=False), train=False)
    W, c = fold_batchnorm(lin.params["W"], lin.params["c"], bn.params["gamma"], bn.params["beta"],
                          bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)
    lin.params["W"][...] = W
    lin.params["c"][...] = c
    np.testing.assert_allclose(lin.forward(x, train=False), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# integer inference
# ------------------------------------------------------------------------------------------------
def _rel_err(model, imodel, x):
    ref = model.forward(x, train=False)
    return np.abs(imodel.infer(x) - ref).max() / np.abs(ref).max()


def _mlp(rng):
    return L.Sequential(
        L.Sequential(L.Dense(12, 16, rng=rng, dtype=np.float64), L.ReLU()),
        L.Sequential(L.Dense(16, 16, rng=rng, dtype=np.float64), L.LeakyReLU(0.1)),
        L.Sequential(L.Dense(16, 16, rng=rng, dtype=np.float64), L.Tanh(),
                     L.Dense(16, 5, rng=rng, dtype=np.float64)))


def _cnn(rng):
    f64 = dict(dtype=np.float64)
    bns = [L.BatchNorm(4, **f64) for _ in range(4)] + [L.BatchNorm(6, **f64)]
    for bn in bns:
        _randomise_bn(bn, rng)
    return L.Sequential(
        L.Sequential(L.Conv2d(2, 4, 3, padding=1, rng=rng, **f64), bns[0], L.ReLU(), L.MaxPool2d(2)),
        L.Sequential(L.Residual(L.Sequential(L.Conv2d(4, 4, 3, padding=1, rng=rng, **f64), bns[1], L.ReLU(),
                                             L.Conv2d(4, 4, 3, padding=1, bias=False, rng=rng, **f64), bns[2])),
                     L.ReLU(), bns[3]),                     # a BN after an activation: 'scale' record
        L.Sequential(L.Residual(L.Sequential(L.Conv2d(4, 6, 3, stride=2, padding=1, rng=rng, **f64), L.ReLU()),
                                L.Sequential(L.Conv2d(4, 6, 1, stride=2, rng=rng, **f64), bns[4])),
                     L.AvgPool2d(2), L.Flatten(), L.Dense(6, 3, rng=rng, **f64), L.Sigmoid()))


def test_mlp_integer_inference_close_to_float():
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    x = rng.normal(size=(64, 12))
    im = compile_integer(model, x[:32], width=16)
    kinds = [r.kind for r in im.records]
    assert kinds == ["input", "dense", "relu", "dense", "leaky_relu", "dense", "lut", "dense"]
    assert _rel_err(model, im, x[:32]) < 2e-4     # the calibration batch: no saturation
    assert _rel_err(model, im, x[32:]) < 1e-2     # unseen inputs may saturate a little
    assert _rel_err(model, compile_integer(model, x, width=8), x) < 0.1


def test_cnn_integer_inference_close_to_float():
    rng = np.random.default_rng(2)
    model = _cnn(rng)
    x = rng.normal(size=(16, 2, 8, 8))
    im = compile_integer(model, x, width=16)
    kinds = [r.kind for r in im.records]
    assert kinds == ["input", "conv2d", "relu", "maxpool2d", "conv2d", "relu", "conv2d", "add", "relu",
                     "scale", "conv2d", "relu", "conv2d", "add", "avgpool2d", "flatten", "dense", "lut"]
    names = [r.name for r in im.records]
    assert names[1] == "0.0+0.1" and names[6] == "1.0.body.3+1.0.body.4" and names[12] == "2.0.shortcut.0+2.0.shortcut.1"
    assert [r.block for r in im.records][:5] == [-1, 0, 0, 0, 1]
    # the pre-sigmoid logits carry the conv/residual error; compare them (sigmoid compresses it)
    logits = L.Sequential(*model.layers[:2], L.Sequential(*model.layers[2].layers[:-1])).forward(x, train=False)
    trace = im.run(im.quantize_input(x))
    got = dequantize(trace[-2], im.formats[-2])
    assert np.abs(got - logits).max() / np.abs(logits).max() < 5e-3
    assert _rel_err(model, im, x) < 5e-3
    for rounding in ("floor", "nearest_even"):
        assert _rel_err(model, compile_integer(model, x, width=16, rounding=rounding), x) < 1e-2


def test_trace_shapes_dtypes_and_formats():
    rng = np.random.default_rng(3)
    model = _cnn(rng)
    x = rng.normal(size=(5, 2, 8, 8))
    im = compile_integer(model, x, width=8, overflow="wrap")
    trace = im.run(im.quantize_input(x))
    assert len(trace) == len(im.records) == len(im.formats)
    np.testing.assert_array_equal(trace[0], im.quantize_input(x))
    for t, fmt in zip(trace, im.formats):
        assert t.dtype == fmt.code_dtype and t.dtype.itemsize == 1 and t.shape[0] == 5
    assert trace[-1].shape == (5, 3)
    with pytest.raises(ValueError, match="shape"):
        im.run(np.zeros((5, 2, 8, 7), np.int8))
    with pytest.raises(ValueError, match="outside"):
        im.run(np.full((1, 2, 8, 8), 300))


def test_integer_ops_are_exact_when_values_are_representable():
    """Inputs on a 1/4 grid and weights on a 1/8 grid: every product and sum is representable in
    the calibrated 16-bit formats, so integer results equal float results exactly."""
    rng = np.random.default_rng(4)
    conv = L.Conv2d(2, 3, 3, stride=1, padding=1, rng=rng, dtype=np.float64)
    dense = L.Dense(3 * 2 * 2, 4, rng=rng, dtype=np.float64)
    for lyr in (conv, dense):
        for p in lyr.params.values():
            p[...] = np.round(rng.uniform(-1, 1, p.shape) * 8) / 8
    model = L.Sequential(conv, L.ReLU(), L.AvgPool2d(2), L.Flatten(), dense)
    x = np.round(rng.uniform(-2, 2, (6, 2, 4, 4)) * 4) / 4
    im = compile_integer(model, x, width=16)
    np.testing.assert_array_equal(im.infer(x), model.forward(x, train=False))


def test_leaky_relu_and_avgpool_integer_semantics_by_hand():
    x = np.array([[[[-7, 6], [-3, 1]]]]) / 8.0          # codes -7, 6, -3, 1 at frac 3
    model = L.Sequential(L.LeakyReLU(0.25), L.AvgPool2d(2))
    im = compile_integer(model, x, width=8, input_fmt=QFormat(8, 3))
    rec = im.records[1]
    assert isinstance(rec, R.LeakyReLU) and rec.slope_code * 2.0 ** -rec.slope_frac == 0.25
    trace = im.run(im.quantize_input(x))
    assert trace[1].ravel().tolist() == [-2, 6, -1, 1]   # -7/4 = -1.75 -> -2 (half up), -3/4 -> -1
    assert trace[2].ravel().tolist() == [1]              # (-2 + 6 - 1 + 1) / 4 = 1
    im3 = compile_integer(L.Sequential(L.AvgPool2d(3)), np.arange(9.0).reshape(1, 1, 3, 3) / 8,
                          width=8, input_fmt=QFormat(8, 3))
    assert im3.run(np.arange(9).reshape(1, 1, 3, 3))[-1].item() == 4     # 36 / 9, an exact division
    for rounding, want in (("floor", [4, -4, 3, -5]), ("nearest", [4, -4, 4, -4]), ("nearest_even", [4, -4, 4, -4])):
        fmt = QFormat(8, 3, rounding=rounding)
        imf = compile_integer(L.Sequential(L.AvgPool2d(3)), np.arange(9.0).reshape(1, 1, 3, 3) / 8, width=8,
                              rounding=rounding, input_fmt=fmt)
        x = np.stack([np.arange(9), -np.arange(9), np.arange(9) - (np.arange(9) == 0),
                      -np.arange(9) - (np.arange(9) == 0)]).reshape(4, 1, 3, 3)   # sums 36, -36, 35, -37
        assert imf.run(x)[-1].ravel().tolist() == want, rounding   # floor(36 / 9) = 4, not 3 (issue 24)


def test_lut_tables_sigmoid_and_tanh():
    x = np.linspace(-4, 4, 50).reshape(10, 5)
    for layer, f, (frac, signed) in ((L.Sigmoid(), L.sigmoid, (8, False)), (L.Tanh(), np.tanh, (7, True))):
        im = compile_integer(L.Sequential(layer), x, width=8)
        rec = im.records[1]
        assert isinstance(rec, R.Lut) and rec.table.shape == (256,)
        assert (im.output_fmt.frac, im.output_fmt.signed) == (frac, signed)   # sigmoid: every code used
        assert np.abs(im.infer(x) - f(x)).max() <= 2 ** -8 + 4 * 2 ** -5 * 0.25 + 1e-12


def test_from_records_rebuilds_identical_traces():
    rng = np.random.default_rng(5)
    model = _cnn(rng)
    x = rng.normal(size=(6, 2, 8, 8))
    im = compile_integer(model, x, width=8, rounding="nearest_even")
    # what an HDF5 round trip gives: attrs through JSON, arrays copied, nothing else
    plain = [{"attrs": json.loads(json.dumps(r["attrs"])),
              "arrays": {k: np.array(v) for k, v in r["arrays"].items()}} for r in im.records]
    im2 = IntegerModel.from_records(plain)
    codes = im.quantize_input(x)
    for a, b in zip(im.run(codes), im2.run(codes)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # integer arrays only (no float twins) are enough
    lean = [{"attrs": r["attrs"], "arrays": {k: v for k, v in r["arrays"].items() if not k.endswith("_float")}}
            for r in plain]
    np.testing.assert_array_equal(IntegerModel.from_records(lean).run(codes)[-1], im.run(codes)[-1])


@pytest.mark.parametrize("tamper, match", [
    (lambda rs: rs[1]["attrs"].update(kind="gemm"), "unknown kind"),
    (lambda rs: rs[1]["arrays"].pop("W"), "missing array"),
    (lambda rs: rs[2]["attrs"].update(inputs=[5]), "inputs"),
    (lambda rs: rs[1]["attrs"].update(acc_frac=rs[1]["attrs"]["acc_frac"] + 1), "acc_frac"),
    (lambda rs: rs[1]["arrays"].update(c=np.zeros(3, np.int64)), "bias"),
    (lambda rs: rs[1]["arrays"].update(W=rs[1]["arrays"]["W"].astype(float)), "integer"),
    (lambda rs: rs[0]["attrs"]["out_fmt"].update(width=40), "width"),
    (lambda rs: rs.pop(0), "first record"),
])
def test_from_records_rejects_tampered_records(tamper, match):
    rng = np.random.default_rng(6)
    model = _mlp(rng)
    im = compile_integer(model, rng.normal(size=(8, 12)), width=8)
    rs = [{"attrs": json.loads(json.dumps(r["attrs"])), "arrays": dict(r["arrays"])} for r in im.records]
    tamper(rs)
    with pytest.raises(ValueError, match=match):
        IntegerModel.from_records(rs)


def test_compile_rejects_unsupported_layers_and_widths():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 3, 8))
    with pytest.raises(ValueError, match="no integer implementation"):
        compile_integer(L.Sequential(L.LayerNorm(8, dtype=np.float64)), x)
    with pytest.raises(ValueError, match="width"):
        compile_integer(_mlp(rng), rng.normal(size=(4, 12)), width=24)


# ------------------------------------------------------------------------------------------------
# typed records, the model walk, the shared im2col
# ------------------------------------------------------------------------------------------------
def test_records_are_one_type_per_kind_and_their_plain_data_round_trips():
    rng = np.random.default_rng(8)
    model = _cnn(rng)
    im = compile_integer(model, rng.normal(size=(4, 2, 8, 8)), width=8)
    assert [type(r) for r in im.records[:4]] == [R.Input, R.Conv2d, R.ReLU, R.MaxPool2d]
    assert all(isinstance(r, Record) and r.kind in RECORD_KINDS for r in im.records)
    assert set(RECORD_KINDS) == set(R.RECORD_TYPES)
    conv = im.records[1]
    assert conv.W.dtype == conv.w_fmt.code_dtype and conv.c.dtype == np.int64
    assert conv.stride == (1, 1) and conv.padding == (1, 1) and set(conv.info) == {"W_float", "c_float"}
    # the plain data: JSON attrs (what exporters write) and arrays, also as rec["attrs"] / rec["arrays"]
    assert conv["attrs"] == conv.attrs and conv.attrs["stride"] == [1, 1] and conv.attrs["kind"] == "conv2d"
    assert list(conv["arrays"]) == ["W", "c", "W_float", "c_float"]
    for i, rec in enumerate(im.records):
        back = R.record_from_plain(i, {"attrs": json.loads(json.dumps(rec.attrs)), "arrays": rec.arrays})
        assert type(back) is type(rec) and back.attrs == rec.attrs
        assert all(np.array_equal(back.arrays[k], a) and back.arrays[k].dtype == a.dtype
                   for k, a in rec.arrays.items())
    with pytest.raises(KeyError):
        conv["W"]


def test_unknown_attributes_are_kept_and_records_copy_their_arrays():
    W = np.array([[1, -2], [3, 4]])
    rec = R.Dense(name="0.0", inputs=[0], out_fmt=QFormat(8, 4), w_fmt=QFormat(8, 6), acc_frac=9, W=W,
                  c=np.zeros(2, np.int64), extra={"note": np.int64(3)})
    W[0, 0] = 99
    assert rec.W[0, 0] == 1 and rec.W.dtype == np.int8 and rec.inputs == (0,) and rec.block is None
    assert rec.attrs["note"] == 3 and "block" not in rec.attrs
    with pytest.raises(ValueError, match="weight codes outside"):
        R.Dense(name="d", inputs=[0], out_fmt=QFormat(8, 4), w_fmt=QFormat(4, 2), acc_frac=6,
                W=np.full((2, 2), 9), c=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="attribute 'acc_frac': must be an integer"):
        R.Dense(name="d", inputs=[0], out_fmt=QFormat(8, 4), w_fmt=QFormat(8, 2), acc_frac=1.5,
                W=np.zeros((2, 2), int), c=np.zeros(2, np.int64))


def test_walk_names_steps_by_layer_path_and_folds_batchnorm():
    rng = np.random.default_rng(9)
    model = _cnn(rng)
    steps = list(walk(model))
    assert [s.name for s in steps[:4]] == ["0.0+0.1", "0.2", "0.3", "1.0.body.0+1.0.body.1"]
    assert isinstance(steps[0], Affine) and steps[0].bn is model[0][1] and steps[0].inputs == (0,)
    assert isinstance(steps[1], Op) and isinstance(steps[1].layer, L.ReLU) and steps[1].inputs == (1,)
    junction = next(s for s in steps if isinstance(s, Junction))
    assert junction.name == "1.0" and junction.inputs == (6, 3)          # body output, identity shortcut
    lone = next(s for s in steps if isinstance(s, ChannelAffine))
    assert lone.name == "1.2"
    bn = model[0][1]
    W, c = fold_batchnorm(model[0][0].params["W"], model[0][0].params["c"], bn.params["gamma"],
                          bn.params["beta"], bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)
    np.testing.assert_array_equal(steps[0].W, W)
    np.testing.assert_array_equal(steps[0].c, c)
    im = compile_integer(model, rng.normal(size=(3, 2, 8, 8)), width=8)
    assert [r.name for r in im.records[1:]] == [s.name for s in steps]


def test_integer_conv_uses_the_conv_layers_im2col():
    """One im2col: the float twin of the integer convolution is the Conv2d layer's forward."""
    rng = np.random.default_rng(10)
    conv = L.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), rng=1, dtype=np.float64)
    x = rng.normal(size=(2, 3, 7, 6))
    y = I.conv2d(x, conv.params["W"], conv.stride, conv.padding, np.matmul) + conv.params["c"].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, conv.forward(x, train=False), rtol=1e-12, atol=1e-12)
    codes = rng.integers(-100, 100, size=x.shape)
    Wq = rng.integers(-100, 100, size=conv.params["W"].shape)
    got = I.conv2d(codes, Wq, conv.stride, conv.padding, I.matmul_int)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, I.conv2d(codes.astype(float), Wq.astype(float), conv.stride,
                                                conv.padding, np.matmul).astype(np.int64))


# ------------------------------------------------------------------------------------------------
# formats that use every bit (issue 12.2): unsigned formats, per-channel weights, MSE calibration
# ------------------------------------------------------------------------------------------------
def test_relu_fed_records_get_unsigned_formats_and_nothing_else_does():
    rng = np.random.default_rng(20)
    f64 = dict(dtype=np.float64)
    model = L.Sequential(
        L.Sequential(L.Dense(6, 8, rng=rng, **f64), L.ReLU()),                      # unsigned
        L.Sequential(L.Dense(8, 8, rng=rng, **f64), L.LeakyReLU(0.1)),              # signed
        # the Dense output feeds the ReLU and the residual sum: it must stay signed
        L.Sequential(L.Dense(8, 8, rng=rng, **f64), L.Residual(L.Sequential(L.ReLU(), L.Dense(8, 8, rng=rng, **f64)))),
        L.Sequential(L.Dense(8, 3, rng=rng, **f64), L.Sigmoid()))
    x = rng.normal(size=(32, 6))
    im = compile_integer(model, x, width=8)
    signed = {r.name: r.out_fmt.signed for r in im.records}
    assert signed["input"] and not signed["0.0"] and not signed["0.1"]            # input can be negative
    assert signed["1.0"] and signed["1.1"] and signed["2.0"] and signed["2.1.body.0"]   # a ReLU keeps its input format
    assert not signed["3.1"] and im.output_fmt.frac == 8                           # sigmoid table: every code
    assert all(r.out_fmt.signed for r in compile_integer(model, x, width=8, unsigned=False).records)
    assert all(r.out_fmt.signed for r in compile_integer(model, x, width=8, overflow="wrap").records[:-1])
    im_pos = compile_integer(model, np.abs(x), width=8)
    assert not im_pos.input_fmt.signed and im_pos.input_fmt.frac == calibrate_weight(np.abs(x), 8, signed=False).frac
    # an unsigned format is the ReLU: the trace has no negative codes and equals relu(signed) closely
    t = im.run(im.quantize_input(x))
    ref = np.maximum(model[0][0].forward(x, train=False), 0)
    got = dequantize(t[1], im.formats[1])
    assert t[1].dtype == np.uint8 and np.all(got[ref == 0] == 0) and np.abs(got - ref).max() < 0.05


def test_unsigned_gains_one_bit_of_resolution():
    rng = np.random.default_rng(21)
    model = L.Sequential(L.Sequential(L.Dense(6, 32, rng=rng, dtype=np.float64), L.ReLU()))
    x = rng.normal(size=(64, 6))
    a, b = compile_integer(model, x, width=6, unsigned=True), compile_integer(model, x, width=6, unsigned=False)
    assert a.formats[-1].frac == b.formats[-1].frac + 1
    ref = model.forward(x, train=False)
    assert np.abs(a.infer(x) - ref).mean() < np.abs(b.infer(x) - ref).mean()


def test_fit_fracs_vectorised_equals_the_scalar_fit():
    from bll_ref.fixedpoint.calibrate import _fit_frac, _fit_fracs
    rng = np.random.default_rng(22)
    lo = -np.exp(rng.uniform(-50, 50, 400)) * (rng.random(400) < 0.8)
    hi = np.exp(rng.uniform(-50, 50, 400)) * (rng.random(400) < 0.8)
    lo[:6], hi[:6] = [-1, -0.5, -128, 0, -1e-300, -2.0 ** -70], [0.5, 1, 127, 0, 0, 2.0 ** 70]
    for width in (2, 4, 8, 16, 32):
        for signed in (True, False):
            want = [_fit_frac(a, b, width, signed) for a, b in zip(lo, hi)]
            assert _fit_fracs(lo, hi, width, signed).tolist() == want


def test_per_channel_dense_by_hand():
    """Channel 0 weights are 1/64 of channel 1's: per-channel fracs differ by 6, the bias and the
    accumulator of each channel sit at in_frac + w_frac[o], and y[o] is requantised per channel."""
    dense = L.Dense(2, 2, dtype=np.float64)
    dense.params["W"][...] = [[0.5 / 64, 0.5], [-0.25 / 64, -0.25]]
    dense.params["c"][...] = [0.01, 0.1]
    x = np.array([[1.0, 0.5], [-1.0, 0.25]])
    im = compile_integer(L.Sequential(dense), x, width=8, per_channel=True, input_fmt=QFormat(8, 6))
    rec = im.records[1]
    assert rec.w_frac.tolist() == [7 + 6, 7] and rec.w_fmt.frac == 7 and rec.acc_frac == 13
    assert rec.W.tolist() == [[64, 64], [-32, -32]]                   # full resolution in both channels
    assert rec.c.tolist() == [round(0.01 * 2 ** 19), round(0.1 * 2 ** 13)]
    xq = im.quantize_input(x).astype(np.int64)
    acc = xq @ rec.W.astype(np.int64) + rec.c
    want = np.stack([requantize(acc[:, 0], 19, im.output_fmt), requantize(acc[:, 1], 13, im.output_fmt)], 1)
    np.testing.assert_array_equal(im.run(xq)[-1], want)
    per_tensor = compile_integer(L.Sequential(dense), x, width=8, input_fmt=QFormat(8, 6)).records[1]
    assert per_tensor.w_frac is None and per_tensor.W[:, 0].tolist() == [1, 0]      # channel 0 mostly lost


def test_per_channel_conv_and_scale_match_the_float_model():
    rng = np.random.default_rng(23)
    model = _cnn(rng)
    for layer in (model[0][0],):
        layer.params["W"][1] *= 1e-3                                     # one tiny output channel
    x = rng.normal(size=(6, 2, 8, 8))
    ref = model.forward(x, train=False)
    pc = compile_integer(model, x, width=12, per_channel=True)
    assert any(isinstance(r, R.Scale) and r.w_frac is not None for r in pc.records)
    assert len(set(pc.records[1].w_frac.tolist())) > 1
    err_pc = np.abs(pc.infer(x) - ref).max()
    assert err_pc < 0.05 * np.abs(ref).max()
    rebuilt = IntegerModel.from_records([{"attrs": r.attrs, "arrays": r.arrays} for r in pc.records])
    for a, b in zip(rebuilt.run(pc.quantize_input(x)), pc.run(pc.quantize_input(x))):
        np.testing.assert_array_equal(a, b)


def test_per_channel_records_are_checked():
    W = np.array([[1, 2], [3, 4]])
    fmt = QFormat(8, 5)
    with pytest.raises(ValueError, match="min"):
        R.Dense(name="d", inputs=(0,), out_fmt=fmt, w_fmt=fmt, acc_frac=10, W=W, c=[0, 0], w_frac=[6, 7])
    with pytest.raises(ValueError, match="w_frac"):
        R.Dense(name="d", inputs=(0,), out_fmt=fmt, w_fmt=fmt, acc_frac=10, W=W, c=[0, 0], w_frac=[5, 6, 7])
    d = R.Dense(name="d", inputs=(0,), out_fmt=fmt, w_fmt=fmt, acc_frac=10, W=W, c=[0, 0], w_frac=[5, 7])
    assert d.channel_acc_fracs().tolist() == [10, 12] and "w_frac" in d.arrays


@pytest.mark.parametrize("signed", [True, False])
def test_mse_calibration_picks_the_least_squared_error_frac(signed):
    rng = np.random.default_rng(24)
    x = rng.standard_t(2, size=4000)                                  # long tails: clipping pays
    if not signed:
        x = np.abs(x)
    for width in (4, 6, 8):
        fmt = calibrate_activation_mse(x, width, signed=signed)
        errs = {f: np.mean((dequantize(quantize(x, QFormat(width, f, signed)), QFormat(width, f, signed)) - x) ** 2)
                for f in range(-4, 24)}
        assert errs[fmt.frac] == min(errs.values())
        if width == 4:
            assert fmt.frac > calibrate_weight(x, width, signed=signed).frac    # clips the tails
    model = L.Sequential(L.Sequential(L.Dense(4, 16, rng=1, dtype=np.float64), L.ReLU()))
    cal = rng.standard_t(2, size=(256, 4))
    im = compile_integer(model, cal, width=6, calibration="mse")
    want = calibrate_activation_mse(np.maximum(model[0][0].forward(cal, train=False), 0), 6, signed=False)
    assert im.records[1].out_fmt == want                # the Dense before the ReLU, unsigned
    with pytest.raises(ValueError, match="calibration"):
        compile_integer(model, cal, calibration="kl")


def test_out_formats_override_calibration():
    rng = np.random.default_rng(25)
    model = _mlp(rng)
    x = rng.normal(size=(32, 12))
    fixed = {"input": QFormat(8, 4), "0.0": QFormat(8, 3, signed=False), "2.2": QFormat(8, 2).to_dict()}
    im = compile_integer(model, x, width=8, out_formats=fixed)
    by = {r.name: r.out_fmt for r in im.records}
    assert by["input"] == QFormat(8, 4) and by["0.0"] == by["0.1"] == QFormat(8, 3, signed=False)
    assert by["2.2"] == QFormat(8, 2)
    with pytest.raises(ValueError, match="no records"):
        compile_integer(model, x, width=8, out_formats={"9.9": QFormat(8, 2)})


def test_per_channel_export_is_format_version_2_and_round_trips(tmp_path):
    import h5py

    from exporters import hdf5
    rng = np.random.default_rng(26)
    model = L.Sequential(L.Sequential(L.Dense(6, 5, rng=rng), L.ReLU()), L.Sequential(L.Dense(5, 3, rng=rng)))
    model[0][0].params["W"][:, 0] *= 1e-2
    x = rng.normal(size=(16, 6)).astype(np.float32)
    plain, pc = tmp_path / "plain.h5", tmp_path / "pc.h5"
    hdf5.export(model, plain, x)
    e = hdf5.export(model, pc, x, per_channel=True, calibration="mse")
    assert hdf5.verify(plain)["format_version"] == 3
    rep = hdf5.verify(pc)
    assert rep["ok"] and rep["format_version"] == 3 and rep["options"]["per_channel"] is True
    back = hdf5.read(pc)
    np.testing.assert_array_equal(back.records[1].w_frac, e.records[1].w_frac)
    assert len(set(back.records[1].w_frac.tolist())) > 1
    with h5py.File(pc, "r+") as f:                 # a v1 file cannot hold per-channel records
        f.attrs["format_version"] = 1
    with pytest.raises(hdf5.ExportFormatError, match="format_version 2"):
        hdf5.read(pc)


def test_output_width_widens_only_the_last_record():
    rng = np.random.default_rng(27)
    model = L.Sequential(L.Sequential(L.Dense(6, 8, rng=rng, dtype=np.float64), L.ReLU()),
                         L.Sequential(L.Dense(8, 4, rng=rng, dtype=np.float64)))
    x = rng.normal(size=(32, 6))
    a, b = compile_integer(model, x, width=4), compile_integer(model, x, width=4, output_width=16)
    assert [f.width for f in b.formats] == [4, 4, 4, 16] and a.formats[:3] == b.formats[:3]
    assert b.formats[-1].frac == calibrate_activation(model.forward(x, train=False), 16).frac
    ref = model.forward(x, train=False)
    assert np.abs(b.infer(x) - ref).mean() < np.abs(a.infer(x) - ref).mean()
    with pytest.raises(ValueError, match="output_width"):
        compile_integer(L.Sequential(L.Dense(6, 8, rng=rng, dtype=np.float64), L.ReLU()), x, width=4, output_width=16)


# ------------------------------------------------------------------------------------------------
# calibration of a classifier's output for argmax (issue 24 item 7)
# ------------------------------------------------------------------------------------------------
def test_calibrate_argmax_fits_the_runner_up_by_hand():
    """Runner-ups 5.28 and 2: at 4 bits 5.28 * 2**0 <= 7 - 1 but 5.28 * 2 > 6, so frac 0; at 8 bits
    5.28 * 16 = 84.5 <= 126 < 5.28 * 32, so frac 4. The -100 and the winner 9 saturate."""
    logits = np.array([[9.0, 5.28, -100.0], [1.0, 2.0, 3.0]])
    f4, f8 = calibrate_argmax(logits, 4), calibrate_argmax(logits, 8)
    assert (f4.frac, f4.signed, f8.frac) == (0, True, 4)
    assert quantize(logits, f4).tolist() == [[7, 5, -8], [1, 2, 3]]
    assert calibrate_argmax(np.array([[6.5, 9.0, 0.0]]), 4).frac == -1   # runner-up 6.5 > 7 - 1: coarser
    assert calibrate_argmax(np.array([[3.0, 6.5, 0.0]]), 4).frac == 1    # runner-up 3: 3 * 2 <= 6
    with pytest.raises(ValueError, match="saturate"):
        calibrate_argmax(logits, 8, overflow="wrap")
    with pytest.raises(ValueError, match="C >= 2"):
        calibrate_argmax(logits[:, :1], 8)


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 16), st.integers(0, 2 ** 31), st.sampled_from(["floor", "nearest", "nearest_even"]))
def test_calibrate_argmax_keeps_every_clear_winner(width, seed, rounding):
    """On the calibration rows: whenever the winner beats the runner-up by more than one step, the
    quantised row has the same argmax, however far the winner and the losers lie outside the range."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(64, 10)) * rng.uniform(0.1, 20) + rng.normal(size=(64, 1)) * 5
    logits[rng.integers(0, 64, 8), rng.integers(0, 10, 8)] *= 30          # outliers either way
    fmt = calibrate_argmax(logits, width, rounding=rounding)
    s = np.sort(logits, axis=1)
    clear = s[:, -1] - s[:, -2] > 2.0 ** -fmt.frac
    q = quantize(logits, fmt)
    assert np.array_equal(np.argmax(q, 1)[clear], np.argmax(logits, 1)[clear])
    assert (q.max(axis=1)[clear] > np.sort(q, axis=1)[clear, -2]).all()   # a strict winner, no tie
    finer = QFormat(width, fmt.frac + 1, True, rounding)                   # frac + 1 clips some runner-up
    assert (quantize(s[:, -2], finer) >= finer.max_code - 1).any() or s[:, -2].max() <= 0


def test_export_defaults_are_the_measured_best(tmp_path):
    """bll-ref export: 16-bit logits at every width; per-tensor p99.9 from 8 bits up, per-channel MSE
    below; a narrower output calibrated for argmax unless --output-calibration range."""
    assert export_defaults(8) == {"output_width": 16, "calibration": "percentile", "per_channel": False}
    assert export_defaults(4) == {"output_width": 16, "calibration": "mse", "per_channel": True}
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--sizes", "784,24,16,10", "--epochs", "1", "--limit-train", "300",
                 "--limit-test", "50", "--method", "bp", "--out", str(run)]) == 0
    ck = str(run / "checkpoint.npz")

    def export(name, *opts):
        assert main(["export", ck, "--out", str(tmp_path / name), "--calibration", "64", "--traces", "4", *opts]) == 0
        assert hdf5.verify(tmp_path / name)["ok"]
        return hdf5.read(tmp_path / name)
    e8, e4 = export("w8.h5", "--width", "8"), export("w4.h5", "--width", "4")
    assert [r.out_fmt.width for r in e8.records] == [8] * (len(e8.records) - 1) + [16]
    assert all(getattr(r, "w_frac", None) is None for r in e8.records) and "calibration" not in e8.options
    assert [r.out_fmt.width for r in e4.records][-2:] == [4, 16] and e4.options["calibration"] == "mse"
    assert any(getattr(r, "w_frac", None) is not None for r in e4.records)
    narrow = export("o8.h5", "--width", "8", "--output-width", "8")
    ranged = export("o8r.h5", "--width", "8", "--output-width", "8", "--output-calibration", "range")
    cal = training_inputs(e8.meta, "auto", False, limit_train=64, limit_test=1)["x_train"][:64]
    model = e8.float_model()
    assert narrow.records[-1].out_fmt == calibrate_argmax(model.forward(cal, train=False), 8)
    assert ranged.records[-1].out_fmt == compile_integer(model, cal, width=8, percentile=99.9).records[-1].out_fmt
    assert [r.out_fmt for r in narrow.records[:-1]] == [r.out_fmt for r in ranged.records[:-1]]
    assert narrow.options.get("out_formats") == "given" and "out_formats" not in ranged.options  # the argmax path ran
