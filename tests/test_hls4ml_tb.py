"""hls4ml test vectors (exporters.hls4ml_tb, bll-ref export --tb-dir): the .dat files parse back the
way hls4ml's testbench reads them (strtok on " ", atof, float) into exactly code * 2^-frac of the
HDF5 traces, and the precision table's ap_fixed types reproduce the traces when used as hls4ml
uses them (products summed exactly in accum, converted to result with its rounding and overflow)."""
import json
import os
import re

import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref.cli import main
from exporters import hdf5
from exporters.hls4ml_tb import (INPUT_FILE, OUTPUT_FILE, PRECISION_FILE, avgpool_extra_frac, hls4ml_names,
                                 lut_table_size, write_tb)
from test_doc_reader import _cnn, _mlp, requantize  # the minimal reader written from the format doc

_AP = re.compile(r"^ap_(u?)fixed<(\d+),(-?\d+),(AP_TRN|AP_RND|AP_RND_CONV),(AP_SAT|AP_WRAP)>$")
_Q = {"AP_TRN": "floor", "AP_RND": "nearest", "AP_RND_CONV": "nearest_even"}
_O = {"AP_SAT": "saturate", "AP_WRAP": "wrap"}


def parse_ap(t):
    """'ap_fixed<W,I,Q,O>' -> the Q-format dict of docs/hdf5-format.md (frac = W - I)."""
    m = _AP.match(t)
    assert m, t
    w, i = int(m.group(2)), int(m.group(3))
    return {"width": w, "frac": w - i, "signed": m.group(1) == "", "rounding": _Q[m.group(4)],
            "overflow": _O[m.group(5)]}


def read_dat(path):
    """What myproject_test.cpp does with each line: strtok(line, " "), atof, push into vector<float>."""
    rows = []
    with open(path) as fh:
        for line in fh:
            rows.append(np.array([float(t) for t in line.rstrip("\n").split(" ") if t], dtype=np.float32))
    return rows


