"""Format version 3: an export describes its own input normalisation (raw sensor values -> input
codes, root attribute ``input_normalisation``) and each record's accumulator / bias widths (record
group attributes), docs/hdf5-format.md sections 6 and 8."""
import json

import h5py
import numpy as np
import pytest

from bll_ref import data
from bll_ref import layers as L
from exporters import hdf5
from exporters.hdf5 import ExportFormatError
from exporters.hdf5_layout import WIDTH_KEYS, record_widths
from exporters.hls4ml_tb import hls4ml_names, precision_table

MODES = [("floor", 8, "saturate"), ("nearest", 16, "wrap"), ("nearest_even", 6, "saturate")]


# ------------------------------------------------------------------------------------------------
# the recipe of section 8, from the file's attributes alone (h5py + NumPy)
# ------------------------------------------------------------------------------------------------
def _codes_from_raw(path, raw):
    """Input codes of raw sensor values, computed as docs/hdf5-format.md section 8 says, using only
    the file's root attribute ``input_normalisation``."""
    with h5py.File(path, "r") as f:
        norm = json.loads(f.attrs["input_normalisation"])
    assert norm["status"] == "known"
    raw = np.asarray(raw)
    assert raw.dtype == np.dtype(norm["raw_dtype"])
    assert norm["raw_min"] <= raw.min() and raw.max() <= norm["raw_max"]
    ft = np.dtype(norm["float_dtype"]).type
    x = raw.reshape((len(raw),) + tuple(norm["input_shape"])).astype(ft)
    x = (x / ft(norm["scale_divisor"]) - ft(norm["mean"])) / ft(norm["std"])
    q = norm["input_format"]
    v = np.ldexp(x.astype(np.float64), q["frac"])                       # exact
    fl = np.floor(v)
    r = {"floor": fl, "nearest": fl + (v - fl >= 0.5), "nearest_even": np.rint(v)}[q["rounding"]].astype(np.int64)
    w = q["width"]
    lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if q["signed"] else (0, (1 << w) - 1)
    return x, (np.clip(r, lo, hi) if q["overflow"] == "saturate" else (r - lo) % (1 << w) + lo)


def _fake_fashion_mnist(root, rng, n=40):
    """Four IDX files of random uint8 images, laid out as Fashion-MNIST (no dataset needed)."""
    root.mkdir(exist_ok=True)
    for split, m in (("train", n), ("t10k", 4)):
        data.write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, size=(m, 28, 28), dtype=np.uint8))
        data.write_idx(root / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, size=m, dtype=np.uint8))
    return root


def _sources(tmp_path):
    out = [_fake_fashion_mnist(tmp_path / "fake", np.random.default_rng(24))]
    if data.fashion_mnist_available():
        out.append(None)                     # the real dataset ($BLL_DATA or the default path)
    return out


@pytest.mark.parametrize("rounding,width,overflow", MODES)
@pytest.mark.parametrize("flatten", [True, False])
def test_input_codes_recomputed_from_raw_pixels_with_the_file_attributes_only(tmp_path, rounding, width,
                                                                               overflow, flatten):
    for k, root in enumerate(_sources(tmp_path)):
        n = 32
        x = data.load_fashion_mnist(root, flatten=flatten, limit_train=n, limit_test=1)["x_train"]
        raw = data.load_fashion_mnist(root, normalize=False, dtype=np.uint8, flatten=False,
                                      limit_train=n, limit_test=1)["x_train"]
        g = np.random.default_rng(k)
        model = L.Sequential(L.Sequential(L.Dense(784, 10, rng=g))) if flatten else \
            L.Sequential(L.Sequential(L.Conv2d(1, 2, 3, rng=g), L.ReLU()), L.Sequential(L.Flatten()))
        path = tmp_path / f"m{k}-{rounding}-{flatten}.h5"
        hdf5.export(model, path, x, width=width, rounding=rounding, overflow=overflow, percentile=99.0,
                    n_traces=20, meta={"data": "fashion-mnist"})
        xr, codes = _codes_from_raw(path, raw[:20])
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(xr, f["calibration/x"][()])
            np.testing.assert_array_equal(codes, f["calibration/x_codes"][()])
        assert hdf5.verify(path)["ok"]


def test_data_not_known_to_bll_ref_data_is_stored_as_unknown_with_a_reason(tmp_path):
    model = L.Sequential(L.Sequential(L.Dense(6, 3, rng=0)))
    x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    for meta, why in (({"data": "synthetic"}, "no raw sensor values"), ({}, "no 'data' entry"),
                      ({"data": "fashion-mnist"}, "neither [784] nor [1, 28, 28]"), ({"data": "cifar"}, "not image")):
        e = hdf5.export(model, tmp_path / "u.h5", x, meta=meta)
        norm = hdf5.read(tmp_path / "u.h5").input_normalisation
        assert norm == e.input_normalisation and norm["status"] == "unknown" and why in norm["reason"]
        assert norm["input_format"]["frac"] == e.records[0].out_fmt.frac


# ------------------------------------------------------------------------------------------------
# accumulator and bias widths
# ------------------------------------------------------------------------------------------------
def _model(g):
    body = L.Sequential(L.Conv2d(2, 3, 3, padding=1, rng=g), L.BatchNorm(3), L.ReLU(), L.AvgPool2d(3, stride=1))
    return L.Sequential(body, L.Sequential(L.Flatten(), L.Dense(12, 4, rng=g), L.Sigmoid()))


