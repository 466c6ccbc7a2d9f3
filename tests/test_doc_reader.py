"""A second reader of the HDF5 export, written from docs/hdf5-format.md alone (NumPy + h5py, no
bll_ref import inside the reader), run over exports of every exportable layer kind, every rounding
and overflow mode and every width 2..16; it must agree with ``exporters.hdf5.verify`` record by
record, on good files and on a file with a wrong trace.

The reader is deliberately minimal: one function per helper of section 10, one branch per record
kind, the input codes recomputed from /calibration/x (section 8) and the float twins ``W_float`` /
``c_float`` rebuilt from /model with the BatchNorm folding of section 5.
"""
import json

import h5py
import numpy as np
import pytest


# ================================================================================================
# the reader (docs/hdf5-format.md; nothing from bll_ref)
# ================================================================================================
def round_shift(v, s, mode):
    """R(v / 2^s), exact (section 10); s <= 0 is the exact product v * 2^-s."""
    v = np.asarray(v, dtype=np.int64)
    if s <= 0:
        return v * (1 << -s)
    if s >= 63:                                   # |v / 2^s| < 1/2: floor gives -1 or 0, the others 0
        return np.where(v < 0, -1, 0) if mode == "floor" else np.zeros_like(v)
    q, r = np.divmod(v, np.int64(1) << s)
    h = np.int64(1) << (s - 1)
    return {"floor": q, "nearest": q + (r >= h),
            "nearest_even": q + ((r > h) | ((r == h) & (q % 2 == 1)))}[mode]


def code_range(q):
    w = q["width"]
    return (-(1 << (w - 1)), (1 << (w - 1)) - 1) if q["signed"] else (0, (1 << w) - 1)


def overflow(v, q):
    lo, hi = code_range(q)
    return np.clip(v, lo, hi) if q["overflow"] == "saturate" else (v - lo) % (1 << q["width"]) + lo


def requantize(acc, acc_frac, q):
    """overflow(round_shift(acc, acc_frac - frac)); a left shift by k is computed as section 10
    says: saturate clamps acc to 2^(62-k') and shifts by k' = min(k, 40), wrap keeps the low bits
    first (0 when k >= width)."""
    s = acc_frac - q["frac"]
    if s < 0:
        k = -s
        if q["overflow"] == "saturate":
            k = min(k, 40)
            acc = np.clip(acc, -(1 << (62 - k)), 1 << (62 - k))
        else:
            acc, k = (acc % (1 << q["width"]), k) if k < q["width"] else (np.zeros_like(acc), 0)
        s = -k
    return overflow(round_shift(acc, s, q["rounding"]), q)