def _hls4ml_avgpool(x, rec, aq, res):
    """hls4ml's nnet::avg with these types: the window sum in accum (exact), ``y /= n`` (ap_fixed
    division: integer division of the codes at accum's frac, truncated toward zero), then y
    converted to the result type.  Mirrors hls4ml v1.3.0 nnet_pooling.h / ap_fixed_base.h."""
    in_frac = res["frac"]                                      # average pooling keeps the input format
    (kh, kw), (sh, sw) = rec.kernel_size, rec.stride
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    s = sum(x[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw].astype(np.int64)
            for u in range(kh) for v in range(kw))
    acc = s << (aq["frac"] - in_frac)                          # the sum at accum's frac
    n = kh * kw
    q = np.sign(acc) * (np.abs(acc) // n)                      # sdiv: truncation toward zero
    assert np.abs(q).max(initial=0) < 1 << (aq["width"] - 1)   # fits accum
    return requantize(q, aq["frac"], res)


def _hls4ml_lut(x, rec, n):
    """hls4ml's sigmoid / tanh: index = x * table_size / range + table_size / 2, clamped to the
    table; with table_size = range * 2^F_in the entry at index i is the one of input code
    i - table_size / 2 (nnet_activation.h), here taken from bll_ref's own table."""
    assert n >= 2 and n & (n - 1) == 0                          # a power of two: range * 2^F_in
    idx = np.clip(x.astype(np.int64) + n // 2, 0, n - 1)
    return rec.table.astype(np.int64)[idx - n // 2 - rec.index_offset]


def _export(tmp_path, net, width=8, rounding="nearest", ovf="saturate", per_channel=False):
    g = np.random.default_rng(width)
    model, shape = (_mlp(g), (12,)) if net == "mlp" else (_cnn(g), (2, 14, 14))
    x = g.normal(size=(20,) + shape).astype(np.float32)
    return hdf5.export(model, tmp_path / f"{net}.h5", x, width=width, rounding=rounding, overflow=ovf, n_traces=7,
                       per_channel=per_channel)


@pytest.mark.parametrize("net,width,rounding,ovf", [("mlp", 8, "nearest", "saturate"), ("mlp", 16, "floor", "wrap"),
                                                    ("cnn", 6, "nearest_even", "saturate"), ("cnn", 12, "nearest", "wrap")])
def test_dat_files_hold_exactly_the_fixed_point_values_of_the_traces(tmp_path, net, width, rounding, ovf):
    e = _export(tmp_path, net, width, rounding, ovf)
    paths = write_tb(tmp_path / f"{net}.h5", tmp_path / "tb_data")
    assert {os.path.basename(p) for p in paths.values()} == {INPUT_FILE, OUTPUT_FILE, PRECISION_FILE}
    for which, k in (("input", 0), ("output", -1)):
        rows = read_dat(paths[which])
        codes, frac = e.traces[k], e.records[k].out_fmt.frac
        assert len(rows) == codes.shape[0] == 7
        for row, c in zip(rows, codes):
            want = np.ldexp(c.reshape(-1).astype(np.float64), -frac)
            assert row.shape == want.shape and np.array_equal(row.astype(np.float64), want)   # bit-exact
            assert np.array_equal(np.ldexp(row.astype(np.float64), frac).astype(np.int64), c.reshape(-1))
    text = open(paths["input"]).read()
    assert text.count("\n") == 7 and "\t" not in text and "," not in text


def test_channels_last_layout_moves_channels_last(tmp_path):
    e = _export(tmp_path, "cnn")
    p = write_tb(e, tmp_path / "tb", layout="channels_last")
    rows = read_dat(p["input"])
    want = np.ldexp(e.traces[0].transpose(0, 2, 3, 1).reshape(7, -1).astype(np.float64), -e.records[0].out_fmt.frac)
    assert np.array_equal(np.stack(rows).astype(np.float64), want)
    assert json.load(open(p["precision"]))["layout"] == "channels_last"
    with pytest.raises(ValueError, match="layout must be one of"):
        write_tb(e, tmp_path / "tb", layout="nhwc")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file, not a directory"):
        write_tb(e, tmp_path / "afile")


@pytest.mark.parametrize("net,per_channel", [("mlp", False), ("cnn", False), ("mlp", True), ("cnn", True)])
def test_precision_table_types_reproduce_the_traces(tmp_path, net, per_channel):
    e = _export(tmp_path, net, 7, "nearest_even", "wrap", per_channel)
    table = json.load(open(write_tb(e, tmp_path / "tb")["precision"]))
    assert table["HLSConfig"]["Model"]["Precision"] == e.records[0].out_fmt.hls_type
    assert [row["name"] for row in table["layers"]] == [r.name for r in e.records]
    assert set(table["HLSConfig"]["LayerName"]) == {row["hls4ml_name"] for row in table["layers"]}
    assert len(table["HLSConfig"]["LayerName"]) == len(e.records)        # one hls4ml name per record
    layers, widened, luts = table["layers"], 0, 0
    for i, (rec, row) in enumerate(zip(e.records, layers)):
        p = row["Precision"]
        assert p == table["HLSConfig"]["LayerName"][row["hls4ml_name"]]["Precision"]
        assert all(_AP.match(t) for t in p.values()), p
        res = parse_ap(p["result"])
        assert res["frac"] == rec.out_fmt.frac and res["width"] == rec.out_fmt.width
        if rec.kind == "avgpool2d":
            assert np.array_equal(_hls4ml_avgpool(e.traces[rec.inputs[0]], rec, parse_ap(p["accum"]), res),
                                  e.traces[i].astype(np.int64)), rec.name
        if rec.kind == "lut":
            n = table["HLSConfig"]["LayerName"][row["hls4ml_name"]]["table_size"]
            assert n == {"sigmoid": 16, "tanh": 8}[rec.function] * 2 ** e.records[rec.inputs[0]].out_fmt.frac
            if lut_table_size(rec, e.records[rec.inputs[0]].out_fmt)[1]:     # no clamping difference
                luts += 1
                assert np.array_equal(_hls4ml_lut(e.traces[rec.inputs[0]], rec, n), e.traces[i].astype(np.int64))
        if rec.kind not in ("dense", "conv2d", "scale"):
            continue
        x = e.traces[rec.inputs[0]].astype(np.int64)
        wq, bq, aq = parse_ap(p["scale" if rec.kind == "scale" else "weight"]), parse_ap(p["bias"]), parse_ap(p["accum"])
        # one weight type per tensor: per-channel formats (w_frac) aligned to the finest channel
        w_frac = rec.w_frac if rec.w_frac is not None else np.full(rec.c.shape, rec.w_fmt.frac)
        assert per_channel == (rec.w_frac is not None)
        shift = wq["frac"] - w_frac
        assert shift.min() == 0 and wq["width"] == rec.w_fmt.width + shift.max()
        widened += int(shift.max() > 0)
        # bias and accumulator types hold the codes exactly, at acc_frac = in frac + weight frac
        in_frac = e.records[rec.inputs[0]].out_fmt.frac
        assert bq["frac"] == aq["frac"] == in_frac + wq["frac"]
        c = rec.c << shift
        lo, hi = -(1 << (bq["width"] - 1)), (1 << (bq["width"] - 1)) - 1
        assert lo <= c.min() and c.max() <= hi
        W = rec.W.astype(np.int64)
        if rec.kind == "dense":
            acc = x @ (W << shift[None, :]) + c
        elif rec.kind == "scale":
            shp = (1, -1) + (1,) * (x.ndim - 2)
            acc = x * (W << shift).reshape(shp) + c.reshape(shp)
        else:
            from bll_ref.fixedpoint.intops import conv2d, matmul_int
            acc = conv2d(x, W << shift[:, None, None, None], rec.stride, rec.padding, matmul_int) + c.reshape(1, -1, 1, 1)
        amax = 1 << (aq["width"] - 1)
        assert -amax <= acc.min() and acc.max() < amax
        # hls4ml: result = accum converted to the result type (its Q and O modes)
        assert np.array_equal(requantize(acc, aq["frac"], res), e.traces[i].astype(np.int64)), rec.name
    assert (widened > 0) == per_channel          # per-channel fracs that differ are exercised
    assert luts > 0                               # hls4ml's table indexing is exercised


def test_cli_export_writes_test_vectors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--sizes", "784,16,10", "--epochs", "1", "--limit-train", "200",
                 "--limit-test", "50", "--out", str(run)]) == 0
    tb = tmp_path / "proj" / "tb_data"
    assert main(["export", str(run / "checkpoint.npz"), "--out", str(tmp_path / "m.h5"), "--calibration", "32",
                 "--traces", "5", "--tb-dir", str(tb)]) == 0
    assert "wrote hls4ml test vectors" in capsys.readouterr().out
    e = hdf5.read(tmp_path / "m.h5")
    rows = read_dat(tb / OUTPUT_FILE)
    assert len(rows) == 5 and all(r.shape == (10,) for r in rows)
    assert np.array_equal(np.stack(rows).astype(np.float64),
                          np.ldexp(e.traces[-1].astype(np.float64), -e.records[-1].out_fmt.frac))
    assert len(read_dat(tb / INPUT_FILE)[0]) == 784
    kinds = [row["kind"] for row in json.load(open(tb / PRECISION_FILE))["layers"]]
    assert kinds[0] == "input" and "leaky_relu" in kinds


def test_write_tb_from_a_model_with_every_kind_covers_their_precisions(tmp_path):
    e = _export(tmp_path, "cnn")
    table = json.load(open(write_tb(e, tmp_path / "tb")["precision"]))
    by_kind = {}
    for row in table["layers"]:
        by_kind.setdefault(row["kind"], set()).update(row["Precision"])
    assert by_kind["conv2d"] == {"weight", "bias", "result", "accum"}
    assert by_kind["scale"] == {"scale", "bias", "result", "accum"}
    assert by_kind["avgpool2d"] == {"result", "accum"} and by_kind["lut"] == {"result", "table"}
    m = L.Sequential(L.Sequential(L.Dense(4, 3, rng=0), L.LeakyReLU(0.1)))
    e2 = hdf5.export(m, tmp_path / "l.h5", np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    row = json.load(open(write_tb(e2, tmp_path / "tb2")["precision"]))["layers"][2]
    assert row["kind"] == "leaky_relu" and parse_ap(row["Precision"]["param"])["width"] == 16


def test_layer_names_are_the_torch_fx_names_hls4ml_gives_a_mirrored_twin(tmp_path):
    """torch.fx: a leaf module's path with '.' -> '_' and '_' before a leading digit; the sums of the
    residuals 'add', 'add_1', ... in execution order; the input the forward argument 'x'."""
    e = _export(tmp_path, "cnn")
    names = hls4ml_names(e.records)
    assert len(set(names.values())) == len(names)
    want = {"input": "x", "0.0+0.1": "_0_0", "0.2": "_0_2", "1.0.body.0+1.0.body.1": "_1_0_body_0",
            "1.0.shortcut.0+1.0.shortcut.1": "_1_0_shortcut_0", "1.0": "add", "1.2": "add_1", "1.1": "_1_1",
            "3.0": "_3_0", "3.2": "_3_2"}
    assert {k: names[k] for k in want} == want
    table = json.load(open(write_tb(e, tmp_path / "tb")["precision"]))
    assert table["input"]["hls4ml_name"] == "x" and table["output"]["hls4ml_name"] == "_3_2"
    assert [row["hls4ml_name"] for row in table["layers"]] == [names[r.name] for r in e.records]


def test_avgpool_accum_has_ceil_log2_2k_more_fractional_bits(tmp_path):
    assert [avgpool_extra_frac(k) for k in (1, 2, 4, 9, 16, 49, 64)] == [1, 2, 3, 5, 5, 7, 7]
    e = _export(tmp_path, "cnn", 8, "floor")
    table = json.load(open(write_tb(e, tmp_path / "tb")["precision"]))
    rows = [row for row in table["layers"] if row["kind"] == "avgpool2d"]
    assert rows
    for row in rows:
        rec, in_fmt = e.records[row["index"]], e.records[row["inputs"][0]].out_fmt
        k = rec.kernel_size[0] * rec.kernel_size[1]
        aq = parse_ap(row["Precision"]["accum"])
        assert aq["frac"] == in_fmt.frac + avgpool_extra_frac(k)
        assert table["HLSConfig"]["LayerName"][row["hls4ml_name"]]["Precision"]["accum"] == row["Precision"]["accum"]
