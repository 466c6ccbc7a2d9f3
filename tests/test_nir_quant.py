"""NIR with quantisation metadata (docs/nir-quant.md): ``write_nir(..., quant=export)`` puts each
node's integer codes and Q formats in ``metadata["quant"]``; ``nir.read`` reads them back, and the
integer trace recomputed from the NIR file alone (graph edges + metadata, the float input) equals
the HDF5 export's traces bit for bit."""
import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref import models
from bll_ref.cli import main
from exporters import hdf5
from exporters.nir import write_nir
from test_doc_reader import quantize, run_record  # the minimal reader written from docs/hdf5-format.md
from test_export_golden import _cnn_avg, _resnet

nir = pytest.importorskip("nir")


# ------------------------------------------------------------------------------------------------
# integer inference from a NIR graph read by nir.read (docs/nir-quant.md), nothing else
# ------------------------------------------------------------------------------------------------
def _order(graph):
    """Node names in an order where every node comes after the sources of its incoming edges."""
    srcs = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}
    done, order = set(), []
    while len(order) < len(srcs):
        ready = [n for n in srcs if n not in done and all(s in done for s in srcs[n])]
        assert ready, "the graph has a cycle"
        for n in sorted(ready):
            done.add(n)
            order.append(n)
    return order, srcs


def _fmt(q):
    return {"width": int(q["width"]), "frac": int(q["frac"]), "signed": bool(q["signed"]),
            "rounding": str(q["rounding"]), "overflow": str(q["overflow"])}


def nir_integer_trace(path, x):
    """{node name: output codes} for float inputs ``x`` (N, *input_shape), from the .nir file."""
    graph = nir.read(str(path))
    assert int(graph.metadata["quant"]["version"]) == 1
    order, srcs = _order(graph)
    y, fmts = {}, {}
    for name in order:
        node, q = graph.nodes[name], graph.nodes[name].metadata["quant"]
        kind, out = str(q["kind"]), _fmt(q["output"])
        fmts[name] = out
        xs = [y[s] for s in srcs[name]]
        in_q = [fmts[s] for s in srcs[name]]
        rec = {"kind": kind, "out_fmt": out}
        arrays = {}
        if kind == "input":
            y[name] = quantize(x, out)
            continue
        if kind == "output":
            assert out == in_q[0]
            y[name] = xs[0]
            continue
        if kind in ("dense", "conv2d", "scale"):
            W = np.asarray(q["weight"]["codes"]).astype(np.int64)
            acc_frac = np.asarray(q["acc_frac"]).astype(np.int64)     # an int, or (out,) per channel
            assert np.array_equal(q["bias"]["frac"], acc_frac)
            assert np.array_equal(acc_frac, in_q[0]["frac"] + np.asarray(q["weight"]["frac"]))
            arrays["c"] = np.asarray(q["bias"]["codes"]).astype(np.int64)
            if isinstance(node, nir.Affine):         # y = W x + b on vectors: W (out, in)
                rec["kind"], arrays["W"] = "dense", W.T
            else:                                    # nir.Conv2d: W (out, in, kh, kw)
                rec["kind"], arrays["W"] = "conv2d", W
                rec["stride"], rec["padding"] = [int(v) for v in node.stride], [int(v) for v in node.padding]
        elif kind == "avgpool2d":
            rec.update(kernel_size=[int(v) for v in node.kernel_size], stride=[int(v) for v in node.stride],
                       recip=int(q["recip"]), recip_shift=int(q["recip_shift"]))
        if kind in ("dense", "conv2d", "scale"):     # requantize each output channel at its acc_frac
            fr = np.broadcast_to(acc_frac, arrays["c"].shape)
            out_codes = None
            for f in np.unique(fr):
                yf = run_record({**rec, "acc_frac": int(f)}, arrays, xs, in_q)
                out_codes = yf if out_codes is None else out_codes
                out_codes[:, fr == f] = yf[:, fr == f]
            y[name] = out_codes
            continue
        y[name] = run_record(rec, arrays, xs, in_q)
    return y


# ------------------------------------------------------------------------------------------------
# models with a NIR mapping, covering every node kind that carries quant metadata
# ------------------------------------------------------------------------------------------------
def _mlp_bn():
    g = np.random.default_rng(7)
    bn = L.BatchNorm(10)
    bn.buffers["running_mean"][:] = g.normal(0, 0.3, 10)
    bn.buffers["running_var"][:] = g.uniform(0.5, 2.0, 10)
    return L.Sequential(L.Sequential(L.Dense(12, 10, rng=g), L.ReLU(), bn),      # a lone BN: Affine(diag)
                        L.Sequential(L.Residual(L.Sequential(L.Dense(10, 10, rng=g), L.ReLU())), L.Dense(10, 4, rng=g)))


NETS = {"mlp": (lambda: L.Sequential(*models.mlp((12, 16, 8, 4), activation_name="relu", rng=0)), (12,)),
        "mlp_bn": (_mlp_bn, (12,)), "cnn_avg": (_cnn_avg, (2, 12, 12)), "resnet": (_resnet, (1, 8, 8))}
