"""The real hls4ml (1.3.0, ONNX / QONNX frontend, ``compile()`` = its C++ bit-accurate emulation with
g++, no Vivado) reproduces our integer traces bit for bit: the QONNX file of ``bll-ref qonnx``, our
``hls4ml_precision.json`` applied to hls4ml's configuration, ``predict`` on the testbench inputs,
every output code and every layer's codes equal to the HDF5 traces (docs/qonnx.md).

Skipped only when hls4ml / qonnx are not importable AND ``BLL_REQUIRE_CLIENTS=1`` is not set; CI sets it,
so a missing package fails there."""
import json
import os
import shutil

import numpy as np
import pytest

from bll_ref import layers as L
from exporters import hdf5
from exporters.hdf5_layout import common_frac_affine, record_widths
from exporters.hls4ml_tb import write_tb
from exporters.qonnx import write_qonnx

try:
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import (GiveReadableTensorNames, GiveUniqueParameterTensors,
                                              RemoveStaticGraphInputs, RemoveUnusedTensors)
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.quant_constant_folding import FoldTransposeIntoQuantInit
except ImportError as err:     # only outside CI (see the module docstring)
    if os.environ.get("BLL_REQUIRE_CLIENTS") == "1":
        raise
    pytest.skip(f"hls4ml / qonnx not installed ({err}); pip install -e '.[test]'", allow_module_level=True)

from clitools import cli, train_and_export
from test_doc_reader import _bn, _mlp

if shutil.which(os.environ.get("CXX", "g++")) is None and os.environ.get("BLL_REQUIRE_CLIENTS") != "1":
    pytest.skip("no C++ compiler for hls4ml's compile()", allow_module_level=True)


# ------------------------------------------------------------------------------------------------
# the glue between qonnx 1.0 and hls4ml 1.3.0's ONNX frontend
# ------------------------------------------------------------------------------------------------
def _clean(m):
    """qonnx's cleanup_model without its renaming of the nodes (the node names are hls4ml's layer
    names, which our precision file uses); tensors get readable names (hls4ml 1.3.0 prefixes a
    constant whose name starts with a digit, but not the references to it)."""
    for t in (InferShapes(), GiveUniqueParameterTensors(), FoldConstants(exclude_op_types=["Quant"]),
              FoldTransposeIntoQuantInit(), RemoveUnusedTensors(), RemoveStaticGraphInputs()):
        m = m.transform(t)
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type.lower()}_{i}"
    return m.transform(GiveReadableTensorNames())


def _prepare(path, images):
    m = _clean(ModelWrapper(str(path)))
    if images:   # hls4ml computes channels-last
        m = _clean(m.transform(ConvertToChannelsLastAndClean(make_input_channels_last=True)))
        for n in m.graph.node:   # hls4ml broadcasts a Mul / Add constant against the sample, not the batch
            for t in n.input if n.op_type in ("Mul", "Add") else ():
                a = m.get_initializer(t)
                if a is not None and a.ndim == 4 and a.shape[0] == 1:
                    m.set_initializer(t, a.reshape(a.shape[1:]))
    return m


# what hls4ml's optimizer passes call the layer of a record whose QONNX node is N
_MAIN = {"dense": "Dense_{}", "conv2d": "Conv2D_{}", "scale": "bn_{}_bias"}


def hls4ml_config(model, table):
    """hls4ml's configuration of the ONNX model, with our precision file's entries for each layer."""
    cfg = hls4ml.utils.config.config_from_onnx_model(model, granularity="name", backend="Vitis",
                                                     default_precision="fixed<32,16>")
    for row in table["layers"][1:]:
        entry = cfg["LayerName"].setdefault(_MAIN.get(row["kind"], "{}").format(row["hls4ml_name"]), {})
        entry.setdefault("Precision", {}).update(row["Precision"])
        if row.get("table_size"):
            entry["table_size"] = row["table_size"]
        if row.get("table_t"):
            # written by write_tb: hls4ml 1.3.0 types an Activation's table from table_t, not from
            # Precision.table (without it a 6-bit nearest_even sigmoid differed in 1 code)
            entry["table_t"] = row["table_t"]
        entry["Trace"] = True
    for name in list(cfg["LayerName"]):
        cfg["LayerName"][name]["Trace"] = True
    return cfg