def quantize(x, q):
    """Section 8: overflow(R(x * 2^F)) on the exact product."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):      # inf - inf: saturated anyway
        v = np.ldexp(x, q["frac"])
        r = {"floor": np.floor, "nearest_even": np.rint,
             "nearest": lambda t: np.floor(t) + (t - np.floor(t) >= 0.5)}[q["rounding"]](v)
    r = np.where((v == 0) & (x < 0) & (q["rounding"] == "floor"), -1.0, r)   # underflow keeps floor's -1
    lo, hi = code_range(q)
    if q["overflow"] == "saturate":
        r = np.clip(r, lo - 1.0, hi + 1.0)
    else:                                         # an overflowed product is a multiple of 2^W: wraps to 0
        r = np.mod(np.where(np.isinf(r), 0.0, r), float(1 << q["width"]))
    return overflow(r.astype(np.int64), q)


def windows(x, k, s):
    """The kh*kw shifted views x[:, :, i*sh + u, j*sw + v] of a (N, C, H, W) array."""
    (kh, kw), (sh, sw) = k, s
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return [x[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] for u in range(kh) for v in range(kw)]


def requantize_channels(acc, rec, A, q, axis):
    """Section 12: with per-channel weight formats (dataset w_frac), channel o's accumulator has
    acc_frac + w_frac[o] - w_fmt.frac fractional bits; else every channel has acc_frac."""
    if "w_frac" not in A:
        return requantize(acc, rec["acc_frac"], q)
    fr = rec["acc_frac"] + A["w_frac"].astype(np.int64) - rec["w_fmt"]["frac"]
    y = np.zeros(acc.shape, np.int64)
    for f in np.unique(fr):
        sel = [slice(None)] * acc.ndim
        sel[axis] = fr == f
        y[tuple(sel)] = requantize(acc[tuple(sel)], int(f), q)
    return y


def run_record(rec, A, xs, in_q):
    """Section 10's table, one row per branch."""
    q, x, kind = rec["out_fmt"], xs[0], rec["kind"]
    if kind == "dense":
        return requantize_channels(x @ A["W"].astype(np.int64) + A["c"], rec, A, q, 1)
    if kind == "conv2d":
        W, (ph, pw) = A["W"].astype(np.int64), rec["padding"]
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        kw = W.shape[3]
        acc = sum(np.einsum("nkhw,ok->nohw", p, W[:, :, t // kw, t % kw])
                  for t, p in enumerate(windows(xp, W.shape[2:], rec["stride"])))
        return requantize_channels(acc + A["c"][None, :, None, None], rec, A, q, 1)
    if kind == "scale":
        shp = (1, -1) + (1,) * (x.ndim - 2)
        return requantize_channels(x * A["W"].astype(np.int64).reshape(shp) + A["c"].reshape(shp), rec, A, q, 1)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "leaky_relu":
        return overflow(np.where(x > 0, x, round_shift(x * rec["slope_code"], rec["slope_frac"], q["rounding"])), q)
    if kind == "maxpool2d":
        return np.max(windows(x, rec["kernel_size"], rec["stride"]), axis=0)
    if kind == "avgpool2d":
        s = np.sum(windows(x, rec["kernel_size"], rec["stride"]), axis=0)
        k = rec["kernel_size"][0] * rec["kernel_size"][1]
        d, r = np.divmod(s, np.int64(k))                   # div_round: the exact mean, rounded
        up = {"floor": 0 * r, "nearest": 2 * r >= k, "nearest_even": (2 * r > k) | ((2 * r == k) & (d % 2 == 1))}
        return overflow(d + up[q["rounding"]], q)
    if kind == "flatten":
        return x.reshape(len(x), -1)
    if kind == "add":
        fa, fb = in_q[0]["frac"], in_q[1]["frac"]
        f = max(fa, fb)
        return requantize(xs[0] * (1 << (f - fa)) + xs[1] * (1 << (f - fb)), f, q)
    if kind == "lut":
        return A["table"].astype(np.int64)[x - rec["index_offset"]]
    raise ValueError(f"unknown record kind {kind!r}")


def layer_config(model_config, path):
    """The config of the layer at a layer path ("1.0.body.3"): digits index 'layers', body /
    shortcut name a Residual's part (section 5)."""
    cfg = model_config
    for tok in path.split("."):
        cfg = cfg["layers"][int(tok)] if tok.isdigit() else cfg[tok]
    return cfg


def model_arrays(f, path):
    """The /model datasets of the layer at ``path`` (section 5), as float64."""
    block, _, rest = path.partition(".")
    g = f["model"][block][rest] if rest else f["model"][block]
    return {k: g[k][()].astype(np.float64) for k in g if isinstance(g[k], h5py.Dataset)}


def float_twins(f, rec):
    """W_float, c_float of a dense / conv2d / scale record rebuilt from /model (section 5:
    BatchNorm folding, s = gamma / sqrt(running_var + eps))."""
    config = json.loads(f.attrs["model_config"])
    parts = rec["name"].split("+")
    bn_path = parts[-1] if rec["kind"] == "scale" or len(parts) == 2 else None
    if rec["kind"] == "scale":
        n = len(model_arrays(f, bn_path)["running_mean"])
        W, c = np.eye(n), np.zeros(n)
    else:
        a = model_arrays(f, parts[0])
        W = a["W"]
        c = a.get("c", np.zeros(W.shape[1] if W.ndim == 2 else W.shape[0]))
    if bn_path is not None:
        bn = model_arrays(f, bn_path)
        s = bn["gamma"] / np.sqrt(bn["running_var"] + float(layer_config(config, bn_path)["eps"]))
        shape = (1, -1) if W.ndim == 2 else (-1, 1, 1, 1)
        W, c = W * s.reshape(shape), (c - bn["running_mean"]) * s + bn["beta"]
    return (np.diag(W).copy(), c) if rec["kind"] == "scale" else (W, c)


def read_and_check(path):
    """Rerun every record from the file; returns (per-record equality with the stored trace,
    x_codes == quantised x, float twins == rebuilt from /model)."""
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "bll_ref-fixedpoint" and f.attrs["format_version"] <= 3
        g = f["integer/records"]
        names = sorted(g, key=lambda s: int(s.split("_")[0]))
        assert len(names) == f["integer"].attrs["n_records"]
        recs = [json.loads(g[s].attrs["record"]) for s in names]
        arrs = [{k: g[s][k][()] for k in g[s]} for s in names]
        x_codes = f["calibration/x_codes"][()].astype(np.int64)
        inputs_ok = np.array_equal(quantize(f["calibration/x"][()], recs[0]["out_fmt"]), x_codes)
        twins_ok = all(np.array_equal(w, A["W_float"]) and np.array_equal(c, A["c_float"])
                       for rec, A in zip(recs, arrs) if rec["kind"] in ("dense", "conv2d", "scale")
                       for w, c in [float_twins(f, rec)])
        y = [x_codes]
        for rec, A in zip(recs[1:], arrs[1:]):
            y.append(run_record(rec, A, [y[j] for j in rec["inputs"]], [recs[j]["out_fmt"] for j in rec["inputs"]]))
        same = []
        for i, rec in enumerate(recs):
            d = f["nodes"][rec["name"]]["observables/codes/data"]
            stored = d[()].reshape((d.shape[0],) + tuple(d.attrs["shape"]))
            same.append(y[i].shape == stored.shape and np.array_equal(y[i], stored.astype(np.int64)))
    return same, inputs_ok, twins_ok


# ================================================================================================
# the matrix
# ================================================================================================
from bll_ref import layers as L  # noqa: E402  (the tests use bll_ref; the reader above does not)
from exporters import hdf5       # noqa: E402

ROUNDINGS = ("floor", "nearest", "nearest_even")
OVERFLOWS = ("saturate", "wrap")


def _bn(n, g):
    bn = L.BatchNorm(n, eps=1e-3)
    bn.buffers["running_mean"][:] = g.normal(0, 0.3, n)
    bn.buffers["running_var"][:] = g.uniform(0.5, 2.0, n)
    bn.params["gamma"][:] = g.uniform(0.5, 1.5, n)
    bn.params["beta"][:] = g.normal(0, 0.2, n)
    return bn


def _mlp(g):
    """Dense (+ folded BN, no bias), LeakyReLU, lone BN (scale), Sigmoid and Tanh tables, ReLU,
    a residual with an identity shortcut; a block that is a bare layer (block 4)."""
    return L.Sequential(
        L.Sequential(L.Dense(12, 10, bias=False, rng=g), _bn(10, g), L.LeakyReLU(0.2)),
        L.Sequential(_bn(10, g), L.Sigmoid(), L.Dense(10, 8, rng=g), L.Tanh()),
        L.Sequential(L.Residual(L.Sequential(L.Dense(8, 8, rng=g), L.ReLU())), L.ReLU()),
        L.Sequential(L.Dense(8, 5, rng=g)),
        L.Dense(5, 3, rng=g))


def _cnn(g):
    """Conv2d (+ folded BN, padding, stride), ReLU, a residual with a projection shortcut and one
    with an identity shortcut, MaxPool2d, lone BN on images, AvgPool2d 2x2 and 3x3 (a reciprocal
    that is not a power of two), Tanh, Flatten, Dense."""
    body = L.Sequential(L.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, rng=g), _bn(4, g), L.ReLU(),
                        L.Conv2d(4, 4, 3, padding=1, rng=g))
    shortcut = L.Sequential(L.Conv2d(3, 4, 1, stride=2, rng=g), _bn(4, g))
    return L.Sequential(
        L.Sequential(L.Conv2d(2, 3, 3, padding=1, rng=g), _bn(3, g), L.ReLU()),
        L.Sequential(L.Residual(body, shortcut), L.ReLU(), L.Residual(L.Sequential(L.Conv2d(4, 4, 1, rng=g)))),
        L.Sequential(L.MaxPool2d(2, stride=1), _bn(4, g), L.AvgPool2d(2), L.Tanh()),
        L.Sequential(L.AvgPool2d(3, stride=1), L.Flatten(), L.Dense(4, 3, rng=g)))


NETS = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (2, 14, 14))}
ALL_KINDS = {"input", "dense", "conv2d", "scale", "relu", "leaky_relu", "maxpool2d", "avgpool2d", "flatten", "add",
             "lut"}