CASES = [("mlp", 8, "nearest", "saturate"), ("mlp_bn", 4, "floor", "wrap"), ("mlp_bn", 16, "nearest_even", "saturate"),
         ("cnn_avg", 8, "nearest", "saturate"), ("cnn_avg", 5, "nearest_even", "wrap"), ("resnet", 12, "floor", "saturate")]


def _both(tmp_path, net, width, rounding, ovf, per_channel=False):
    build, shape = NETS[net]
    model = build()
    x = np.random.default_rng(width).normal(size=(10,) + shape).astype(np.float32)
    e = hdf5.export(model, tmp_path / "m.h5", x, width=width, rounding=rounding, overflow=ovf, n_traces=10,
                    per_channel=per_channel)
    path = write_nir(model, tmp_path / "m.nir", input_shape=shape, quant=tmp_path / "m.h5")
    return e, path, x


@pytest.mark.parametrize("net,width,rounding,ovf,per_channel", [c + (False,) for c in CASES] + [
    ("mlp_bn", 8, "nearest", "saturate", True), ("cnn_avg", 6, "floor", "wrap", True)])
def test_integer_trace_from_the_nir_file_alone_equals_the_hdf5_traces(tmp_path, net, width, rounding, ovf,
                                                                        per_channel):
    e, path, x = _both(tmp_path, net, width, rounding, ovf, per_channel)
    if per_channel:                                  # channels with different fracs are exercised
        assert any(np.ptp(r.w_frac) > 0 for r in e.records if getattr(r, "w_frac", None) is not None)
    got = nir_integer_trace(path, x)
    assert set(got) == {r.name for r in e.records} | {"output"}
    for rec, t in zip(e.records, e.traces):
        assert got[rec.name].shape == t.shape and np.array_equal(got[rec.name], t.astype(np.int64)), rec.name
    assert np.array_equal(got["output"], e.traces[-1])


def test_cases_cover_every_quantised_node_kind(tmp_path):
    kinds = set()
    for net, width, rounding, ovf in CASES:
        _, path, _ = _both(tmp_path, net, width, rounding, ovf)
        kinds |= {str(n.metadata["quant"]["kind"]) for n in nir.read(str(path)).nodes.values()}
    assert kinds == {"input", "dense", "conv2d", "scale", "relu", "avgpool2d", "flatten", "add", "output"}


def test_quant_metadata_reads_back_as_codes_and_formats(tmp_path):
    e, path, _ = _both(tmp_path, "mlp", 8, "nearest", "saturate")
    graph = nir.read(str(path))
    node, rec = graph.nodes["0.0"], e.records[1]
    q = node.metadata["quant"]
    assert str(q["kind"]) == "dense" and str(node.metadata["bll_ref_layer"]) == "Dense"
    assert np.array_equal(q["weight"]["codes"], rec.W.T) and q["weight"]["codes"].dtype == rec.W.dtype
    assert np.array_equal(q["bias"]["codes"], rec.c) and int(q["bias"]["frac"]) == rec.acc_frac
    assert _fmt(q["weight"]) == rec.w_fmt.to_dict() and _fmt(q["output"]) == rec.out_fmt.to_dict()
    # the float weights are still the model's: a consumer without quant support reads the same graph
    w = np.ldexp(q["weight"]["codes"].astype(np.float64), -int(q["weight"]["frac"]))
    assert np.abs(w - node.weight).max() <= 2.0 ** -(int(q["weight"]["frac"]) + 1) + 1e-7
    plain = write_nir(NETS["mlp"][0](), tmp_path / "plain.nir", input_shape=(12,))
    assert all("quant" not in n.metadata for n in nir.read(str(plain)).nodes.values())


def test_quant_from_another_model_is_refused(tmp_path):
    _both(tmp_path, "mlp", 8, "nearest", "saturate")
    other = L.Sequential(*models.mlp((12, 16, 8, 4), activation_name="relu", rng=1))
    with pytest.raises(ValueError, match="other weights than the model's"):
        write_nir(other, tmp_path / "o.nir", input_shape=(12,), quant=tmp_path / "m.h5")
    smaller = L.Sequential(*models.mlp((12, 16, 4), activation_name="relu", rng=0))
    with pytest.raises(ValueError, match="do not belong to this model"):
        write_nir(smaller, tmp_path / "o.nir", input_shape=(12,), quant=tmp_path / "m.h5")


def test_cli_nir_with_quant(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--sizes", "784,16,10", "--activation", "relu", "--epochs", "1",
                 "--limit-train", "200", "--limit-test", "50", "--out", str(run)]) == 0
    h5, out = tmp_path / "m.h5", tmp_path / "m.nir"
    assert main(["export", str(run / "checkpoint.npz"), "--out", str(h5), "--calibration", "32", "--traces", "6"]) == 0
    assert main(["nir", str(run / "checkpoint.npz"), "--out", str(out), "--quant", str(h5)]) == 0
    e = hdf5.read(h5)
    got = nir_integer_trace(out, e.calibration_x)
    assert all(np.array_equal(got[r.name], t) for r, t in zip(e.records, e.traces))