def run_hls4ml(tmp_path, e, images):
    """QONNX + testbench of export ``e`` -> hls4ml, compiled; returns (outputs, traces, table, model)."""
    onnx_path = write_qonnx(e, tmp_path / "model.onnx", luts="function")
    tb = write_tb(e, tmp_path / "tb_data", layout="channels_last")
    table = json.load(open(tb["precision"]))
    m = _prepare(onnx_path, images)
    hm = hls4ml.converters.convert_from_onnx_model(m, output_dir=str(tmp_path / "prj"), io_type="io_parallel",
                                                   backend="Vitis", hls_config=hls4ml_config(m, table))
    x = np.ascontiguousarray(np.loadtxt(tb["input"], ndmin=2).astype(np.float32))
    y, trace = hm.trace(x)        # compile() with tracing (g++), then predict keeping every layer's output
    return np.asarray(y).reshape(len(x), -1), trace, table, hm


def codes(v, frac):
    return np.rint(np.asarray(v, np.float64) * 2.0 ** frac).astype(np.int64)


def _channels_last(a):
    return (a.transpose(0, 2, 3, 1) if a.ndim == 4 else a).reshape(a.shape[0], -1)


def check_layers(e, trace, table):
    """Every record whose value hls4ml holds in a layer of its own: its codes equal the trace.
    Returns the number of records compared."""
    n = 0
    for row in table["layers"][1:]:
        name = row["hls4ml_name"]
        for cand in (f"bn_{name}_round_half_up", _MAIN.get(row["kind"], "{}").format(name), name):
            if cand in trace:
                got = codes(np.asarray(trace[cand]).reshape(len(e.traces[0]), -1), row["result_frac"])
                want = _channels_last(e.traces[row["index"]].astype(np.int64))
                assert np.array_equal(got, want), (row["index"], row["kind"], cand, int(np.sum(got != want)))
                n += 1
                break
    return n


def _cnn_every_kind(g):
    """Conv2d (+ folded BN, padding), a residual with a strided body and a strided 1x1 projection
    shortcut (+ folded BN), LeakyReLU, an identity residual, MaxPool2d, a lone BatchNorm, Sigmoid,
    Tanh, Flatten, Dense: every record kind but average pooling (which hls4ml's ONNX path cannot
    take, docs/qonnx.md)."""
    body = L.Sequential(L.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, rng=g), _bn(4, g), L.ReLU(),
                        L.Conv2d(4, 4, 3, padding=1, rng=g))
    shortcut = L.Sequential(L.Conv2d(3, 4, 1, stride=2, rng=g), _bn(4, g))
    return L.Sequential(
        L.Sequential(L.Conv2d(2, 3, 3, padding=1, rng=g), _bn(3, g), L.ReLU()),
        L.Sequential(L.Residual(body, shortcut), L.LeakyReLU(0.1), L.Residual(L.Sequential(L.Conv2d(4, 4, 1, rng=g)))),
        L.Sequential(L.MaxPool2d(2, stride=1), _bn(4, g), L.Sigmoid(), L.Tanh()),
        L.Sequential(L.Flatten(), L.Dense(4 * 6 * 6, 3, rng=g)))


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_hls4ml_reproduces_an_exported_mlp_bit_for_bit(tmp_path, capsys):
    """bll-ref train -> export (8 bits, default nearest) -> qonnx -> hls4ml: every output code."""
    _, ck, h5 = train_and_export(tmp_path)
    assert cli(capsys, "qonnx", ck, "--quant", h5, "--out", tmp_path / "cli.onnx")[0] == 0
    e = hdf5.read(h5)
    y, trace, table, _ = run_hls4ml(tmp_path, e, images=False)
    want = e.traces[-1].astype(np.int64)
    assert y.shape == want.shape and np.array_equal(codes(y, table["layers"][-1]["result_frac"]), want)
    assert check_layers(e, trace, table) == len(e.records) - 1