def _matrix():
    """Every width 2..16 with every rounding x overflow mode on the MLP; on the CNN every width
    with the six modes in turn (each mode meets widths across the range)."""
    modes = [(r, o) for r in ROUNDINGS for o in OVERFLOWS]
    cases = [("mlp", w, r, o) for w in range(2, 17) for r, o in modes]
    cases += [("cnn", w, *modes[(w + k) % 6]) for w in range(2, 17) for k in (0, 3)]
    return cases


def _export(path, net, width, rounding, ovf, seed=0):
    build, shape = NETS[net]
    g = np.random.default_rng(seed)
    model = build(g)
    x = (g.normal(size=(24,) + shape) * g.uniform(0.2, 3.0)).astype(np.float32)
    pct = 100.0 if width % 2 else 99.0           # 99: outliers saturate (or wrap)
    return hdf5.export(model, path, x, width=width, rounding=rounding, overflow=ovf, percentile=pct, n_traces=6)


def test_models_cover_every_record_kind(tmp_path):
    kinds, signedness = set(), set()
    for net in NETS:
        records = _export(tmp_path / f"{net}.h5", net, 8, "nearest", "saturate").records
        kinds |= {r.kind for r in records}
        signedness |= {r.out_fmt.signed for r in records}
    assert kinds == ALL_KINDS
    assert signedness == {True, False}          # signed and unsigned formats both reach the reader