@pytest.fixture
def exported(tmp_path):
    g = np.random.default_rng(7)
    x = g.normal(size=(16, 2, 4, 4)).astype(np.float32)
    path = tmp_path / "w.h5"
    return path, hdf5.export(_model(g), path, x, width=8, per_channel=True, n_traces=4)


def _ap_width_frac(t):
    w, i = (int(v) for v in t.split("<")[1].split(",")[:2])
    return w, w - i


def test_widths_round_trip_and_equal_the_precision_table(exported):
    path, e = exported
    r = hdf5.read(path)
    fmts = [rec.out_fmt for rec in e.records]
    assert r.widths == [record_widths(rec, [fmts[j] for j in rec.inputs]) for rec in e.records]
    assert {k for w in r.widths for k in w} == set(WIDTH_KEYS)           # affine and avgpool2d records
    table = precision_table(r)["HLSConfig"]["LayerName"]
    names = hls4ml_names(r.records)
    for rec, w in zip(r.records, r.widths):
        p = table[names[rec.name]]["Precision"]
        for part in ("accum", "bias"):
            if f"{part}_width" in w:
                assert _ap_width_frac(p[part]) == (w[f"{part}_width"], w[f"{part}_frac"])
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == hdf5.FORMAT_VERSION == 3
        grp = f["integer/records/001_conv2d"]
        assert {k: int(grp.attrs[k]) for k in WIDTH_KEYS} == r.widths[1]


@pytest.mark.parametrize("value,match", [(1, "but its record's codes need"), (0, r"outside 1\.\.128"),
                                         ("wide", "must be int")])
def test_a_tampered_width_is_refused_by_read_and_verify(exported, value, match):
    path, e = exported
    with h5py.File(path, "r+") as f:
        a = f["integer/records/001_conv2d"].attrs
        a["accum_width"] = a["accum_width"] + 1 if value == 1 else value
    for check in (hdf5.read, hdf5.verify):
        with pytest.raises(ExportFormatError, match=rf"group /integer/records/001_conv2d attribute 'accum_width'.*{match}"
                           if value != "wide" else match):
            check(path)


def test_a_width_on_a_record_without_accumulator_and_a_missing_width_are_refused(exported):
    path, _ = exported
    with h5py.File(path, "r+") as f:
        f["integer/records/002_relu"].attrs["bias_width"] = 3
    with pytest.raises(ExportFormatError, match="'relu' record has no bias"):
        hdf5.read(path)
    with h5py.File(path, "r+") as f:
        del f["integer/records/002_relu"].attrs["bias_width"]
        del f["integer/records/001_conv2d"].attrs["bias_width"]
    with pytest.raises(ExportFormatError, match="001_conv2d has no attribute 'bias_width'"):
        hdf5.verify(path)


def test_a_tampered_input_normalisation_is_refused(tmp_path):
    g = np.random.default_rng(3)
    path = tmp_path / "n.h5"
    x = data.load_fashion_mnist(_fake_fashion_mnist(tmp_path / "fake", g), limit_train=8, limit_test=1)["x_train"]
    hdf5.export(L.Sequential(L.Sequential(L.Dense(784, 3, rng=g))), path, x, meta={"data": "fashion-mnist"})
    good = json.loads(h5py.File(path, "r").attrs["input_normalisation"])
    for change, match in (({"std": -0.3}, "std > 0"), ({"raw_max": "255"}, "'raw_max' must be int"),
                          ({"input_shape": [28, 28]}, "'input_shape' is"), ({"status": "maybe"}, "status"),
                          ({"input_format": {**good["input_format"], "frac": 0}}, "'input_format' is")):
        with h5py.File(path, "r+") as f:
            f.attrs["input_normalisation"] = json.dumps({**good, **change})
        with pytest.raises(ExportFormatError, match=match):
            hdf5.read(path)


# ------------------------------------------------------------------------------------------------
# older versions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_a_file_of_a_previous_version_without_the_new_attributes_still_reads(exported, version):
    path, e = exported
    with h5py.File(path, "r+") as f:           # the previous layout: no version-3 attributes
        del f.attrs["input_normalisation"]
        for grp in f["integer/records"].values():
            for k in WIDTH_KEYS:
                if k in grp.attrs:
                    del grp.attrs[k]
        f.attrs["format_version"] = version
    if version == 1:                           # per-channel records need version 2
        with pytest.raises(ExportFormatError, match="need format_version 2"):
            hdf5.read(path)
        return
    r = hdf5.read(path)
    assert r.format_version == 2 and r.input_normalisation is None and r.widths is None
    assert hdf5.verify(path)["ok"]
    with h5py.File(path, "r+") as f:           # the same file claiming version 3 lacks what 3 requires
        f.attrs["format_version"] = 3
    with pytest.raises(ExportFormatError, match="001_conv2d has no attribute 'accum_width'"):
        hdf5.read(path)


def test_a_version_1_file_rewritten_from_its_data_stays_version_1(tmp_path):
    model = L.Sequential(L.Sequential(L.Dense(6, 3, rng=0), L.ReLU()))
    x = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
    e = hdf5.export(model, tmp_path / "a.h5", x)
    e.format_version, e.input_normalisation = 1, None
    hdf5.write(e, tmp_path / "v1.h5")
    with h5py.File(tmp_path / "v1.h5", "r") as f:
        assert f.attrs["format_version"] == 1 and "input_normalisation" not in f.attrs
        assert not any(k in g.attrs for g in f["integer/records"].values() for k in WIDTH_KEYS)
    r = hdf5.read(tmp_path / "v1.h5")
    assert r.format_version == 1 and r.widths is None and hdf5.verify(tmp_path / "v1.h5")["ok"]