@pytest.mark.parametrize("net,width,rounding", [("mlp", 8, "nearest"), ("cnn", 8, "nearest"), ("mlp", 4, "floor"),
                                                ("mlp", 6, "nearest_even")])
def test_hls4ml_reproduces_the_every_kind_models_bit_for_bit(tmp_path, net, width, rounding):
    """The MLP with a folded and a lone BatchNorm, LeakyReLU, Sigmoid, Tanh and an identity residual;
    the CNN above; 8 bits nearest (the default), and the MLP in the other two rounding modes: outputs
    and every layer hls4ml keeps."""
    g = np.random.default_rng(width)
    model, shape = (_mlp(g), (12,)) if net == "mlp" else (_cnn_every_kind(g), (2, 14, 14))
    x = g.normal(size=(24,) + shape).astype(np.float32)
    e = hdf5.export(model, tmp_path / "m.h5", x, width=width, rounding=rounding, n_traces=16)
    kinds = {r.kind for r in e.records}
    assert kinds >= {"dense", "scale", "leaky_relu", "lut", "add", "relu"}
    y, trace, table, hm = run_hls4ml(tmp_path, e, images=net == "cnn")
    want = e.traces[-1].astype(np.int64)
    assert np.array_equal(codes(y, table["layers"][-1]["result_frac"]), want)
    # every record but a Flatten (a Reshape hls4ml does not trace) compared layer by layer
    assert check_layers(e, trace, table) == len(e.records) - 1 - sum(r.kind == "flatten" for r in e.records)
    for row in table["layers"]:   # our table sizes (range * 2^F_in) are in the model that ran
        if row["kind"] == "lut":
            assert hm.graph[row["hls4ml_name"]].get_attr("table_size") == row["table_size"]


def test_hls4ml_holds_a_bias_at_the_top_of_its_type_with_nearest_rounding(tmp_path):
    """hls4ml's ONNX route folds the half step of ``nearest`` (Add, then FLOOR) into a Dense's bias: a
    bias code near the top of its narrowest type then needs one more bit. Found on a Fashion-MNIST
    784-32-32-10 MLP (2 codes low); here a bias code is put 32 below the top of a 12-bit type, with a
    half step of 64, and every code must still agree."""
    g = np.random.default_rng(3)
    x = g.normal(size=(24, 12)).astype(np.float32)
    first = L.Dense(12, 6, rng=g)
    model = L.Sequential(first, L.ReLU(), L.Dense(6, 3, rng=g))
    for _ in range(3):      # the bias moves the output format, and so the half step: settle both
        e = hdf5.export(model, tmp_path / "m.h5", x, width=8, rounding="nearest", n_traces=16)
        rec = e.records[1]
        acc_frac, half = common_frac_affine(rec)[2], 1 << (common_frac_affine(rec)[2] - rec.out_fmt.frac - 1)
        top = (1 << (record_widths(rec, [e.records[0].out_fmt])["bias_width"] - 1)) - 1
        first.params["c"][0] = (top - half // 2) / 2.0 ** acc_frac
    e = hdf5.export(model, tmp_path / "m.h5", x, width=8, rounding="nearest", n_traces=16)
    rec = e.records[1]
    c, acc_frac = common_frac_affine(rec)[1:3]
    half = 1 << (acc_frac - rec.out_fmt.frac - 1)
    narrowest = record_widths(rec, [e.records[0].out_fmt])["bias_width"]
    assert int(c.max()) + half > (1 << (narrowest - 1)) - 1       # the case: c + half overflows that type
    y, trace, table, _ = run_hls4ml(tmp_path, e, images=False)
    assert np.array_equal(codes(y, table["layers"][-1]["result_frac"]), e.traces[-1].astype(np.int64))
    assert check_layers(e, trace, table) == len(e.records) - 1