def test_layernorm_is_not_exportable(tmp_path):
    model = L.Sequential(L.Sequential(L.Dense(4, 4, rng=0), L.LayerNorm(4)))
    with pytest.raises(ValueError, match="LayerNorm"):
        hdf5.export(model, tmp_path / "m.h5", np.ones((4, 4), np.float32))


def test_doc_reader_agrees_with_verify_over_the_matrix(tmp_path):
    cases = _matrix()
    assert len(cases) == 15 * 6 + 15 * 2
    for net, width, rounding, ovf in cases:
        path = tmp_path / f"{net}-{width}-{rounding}-{ovf}.h5"
        _export(path, net, width, rounding, ovf, seed=width)
        same, inputs_ok, twins_ok = read_and_check(path)
        rep = hdf5.verify(path)
        where = f"{net} width {width} {rounding}/{ovf}"
        assert inputs_ok and twins_ok, where
        assert same == [r["n_diff"] == 0 for r in rep["records"]], where
        assert all(same) and rep["ok"], where
        path.unlink()


def test_doc_reader_agrees_with_verify_on_per_channel_and_mse_exports(tmp_path):
    """Section 12: per-channel weight formats (format version 2) and MSE-calibrated formats."""
    for net in sorted(NETS):
        build, shape = NETS[net]
        for width, rounding, calibration in ((3, "floor", "mse"), (6, "nearest_even", "percentile"),
                                             (8, "nearest", "mse"), (12, "nearest", "percentile")):
            g = np.random.default_rng(width)
            model = build(g)
            x = (g.normal(size=(24,) + shape) * 1.5).astype(np.float32)
            path = tmp_path / f"{net}-{width}.h5"
            e = hdf5.export(model, path, x, width=width, rounding=rounding, per_channel=True,
                            calibration=calibration, percentile=99.0, n_traces=6)
            assert any(len(set(r.w_frac.tolist())) > 1 for r in e.records if getattr(r, "w_frac", None) is not None)
            same, inputs_ok, _ = read_and_check(path)
            rep = hdf5.verify(path)
            assert rep["format_version"] == 3 and inputs_ok and all(same) and rep["ok"], (net, width)


@pytest.mark.parametrize("net", sorted(NETS))
def test_doc_reader_and_verify_agree_on_a_wrong_trace(tmp_path, net):
    e = _export(tmp_path / "m.h5", net, 6, "nearest_even", "wrap")
    k = len(e.records) - 2
    e.traces[k] = e.traces[k].copy()
    e.traces[k].flat[3] ^= 1                      # one wrong code, written with valid checksums
    hdf5.write(e, tmp_path / "bad.h5")
    same, _, _ = read_and_check(tmp_path / "bad.h5")
    rep = hdf5.verify(tmp_path / "bad.h5")
    assert same == [r["n_diff"] == 0 for r in rep["records"]]
    assert same.count(False) == 1 and not same[k] and not rep["ok"]


def test_doc_quantize_equals_bll_ref_at_the_float_extremes():
    """Section 8's overflow / underflow / half cases: the doc's rule equals bll_ref's quantize."""
    from bll_ref.fixedpoint import QFormat
    from bll_ref.fixedpoint import quantize as bll_quantize
    tiny = np.nextafter(0.0, 1.0)
    x = np.array([0.0, -0.0, tiny, -tiny, 1e-310, -1e-310, 1e-300, -1e-300, 0.49999999999999994, -0.5, 0.5, 1.5,
                  2.0 ** 52 + 1, -(2.0 ** 53), 1e300, -1e300, 1.7e308, -1.7e308, 3.0, -3.0, 1e-20, -1e-20])
    for width in (2, 5, 8, 16, 32):
        for frac in (-64, -30, -1, 0, 1, 7, 30, 64):
            for signed in (True, False):
                for rounding in ROUNDINGS:
                    for ovf in OVERFLOWS:
                        f = QFormat(width, frac, signed, rounding, ovf)
                        mine = quantize(x, f.to_dict())
                        assert np.array_equal(mine, bll_quantize(x, f).astype(np.int64)), f


