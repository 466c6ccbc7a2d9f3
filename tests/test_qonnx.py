"""QONNX export (exporters.qonnx, bll-ref qonnx): qonnx's own executor (``execute_onnx`` on a
``ModelWrapper``: onnxruntime per standard node, qonnx's ``int_quant`` per Quant) runs the file and
every record's tensor equals the HDF5 traces bit for bit; ``onnx.checker`` accepts it; the Quant
nodes carry the formats; what QONNX cannot express is refused with one line and nothing written.

Skipped only when onnx / qonnx are not importable AND ``BLL_REQUIRE_CLIENTS=1`` is not set (CI sets it)."""
import json
import os

import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref.fixedpoint import QFormat, quantize
from exporters import hdf5
from exporters import qonnx as Q

try:
    import onnx
    from onnx import numpy_helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
except ImportError as err:    # only outside CI (see the module docstring)
    if os.environ.get("BLL_REQUIRE_CLIENTS") == "1":
        raise
    pytest.skip(f"onnx / qonnx not installed ({err}); pip install -e '.[test]'", allow_module_level=True)

from clitools import cli, train_and_export
from test_doc_reader import ALL_KINDS, _cnn, _mlp

NETS = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (2, 14, 14))}


def _export(tmp_path, net, width, rounding="nearest", ovf="saturate", per_channel=False, n=7):
    g = np.random.default_rng(width)
    build, shape = NETS[net]
    x = g.normal(size=(3 * n,) + shape).astype(np.float32)
    return hdf5.export(build(g), tmp_path / f"{net}.h5", x, width=width, rounding=rounding, overflow=ovf, n_traces=n,
                       per_channel=per_channel)


def run_qonnx(model, x):
    """qonnx's executor on ``model`` -> (every tensor, the record table of the file)."""
    mw = ModelWrapper(model)
    ctx = execute_onnx(mw, {"x": np.ascontiguousarray(x, dtype=np.float32)}, return_full_exec_context=True)
    return ctx, json.loads(mw.get_metadata_prop("bll_ref_records"))


def record_codes(ctx, rows):
    """record index -> its codes, read from the float32 tensors (value * 2^frac, exact)."""
    out = {}
    for r in rows:
        v = np.asarray(ctx[r["tensor"]], np.float64) * 2.0 ** r["frac"]
        assert np.array_equal(v, np.rint(v)), r          # on the format's grid
        out[r["index"]] = v.astype(np.int64)
    return out


CASES = [(net, w, r, pc) for net in NETS for w in (4, 8) for r in ("floor", "nearest", "nearest_even")
         for pc in (False, True) if not pc or r == "nearest"]


@pytest.mark.parametrize("net,width,rounding,per_channel", CASES)
def test_qonnx_executor_reproduces_every_trace_bit_for_bit(tmp_path, net, width, rounding, per_channel):
    e = _export(tmp_path, net, width, rounding, per_channel=per_channel)
    model = Q.to_qonnx(e, batch=len(e.traces[0]))
    onnx.checker.check_model(model)
    ctx, rows = run_qonnx(model, e.calibration_x)   # the raw float inputs: the input Quant runs too
    got = record_codes(ctx, rows)
    assert [r["index"] for r in rows] == list(range(len(e.records)))
    for i, t in enumerate(e.traces):
        assert got[i].shape == t.shape and np.array_equal(got[i], t.astype(np.int64)), (i, e.records[i].kind)


def test_cases_cover_every_record_kind(tmp_path):
    kinds = {r.kind for net in NETS for r in _export(tmp_path, net, 8).records}
    assert kinds == ALL_KINDS


@pytest.mark.parametrize("rounding", ["floor", "nearest", "nearest_even"])
def test_input_quant_rounds_ties_as_bll_ref(tmp_path, rounding):
    """Every value on a grid four times finer than the codes, incl. each tie k + 1/2, both signs and
    beyond the range: qonnx's Quant (+ the half step for nearest) gives bll_ref's quantize codes."""
    m = L.Sequential(L.Sequential(L.Dense(4, 2, rng=0)))
    e = hdf5.export(m, tmp_path / "m.h5", np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32),
                    width=6, rounding=rounding, n_traces=2)
    fmt = e.records[0].out_fmt
    v = np.arange(-4 * 40, 4 * 40) / 4.0 * fmt.step          # codes -40 .. 40 in quarter steps
    x = v.reshape(-1, 4)
    ctx, rows = run_qonnx(Q.to_qonnx(e, batch=len(x)), x)
    assert np.array_equal(record_codes(ctx, rows)[0], quantize(x, fmt).astype(np.int64))
    if rounding != "floor":      # the modes differ on these ties: the test can tell them apart
        other = QFormat(fmt.width, fmt.frac, fmt.signed, "nearest_even" if rounding == "nearest" else "nearest")
        assert not np.array_equal(quantize(x, fmt), quantize(x, other))


