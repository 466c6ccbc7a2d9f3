"""NIR export (read back with the real ``nir`` package) and the C golden model (compiled with the
system C compiler, bit-exact against ``IntegerModel.run``)."""
import copy
import os
import re
import subprocess

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from bll_ref import layers as L
from bll_ref import models
from bll_ref.fixedpoint import (RECORD_KINDS, IntegerModel, QFormat, compile_integer, div_round, fold_batchnorm,
                                overflow, requantize, round_shift)
from exporters import c_golden, c_header
from exporters.c_header import compile_c, find_c_compiler, write_c
from exporters.nir import to_nir_dict, write_nir

try:
    import nir
except ImportError:                    # the C tests still run
    nir = None
needs_nir = pytest.mark.skipif(nir is None, reason="the NIR tests read files back with the real nir "
                                                   "package (pip install nir)")

D = np.float64


def _bn(n, rng, dtype=D):
    """BatchNorm with non-trivial eval statistics, so folding changes the weights."""
    b = L.BatchNorm(n, dtype=dtype)
    b.buffers["running_mean"][:] = rng.normal(0.0, 0.3, n)
    b.buffers["running_var"][:] = rng.uniform(0.5, 2.0, n)
    b.params["gamma"][:] = rng.uniform(0.5, 1.5, n)
    b.params["beta"][:] = rng.normal(0.0, 0.2, n)
    return b