def test_doc_requantize_equals_bll_ref_for_every_shift():
    """Section 10's right shifts beyond 63 bits and exact left shifts, against bll_ref's requantize."""
    from bll_ref.fixedpoint import QFormat
    from bll_ref.fixedpoint import requantize as bll_requantize
    g = np.random.default_rng(0)
    acc = np.concatenate([g.integers(-(1 << 62), 1 << 62, 200), g.integers(-300, 300, 200),
                          [-(1 << 62), (1 << 62) - 1, -1, 0, 1]]).astype(np.int64)
    for width in (2, 7, 16, 32):
        for signed in (True, False):
            for rounding in ROUNDINGS:
                for ovf in OVERFLOWS:
                    for shift in (-128, -70, -63, -41, -40, -33, -32, -5, -1, 0, 1, 5, 40, 62, 63, 64, 100, 128):
                        f = QFormat(width, 0, signed, rounding, ovf)
                        want = bll_requantize(acc, shift, f).astype(np.int64)
                        assert np.array_equal(requantize(acc, shift, f.to_dict()), want), (f, shift)


def test_the_format_docs_own_helpers_equal_bll_ref():
    """The helpers printed in docs/hdf5-format.md section 10 (executed from the document itself)."""
    import pathlib
    import re
    from bll_ref.fixedpoint import QFormat
    from bll_ref.fixedpoint import requantize as bll_requantize
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "hdf5-format.md").read_text()
    block = re.search(r"```python\n(import json, h5py.*?)\nwith h5py.File", doc, re.S).group(1)
    ns = {}
    exec(block, ns)                                # noqa: S102 - our own document
    g = np.random.default_rng(1)
    acc = np.concatenate([g.integers(-(1 << 62), 1 << 62, 100), g.integers(-99, 99, 100)]).astype(np.int64)
    for width, signed, rounding, ovf in [(8, True, "nearest", "saturate"), (5, False, "floor", "saturate"),
                                         (16, True, "nearest_even", "wrap"), (3, True, "floor", "wrap")]:
        f = QFormat(width, 0, signed, rounding, ovf)
        for shift in (-100, -41, -7, 0, 3, 62, 63, 64, 90):
            assert np.array_equal(ns["requantize"](acc, shift, f.to_dict()), bll_requantize(acc, shift, f)), (f, shift)


def test_doc_reader_helpers_at_the_extremes():
    """round_shift beyond 63 bits, requantize's exact left shifts, quantize's half cases."""
    v = np.array([-(1 << 62), -3, -1, 0, 1, 3, (1 << 62) - 1], dtype=np.int64)
    assert list(round_shift(v, 64, "floor")) == [-1, -1, -1, 0, 0, 0, 0]
    assert list(round_shift(v, 70, "nearest")) == [0] * 7
    assert list(round_shift(np.array([-3, -1, 1, 3, 5]), 1, "nearest_even")) == [-2, 0, 0, 2, 2]
    assert list(round_shift(np.array([-3, -1, 1, 3, 5]), 1, "nearest")) == [-1, 0, 1, 2, 3]
    q8s = {"width": 8, "frac": 50, "signed": True, "rounding": "nearest", "overflow": "saturate"}
    q8w = dict(q8s, overflow="wrap")
    # left shift by 48: exact result saturates / keeps the low 8 bits of v * 2^48 (0 unless v = 0)
    assert list(requantize(v, 2, q8s)) == [-128, -128, -128, 0, 127, 127, 127]
    assert list(requantize(v, 2, q8w)) == [0] * 7
    assert list(requantize(np.array([1, 3, -1]), 49, q8w)) == [2, 6, -2]
    q = {"width": 4, "frac": 1, "signed": True, "rounding": "nearest", "overflow": "saturate"}
    assert list(quantize([-0.25, 0.25, 0.75, 100.0, -100.0], q)) == [0, 1, 2, 7, -8]
    assert list(quantize([-0.25, 0.25, 0.75], dict(q, rounding="nearest_even"))) == [0, 0, 2]
    assert list(quantize([4.5], dict(q, overflow="wrap"))) == [-7]          # 9 wraps to -7