def test_quant_nodes_carry_scale_zero_point_width_sign_and_rounding(tmp_path):
    e = _export(tmp_path, "cnn", 8, "nearest_even")
    model = Q.to_qonnx(e)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = {n.output[0]: n for n in model.graph.node if n.op_type == "Quant"}
    assert all(n.domain == Q.QUANT_DOMAIN for n in quants.values())
    rows = json.loads({p.key: p.value for p in model.metadata_props}["bll_ref_records"])
    n_checked = 0
    for r in rows:
        node = quants.get(r["tensor"])
        if node is None:           # relu, max pooling, flatten, tables: no conversion, no Quant
            assert r["kind"] in ("relu", "maxpool2d", "flatten", "lut")
            continue
        f = e.records[r["index"]].out_fmt
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale, zp, bits = (inits[t] for t in node.input[1:])
        assert scale == 2.0 ** -f.frac and zp == 0 and bits == f.width
        assert attrs == {"signed": int(f.signed), "narrow": 0, "rounding_mode": b"ROUND"}
        n_checked += 1
    assert n_checked >= 10
    w = {n.name: n for n in quants.values() if n.name.endswith("_W_quant")}
    affine = [(r, row) for r, row in zip(e.records, rows) if r.kind in ("dense", "conv2d")]
    assert len(w) == len(affine)
    for rec, row in affine:       # weights: the record's width and frac, values = the codes exactly
        node = w[f"{row['hls4ml_name']}_W_quant"]
        assert inits[node.input[3]] == rec.w_fmt.width and inits[node.input[1]] == 2.0 ** -rec.w_fmt.frac
        W = inits[node.input[0]] * 2.0 ** rec.w_fmt.frac
        assert np.array_equal(W, rec.W.astype(np.float64))


@pytest.mark.parametrize("kw,match", [({"ovf": "wrap"}, "wraps on overflow"),
                                      ({"width": 16}, "beyond float32's exact 2\\^24")])
def test_what_qonnx_cannot_express_is_refused_naming_the_record(tmp_path, kw, match):
    e = _export(tmp_path, "mlp", kw.get("width", 8), ovf=kw.get("ovf", "saturate"))
    with pytest.raises(ValueError, match=match) as err:
        Q.write_qonnx(e, tmp_path / "m.onnx")
    assert "record " in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists() and os.listdir(tmp_path) == ["mlp.h5"]


def test_missing_onnx_is_said_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "onnx", None)
    with pytest.raises(ValueError, match="pip install onnx qonnx"):
        Q.to_qonnx(_export(tmp_path, "mlp", 8))


def test_cli_qonnx_writes_a_file_qonnx_runs_sample_by_sample(tmp_path, capsys):
    _, ck, h5 = train_and_export(tmp_path)
    out = tmp_path / "model.onnx"
    rc, stdout, _ = cli(capsys, "qonnx", ck, "--quant", h5, "--out", out)
    assert rc == 0 and "wrote" in stdout and out.exists()
    e = hdf5.read(h5)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    for s in range(len(e.traces[0])):          # the file's batch is 1: one sample at a time
        ctx, rows = run_qonnx(model, e.calibration_x[s:s + 1])
        got = record_codes(ctx, rows)
        assert all(np.array_equal(got[i], t[s:s + 1].astype(np.int64)) for i, t in enumerate(e.traces))


def test_cli_qonnx_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, capsys):
    _, ck, h5 = train_and_export(tmp_path)
    wrap = tmp_path / "wrap.h5"
    assert cli(capsys, "export", ck, "--out", wrap, "--overflow", "wrap", "--calibration", "64")[0] == 0
    m2 = L.Sequential(L.Sequential(L.Dense(784, 10, rng=1)))          # an export of another model
    hdf5.export(m2, tmp_path / "alien.h5", np.random.default_rng(1).normal(size=(4, 784)).astype(np.float32),
                n_traces=2)
    out = tmp_path / "m.onnx"
    for args, msg in [((ck, "--quant", wrap), "wraps on overflow"),
                      ((ck, "--quant", tmp_path / "alien.h5"), "was not exported from"),
                      ((ck, "--quant", tmp_path / "missing.h5"), "missing.h5"),
                      ((ck, "--quant", h5, "--batch", "0"), "batch must be a positive integer")]:
        rc, _, err = cli(capsys, "qonnx", *args, "--out", out)
        assert rc == 2 and msg in err and not out.exists(), (args, err)
    rc, _, err = cli(capsys, "qonnx", ck, "--quant", h5, "--out", h5)    # never over its own input
    assert rc == 2 and hdf5.read(h5) is not None