# ------------------------------------------------------------------------------------------------
# NIR
# ------------------------------------------------------------------------------------------------
def _windows(x, kh, kw, sh, sw):
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _run_nir(graph, x):
    """Evaluate a read-back NIR graph as a static network: signals on several incoming edges are
    summed (NIR semantics), IF nodes act as ReLU (the documented rate-coded mapping)."""
    preds = {name: [a for a, b in graph.edges if b == name] for name in graph.nodes}
    vals, todo = {}, list(graph.nodes)
    while todo:
        name = next(n for n in todo if all(p in vals for p in preds[n]))
        todo.remove(name)
        node = graph.nodes[name]
        u = x if isinstance(node, nir.Input) else sum(vals[p] for p in preds[name])
        if isinstance(node, nir.Affine):
            u = u @ node.weight.T + node.bias
        elif isinstance(node, nir.Conv2d):
            (sh, sw), (ph, pw) = node.stride, node.padding
            assert tuple(node.dilation) == (1, 1) and node.groups == 1
            xp = np.pad(u, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
            win = _windows(xp, *node.weight.shape[2:], sh, sw)
            u = np.einsum("nchwij,ocij->nohw", win, node.weight) + node.bias.reshape(1, -1, 1, 1)
        elif isinstance(node, nir.IF):
            u = np.maximum(u, 0.0)
        elif isinstance(node, nir.AvgPool2d):
            assert not np.any(node.padding)
            u = _windows(u, *node.kernel_size, *node.stride).mean(axis=(-2, -1))
        elif isinstance(node, nir.Flatten):
            assert node.start_dim == 0 and node.end_dim == -1
            u = u.reshape(u.shape[0], -1)
        elif isinstance(node, nir.Scale):
            u = u * node.scale
        else:
            assert isinstance(node, (nir.Input, nir.Output)), type(node)
        vals[name] = u
    (out,) = [n for n, v in graph.nodes.items() if isinstance(v, nir.Output)]
    return vals[out]


@needs_nir
def test_nir_mlp_reads_back_with_affine_weights_transposed(tmp_path):
    blocks = models.mlp((12, 16, 10, 6), activation_name="relu", rng=0)
    path = write_nir(blocks, tmp_path / "mlp.nir", input_shape=(12,))
    g = nir.read(path)
    assert nir.serialization.read_version(path) == "1.0.8"
    assert list(g.nodes) == ["input", "0.0", "0.1", "1.0", "1.1", "2.0", "output"]
    assert g.edges == [("input", "0.0"), ("0.0", "0.1"), ("0.1", "1.0"), ("1.0", "1.1"),
                       ("1.1", "2.0"), ("2.0", "output")]
    kinds = [type(n).__name__ for n in g.nodes.values()]
    assert kinds == ["Input", "Affine", "IF", "Affine", "IF", "Affine", "Output"]
    for k, block in enumerate(blocks):
        dense = block.layers[0]
        aff = g.nodes[f"{k}.0"]
        assert aff.weight.shape == dense.params["W"].T.shape
        np.testing.assert_array_equal(aff.weight, dense.params["W"].T)
        np.testing.assert_array_equal(aff.bias, dense.params["c"])
        assert aff.weight.dtype == np.float32
    relu = g.nodes["0.1"]
    np.testing.assert_array_equal(relu.r, np.ones(16))
    np.testing.assert_array_equal(relu.v_threshold, np.ones(16))
    np.testing.assert_array_equal(relu.v_reset, np.zeros(16))
    assert relu.metadata["bll_ref_layer"] == "ReLU"
    np.testing.assert_array_equal(g.input_type["input"], [12])
    np.testing.assert_array_equal(g.output_type["output"], [6])
    # the in-memory twin builds the same graph
    g2 = nir.dict2NIRNode(to_nir_dict(blocks, input_shape=(12,)))
    assert [type(n).__name__ for n in g2.nodes.values()] == kinds
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    ref = L.Sequential(*blocks).forward(x, train=False)
    np.testing.assert_allclose(_run_nir(g, x.astype(D)), ref, rtol=1e-5, atol=1e-5)


@needs_nir
def test_nir_cnn_conv_has_batchnorm_folded_in(tmp_path):
    rng = np.random.default_rng(2)
    conv, bn = L.Conv2d(2, 4, 3, padding=1, rng=1), _bn(4, rng, np.float32)
    dense = L.Dense(4 * 4 * 4, 3, rng=3)
    model = L.Sequential(L.Sequential(conv, bn, L.ReLU(), L.AvgPool2d(2)), L.Sequential(L.Flatten(), dense))
    for dtype in (np.float32, np.float64):
        g = nir.read(write_nir(model, tmp_path / "cnn.nir", input_shape=(2, 8, 8), dtype=dtype))
        assert [type(n).__name__ for n in g.nodes.values()] == [
            "Input", "Conv2d", "IF", "AvgPool2d", "Flatten", "Affine", "Output"]
        assert list(g.nodes)[1] == "0.0+0.1"
        W, c = fold_batchnorm(conv.params["W"], conv.params["c"], bn.params["gamma"], bn.params["beta"],
                              bn.buffers["running_mean"], bn.buffers["running_var"], bn.eps)
        cv = g.nodes["0.0+0.1"]
        assert cv.weight.dtype == dtype and cv.weight.shape == (4, 2, 3, 3)
        np.testing.assert_array_equal(cv.weight, W.astype(dtype))
        np.testing.assert_array_equal(cv.bias, c.astype(dtype))
        assert not np.array_equal(W, conv.params["W"])          # the BN did change the weights
        np.testing.assert_array_equal(cv.stride, [1, 1])
        np.testing.assert_array_equal(cv.padding, [1, 1])
        np.testing.assert_array_equal(cv.input_shape, [8, 8])
        np.testing.assert_array_equal(cv.output_type["output"], [4, 8, 8])
        pool = g.nodes["0.3"]
        np.testing.assert_array_equal(pool.kernel_size, [2, 2])
        np.testing.assert_array_equal(pool.output_type["output"], [4, 4, 4])
        np.testing.assert_array_equal(g.nodes["1.0"].output_type["output"], [64])
        np.testing.assert_array_equal(g.nodes["1.1"].weight, dense.params["W"].T.astype(dtype))
        np.testing.assert_array_equal(g.output_type["output"], [3])
    x = rng.normal(size=(4, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_nir(g, x.astype(D)), model.forward(x, train=False), rtol=1e-5, atol=1e-5)


@needs_nir
def test_nir_residual_is_a_junction_with_two_incoming_edges(tmp_path):
    rng = np.random.default_rng(3)
    ident = L.Residual(L.Sequential(L.Conv2d(4, 4, 3, padding=1, rng=2, dtype=D), _bn(4, rng), L.ReLU(),
                                    L.Conv2d(4, 4, 3, padding=1, bias=False, rng=3, dtype=D)))
    proj = L.Residual(L.Sequential(L.Conv2d(4, 6, 3, stride=2, padding=1, rng=4, dtype=D), L.ReLU()),
                      L.Sequential(L.Conv2d(4, 6, 1, stride=2, rng=5, dtype=D), _bn(6, rng)))
    model = L.Sequential(
        L.Sequential(L.Conv2d(2, 4, 3, padding=1, rng=1, dtype=D), _bn(4, rng), L.ReLU(), ident, proj),
        L.Sequential(L.ReLU(), _bn(6, rng), L.AvgPool2d(2), L.Flatten(),
                     L.Dense(6 * 2 * 2, 5, rng=6, dtype=D), L.ReLU(), _bn(5, rng),
                     L.Dense(5, 3, bias=False, rng=7, dtype=D)))
    g = nir.read(write_nir(model, tmp_path / "res.nir", input_shape=(2, 8, 8), dtype=np.float64))
    into = lambda n: sorted(a for a, b in g.edges if b == n)        # noqa: E731
    assert isinstance(g.nodes["0.3"], nir.Scale) and isinstance(g.nodes["0.4"], nir.Scale)
    assert into("0.3") == ["0.2", "0.3.body.3"]                         # identity shortcut
    assert into("0.4") == ["0.4.body.1", "0.4.shortcut.0+0.4.shortcut.1"]  # projection shortcut
    assert into("0.3.body.0+0.3.body.1") == ["0.2"] and into("0.4.body.0") == ["0.3"]
    assert isinstance(g.nodes["1.1"], nir.Conv2d) and g.nodes["1.1"].weight.shape == (6, 6, 1, 1)
    assert isinstance(g.nodes["1.6"], nir.Affine) and g.nodes["1.6"].weight.shape == (5, 5)
    np.testing.assert_array_equal(g.nodes["1.7"].bias, np.zeros(3))
    x = rng.normal(size=(3, 2, 8, 8))
    np.testing.assert_allclose(_run_nir(g, x), model.forward(x, train=False), rtol=1e-10, atol=1e-12)


@needs_nir
@pytest.mark.parametrize("layer, kind", [(L.LeakyReLU(), "LeakyReLU"), (L.Sigmoid(), "Sigmoid"),
                                         (L.Tanh(), "Tanh"), (L.MaxPool2d(2), "MaxPool2d")])
def test_nir_layers_without_a_primitive_raise(tmp_path, layer, kind):
    model = L.Sequential(L.Sequential(L.Conv2d(1, 2, 3, padding=1, rng=0), layer))
    path = tmp_path / "bad.nir"
    with pytest.raises(ValueError, match=rf"NIR has no primitive for {kind} \(layer 0\.1\).*HDF5/C"):
        write_nir(model, path, input_shape=(1, 4, 4))
    assert os.listdir(tmp_path) == []                                   # nothing half-written


@needs_nir
def test_nir_shape_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"Dense 1 expects a vector of 8 features.*add a Flatten"):
        write_nir(L.Sequential(L.Conv2d(1, 2, 1), L.Dense(8, 2)), tmp_path / "a.nir", input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="input_shape"):
        write_nir(L.Sequential(L.Dense(8, 2)), tmp_path / "a.nir", input_shape=())


# ------------------------------------------------------------------------------------------------
# C golden model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cc():
    found = find_c_compiler()
    if found is None:
        pytest.skip("no C compiler ($CC, cc, gcc or clang) on PATH: the C golden-model tests compile "
                    "the generated C; install one (e.g. apt-get install gcc)")
    return found


def _mlp(rng):
    return L.Sequential(
        L.Sequential(L.Dense(10, 12, rng=1, dtype=D), L.ReLU()),
        L.Sequential(L.Dense(12, 9, rng=2, dtype=D), _bn(9, rng), L.LeakyReLU(0.2)),
        L.Sequential(L.Dense(9, 7, rng=3, dtype=D), L.Tanh()),
        L.Sequential(L.Dense(7, 5, rng=4, dtype=D), L.Sigmoid(), L.Dense(5, 3, rng=5, dtype=D)))


def _cnn(rng):
    ident = L.Residual(L.Sequential(L.Conv2d(4, 4, 3, padding=1, rng=2, dtype=D), _bn(4, rng), L.ReLU(),
                                    L.Conv2d(4, 4, 3, padding=1, rng=3, dtype=D), _bn(4, rng)))
    proj = L.Residual(L.Sequential(L.Conv2d(4, 6, 3, stride=2, padding=1, rng=4, dtype=D), _bn(6, rng),
                                   L.ReLU(), L.Conv2d(6, 6, 3, padding=1, rng=5, dtype=D)),
                      L.Sequential(L.Conv2d(4, 6, 1, stride=2, rng=6, dtype=D), _bn(6, rng)))
    return L.Sequential(
        L.Sequential(L.Conv2d(2, 4, 3, padding=1, rng=1, dtype=D), _bn(4, rng), L.ReLU(), L.MaxPool2d(2)),
        L.Sequential(ident, L.ReLU(), L.AvgPool2d(2, stride=1)),                # 2x2 window: exact shift
        L.Sequential(proj, _bn(6, rng), L.LeakyReLU(0.1), L.AvgPool2d(3)),       # 3x3: reciprocal
        L.Sequential(L.Flatten(), L.Dense(6, 3, rng=7, dtype=D)))


_NETS = {"mlp": (_mlp, (10,)), "cnn": (_cnn, (2, 12, 12))}
_CONFIGS = [("mlp", 8, "nearest", "saturate", 100.0), ("mlp", 16, "floor", "saturate", 100.0),
            ("mlp", 8, "nearest_even", "wrap", 70.0), ("cnn", 8, "nearest_even", "saturate", 100.0),
            ("cnn", 16, "nearest", "wrap", 80.0), ("cnn", 12, "floor", "saturate", 100.0)]
# issue 12.2: per-output-channel weight formats and MSE calibration (unsigned formats are in all)
_CONFIGS_PC = [("mlp", 8, "nearest", "saturate", 100.0), ("mlp", 4, "floor", "saturate", 99.0),
               ("cnn", 6, "nearest_even", "saturate", 100.0), ("cnn", 8, "nearest", "wrap", 90.0)]


def _parse_traces(stdout, n_samples, n_records):
    got = {}
    for line in stdout.splitlines():
        t = line.split()
        assert t[0] == "T", line
        got[int(t[1]), int(t[2])] = np.array(t[3:], dtype=np.int64)
    assert len(got) == n_samples * n_records
    return got


def _compiled(tmp_path, net, width, rounding, ovf, pct, rng, **kw):
    build, shape = _NETS[net]
    model = build(rng)
    x = 1.5 * rng.normal(size=(24,) + shape)
    im = compile_integer(model, x, width=width, rounding=rounding, overflow=ovf, percentile=pct, **kw)
    paths = write_c(im, tmp_path, name="bll_model", test_inputs=im.quantize_input(x[:3]))
    return im, x, paths, compile_c(tmp_path, name="bll_model")      # -std=c99 -Wall -Wextra -Werror -O2


@pytest.mark.parametrize("net, width, rounding, ovf, pct, kw", [c + ({},) for c in _CONFIGS] + [
    c + ({"per_channel": True, "calibration": "mse" if i % 2 else "percentile"},) for i, c in enumerate(_CONFIGS_PC)])
def test_c_golden_model_equals_python_integer_traces(tmp_path, cc, net, width, rounding, ovf, pct, kw):
    rng = np.random.default_rng(width + len(rounding))
    im, x, paths, exe = _compiled(tmp_path, net, width, rounding, ovf, pct, rng, **kw)
    if kw.get("per_channel"):      # the channels' fracs differ somewhere, so the per-channel C path runs
        assert any(r.w_frac is not None and len(set(r.w_frac.tolist())) > 1 for r in im.records
                   if hasattr(r, "w_frac"))
    if ovf == "saturate":          # unsigned formats after ReLUs
        assert any(not f.signed for f in im.formats[1:])
    assert set(paths) == {"header", "source", "test"}
    # 1. the test program checks the embedded vectors itself, record by record
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    counts = re.findall(r"^record (\d+) .* mismatches (\d+) of (\d+)$", res.stdout, re.M)
    assert len(counts) == len(im.records) and all(m == "0" for _, m, _ in counts)
    assert "OK: all" in res.stdout
    # 2. Python compares the dumped codes, on real inputs and on random codes over the full range
    f0 = im.input_fmt
    codes = rng.integers(f0.min_code, f0.max_code + 1, size=(30,) + x.shape[1:])
    codes[0], codes[1], codes[2] = f0.min_code, f0.max_code, 0
    codes[3:13] = im.quantize_input(x[3:13])
    inp = tmp_path / "codes.txt"
    inp.write_text(f"{len(codes)}\n" + "\n".join(" ".join(map(str, s.ravel())) for s in codes) + "\n")
    res = subprocess.run([str(exe), "--run", str(inp)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = _parse_traces(res.stdout, len(codes), len(im.records))
    for r, t in enumerate(im.run(codes)):
        for s in range(len(codes)):
            np.testing.assert_array_equal(got[s, r], t[s].ravel().astype(np.int64),
                                          err_msg=f"record {r} {im.records[r].kind} sample {s}")
    if ovf == "wrap":   # the inputs do overflow somewhere: the same records saturating differ
        recs = copy.deepcopy([{"attrs": r.attrs, "arrays": r.arrays} for r in im.records])   # plain data
        for r in recs:
            r["attrs"]["out_fmt"]["overflow"] = "saturate"
        sat = IntegerModel(recs).run(codes)
        assert any(not np.array_equal(a, b) for a, b in zip(sat, im.run(codes)))


def test_c_configs_cover_every_record_kind():
    rng = np.random.default_rng(0)
    kinds = set()
    for net, (build, shape) in _NETS.items():
        im = compile_integer(build(rng), rng.normal(size=(8,) + shape), width=8)
        kinds |= {r.kind for r in im.records}
    assert kinds == set(RECORD_KINDS)


def test_c_test_program_reports_a_corrupted_expectation(tmp_path, cc):
    rng = np.random.default_rng(5)
    im, x, paths, _ = _compiled(tmp_path, "mlp", 8, "nearest", "saturate", 100.0, rng)
    text = paths["header"].read_text()
    # bump the expected first code of record 1 for test sample 0
    off = int(re.search(r"#define BLL_MODEL_R1_OFFSET (\d+)", text).group(1))
    row = re.search(r"bll_model_test_trace\[.*?\] = \{\n    \{\n(.*?)\n    \}", text, re.S)
    vals = [v.strip() for v in row.group(1).split(",")]
    vals[off] = str(int(vals[off]) + 1)
    paths["header"].write_text(text[:row.start(1)] + ", ".join(vals) + text[row.end(1):])
    exe = compile_c(tmp_path, name="bll_model")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert re.search(r"^record 1 +dense .* mismatches 1 of", res.stdout, re.M)
    assert re.search(r"^record 2 +relu .* mismatches 0 of", res.stdout, re.M)
    assert "FAIL" in res.stdout


def test_c_integer_helpers_match_fixedpoint_on_edge_values(tmp_path, cc):
    """round_shift / overflow / requantize / div_round in C against the Python reference, at int64
    extremes, exact halves, shifts of 0, 1, 62, 63, 64, 70, negative (left) shifts, and divisors
    1 .. 2**20 (average pooling's window sizes and beyond)."""
    big = [0, 1, -1, 2, -2, 3, -3, 5, -5, 6, -6, 7, -7, 8, -8, 1023, -1024, (1 << 40) + (1 << 39),
           -(1 << 40) - (1 << 39), (1 << 62) - 1, -(1 << 62), (1 << 63) - 1, -(1 << 63)]
    rs_cases = [(a, s, r) for a in big for s in (0, 1, 2, 3, 30, 62, 63, 64, 70) for r in range(3)]
    rs_cases += [(a, s, r) for a in big if abs(a) < (1 << 20) for s in (-1, -5, -30) for r in range(3)]
    fmts = [QFormat(w, 0, sg, "floor", o) for w in (2, 8, 16, 32) for sg in (True, False)
            for o in ("saturate", "wrap") if not (w == 32 and not sg)]
    ov_cases = [(a, f) for a in big for f in fmts]
    rq_cases = [(a, sh, QFormat(w, 3, True, rn, o)) for a in big + [(1 << 61), -(1 << 61)]
                for sh in (-45, -20, -3, -1, 0, 1, 4, 63, 65) for w in (4, 16)
                for rn in ("floor", "nearest", "nearest_even") for o in ("saturate", "wrap")]
    dv_cases = [(a, k, r) for a in big + [9 * 9677, -9 * 9677, 4, -4, 2, -2] for k in (1, 2, 3, 4, 6, 9, 16, 49, 1 << 20)
                for r in range(3)]
    rounding = ("floor", "nearest", "nearest_even")
    src = ("#include <stdint.h>\n#include <stdio.h>\n#include <stdlib.h>\n"
           "#define BLL_FLOOR 0\n#define BLL_NEAREST 1\n#define BLL_NEAREST_EVEN 2\n"
           "#define BLL_SATURATE 0\n#define BLL_WRAP 1\n"
           + c_golden._C_FROM_U64 + c_golden._C_ROUND_SHIFT + c_golden._C_OVERFLOW + c_golden._C_DIV_ROUND
           + c_golden._C_REQUANTIZE + """
int main(void)
{
    char op[4];
    long long a;
    int s, r, w, sg, m;
    while (scanf("%3s %lld %d %d %d %d %d", op, &a, &s, &r, &w, &sg, &m) == 7) {
        if (op[0] == 'R')
            printf("%lld\\n", (long long)bll_round_shift((int64_t)a, s, r));
        else if (op[0] == 'D')
            printf("%lld\\n", (long long)bll_div_round((int64_t)a, s, r));
        else if (op[0] == 'O')
            printf("%lld\\n", (long long)bll_overflow((int64_t)a, w, sg, m));
        else
            printf("%lld\\n", (long long)bll_requantize((int64_t)a, s, w, sg, r, m));
    }
    return 0;
}
""")
    (tmp_path / "h.c").write_text(src)
    exe = tmp_path / "h"
    subprocess.run([*cc.split(), *c_header.CFLAGS, "-o", str(exe), str(tmp_path / "h.c")], check=True, timeout=120)
    lines, want = [], []
    for a, s, r in rs_cases:
        lines.append(f"R {a} {s} {r} 0 0 0")
        want.append(int(round_shift(np.array([a], np.int64), s, rounding[r])[0]))
    for a, k, r in dv_cases:
        lines.append(f"D {a} {k} {r} 0 0 0")
        want.append(int(div_round(np.array([a], np.int64), k, rounding[r])[0]))
    for a, f in ov_cases:
        lines.append(f"O {a} 0 0 {f.width} {int(f.signed)} {int(f.overflow == 'wrap')}")
        want.append(int(overflow(np.array([a], np.int64), f)[0]))
    for a, sh, f in rq_cases:
        lines.append(f"Q {a} {sh} {rounding.index(f.rounding)} {f.width} 1 {int(f.overflow == 'wrap')}")
        want.append(int(requantize(np.array([a], np.int64), f.frac + sh, f)[0]))
    res = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True, timeout=120)
    got = [int(v) for v in res.stdout.split()]
    bad = [(ln, g, w) for ln, g, w in zip(lines, got, want) if g != w]
    assert len(got) == len(want) and not bad, bad[:10]


def test_write_c_rejects_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    im = compile_integer(_mlp(rng), rng.normal(size=(8, 10)), width=8)
    codes = im.quantize_input(rng.normal(size=(2, 10)))
    with pytest.raises(ValueError, match="C identifier"):
        write_c(im, tmp_path, name="bll-model", test_inputs=codes)
    with pytest.raises(ValueError, match="integer codes"):
        write_c(im, tmp_path, test_inputs=codes.astype(np.float64))
    with pytest.raises(ValueError, match="needs test_inputs"):
        write_c(im, tmp_path, test_inputs=None)
    traces = im.run(codes)
    traces[3] = traces[3] + 1
    with pytest.raises(ValueError, match=r"traces\[3\].*differs"):
        write_c(im, tmp_path, test_inputs=codes, traces=traces)
    assert os.listdir(tmp_path) == []
    paths = write_c(im.records, tmp_path, name="m2", test_inputs=codes, traces=im.run(codes))
    assert paths["header"].name == "m2.h" and "#define M2_N_TEST 2" in paths["header"].read_text()
