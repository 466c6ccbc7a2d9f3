"""HDF5 export: bit-exact traces, an independent reader written from docs/hdf5-format.md alone,
round trip, NIR compatibility, atomic writes, the documented errors, and the CLI end to end."""
import json
import os

import h5py
import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref import models
from bll_ref.cli import main
from bll_ref.fixedpoint import IntegerModel
from bll_ref.fixedpoint import records as R
from exporters import hdf5, hdf5_read
from exporters.hdf5 import ExportFormatError


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def _randomise_bn(model, rng):
    """Non-trivial eval statistics so BN folding and the scale record are exercised."""
    def walk(layer):
        if isinstance(layer, L.BatchNorm):
            n = layer.buffers["running_mean"].shape[0]
            layer.buffers["running_mean"][:] = rng.normal(0, 0.3, n)
            layer.buffers["running_var"][:] = rng.uniform(0.5, 2.0, n)
            layer.params["gamma"][:] = rng.uniform(0.5, 1.5, n)
            layer.params["beta"][:] = rng.normal(0, 0.2, n)
        for child in getattr(layer, "layers", []):
            walk(child)
        if isinstance(layer, L.Residual):
            walk(layer.body)
            if layer.shortcut is not None:
                walk(layer.shortcut)
    walk(model)
    return model


def small_cnn(rng=0):
    """Conv+BN+ReLU; a residual block (stride-2 body, 1x1 projection shortcut) + ReLU + MaxPool;
    a lone BN (scale record), Tanh (lookup table), AvgPool, Flatten, Dense.  Input (N, 2, 8, 8)."""
    g = np.random.default_rng(rng)
    body = L.Sequential(L.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, rng=g), L.BatchNorm(6), L.ReLU(),
                        L.Conv2d(6, 6, 3, padding=1, rng=g), L.BatchNorm(6))
    shortcut = L.Sequential(L.Conv2d(4, 6, 1, stride=2, bias=False, rng=g), L.BatchNorm(6))
    model = L.Sequential(
        L.Sequential(L.Conv2d(2, 4, 3, padding=1, rng=g), L.BatchNorm(4), L.ReLU()),
        L.Sequential(L.Residual(body, shortcut), L.ReLU(), L.MaxPool2d(2)),
        L.Sequential(L.BatchNorm(6), L.Tanh(), L.AvgPool2d(2), L.Flatten(), L.Dense(6, 3, rng=g)))
    return _randomise_bn(model, g)


MODELS = {
    "mlp": (lambda: L.Sequential(*models.mlp((20, 16, 8, 4), rng=0)), (20,)),
    "cnn": (small_cnn, (2, 8, 8)),
}


def _export(tmp_path, which="mlp", name="m.h5", **kw):
    build, shape = MODELS[which]
    model = build()
    x = np.random.default_rng(1).normal(size=(48,) + shape).astype(np.float32)
    y = np.arange(48) % 4
    aux = {"feedback0/W": np.random.default_rng(2).normal(size=(4, 16)), "head0/0.W": np.ones((16, 4), np.float32),
           "step": np.int64(7), "empty": np.zeros((0, 3))}
    path = tmp_path / name
    e = hdf5.export(model, path, x, n_traces=12, aux=aux, meta={"method": "bll", "model": which}, labels=y, **kw)
    return path, e, model, x


@pytest.fixture(params=["mlp", "cnn"])
def exported(request, tmp_path):
    return _export(tmp_path, request.param)


# ------------------------------------------------------------------------------------------------
# traces
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,width,rounding,overflow", [
    ("mlp", 8, "nearest", "saturate"), ("mlp", 16, "nearest_even", "wrap"),
    ("cnn", 8, "nearest", "saturate"), ("cnn", 12, "floor", "saturate")])
def test_integer_inference_from_file_equals_stored_traces_exactly(tmp_path, which, width, rounding, overflow):
    path, e, _, _ = _export(tmp_path, which, width=width, rounding=rounding, overflow=overflow)
    r = hdf5.read(path)
    got = r.integer_model().run(r.calibration_codes)
    assert len(got) == len(r.traces) == len(r.records)
    for g, t in zip(got, r.traces):
        assert g.dtype == t.dtype and np.array_equal(g, t)
    rep = hdf5.verify(path)
    assert rep["ok"] and rep["n_mismatched"] == 0 and rep["n_samples"] == 12
    assert [row["max_abs_diff"] for row in rep["records"]] == [0] * len(r.records)
    if which == "cnn":
        kinds = {rec.kind for rec in r.records}
        assert {"conv2d", "add", "relu", "maxpool2d", "scale", "lut", "avgpool2d", "flatten", "dense"} <= kinds


def test_verify_reports_per_record_differences(tmp_path):
    path, e, _, _ = _export(tmp_path, "mlp")
    e.traces[3] = e.traces[3].copy()
    e.traces[3][0, :2] += 3                      # a wrong trace, written with valid checksums
    hdf5.write(e, path)
    rep = hdf5.verify(path)
    assert not rep["ok"] and rep["n_mismatched"] == 1
    row = rep["records"][3]
    assert (row["max_abs_diff"], row["n_diff"]) == (3, 2)
    assert main(["verify", str(path), "--no-accuracy"]) == 1


# ------------------------------------------------------------------------------------------------
# an independent implementation written from docs/hdf5-format.md (h5py + numpy, no bll_ref)
# ------------------------------------------------------------------------------------------------
def _doc_round(acc, s, mode):
    """round(acc / 2**s), exact, by floor division (not the bit tricks of bll_ref.fixedpoint)."""
    acc = np.asarray(acc, dtype=np.int64)
    if s <= 0:
        return acc * (1 << -s)
    q, r = np.divmod(acc, np.int64(1) << s)
    half = np.int64(1) << (s - 1)
    if mode == "floor":
        return q
    if mode == "nearest":
        return q + (r >= half)
    return q + ((r > half) | ((r == half) & (q % 2 == 1)))


def _doc_overflow(v, q):
    lo, hi = (-(1 << (q["width"] - 1)), (1 << (q["width"] - 1)) - 1) if q["signed"] else (0, (1 << q["width"]) - 1)
    if q["overflow"] == "saturate":
        return np.clip(v, lo, hi)
    return (v - lo) % (1 << q["width"]) + lo


def _doc_requantize(acc, acc_frac, q):
    return _doc_overflow(_doc_round(acc, acc_frac - q["frac"], q["rounding"]), q)


def _doc_windows(x, k, s):
    (kh, kw), (sh, sw) = k, s
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return [x[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] for u in range(kh) for v in range(kw)]


def doc_reference_traces(path):
    """Integer inference following docs/hdf5-format.md "Integer inference" step by step."""
    f = h5py.File(path, "r")
    n = int(f["integer"].attrs["n_records"])
    groups = sorted(f["integer/records"])
    recs = [json.loads(f["integer/records"][g].attrs["record"]) for g in groups]
    arr = [{k: f["integer/records"][g][k][()] for k in f["integer/records"][g]} for g in groups]
    outs = [f["calibration/x_codes"][()].astype(np.int64)]
    assert len(recs) == n
    for i in range(1, n):
        a, A, q = recs[i], arr[i], recs[i]["out_fmt"]
        xs = [outs[j] for j in a["inputs"]]
        in_q = [recs[j]["out_fmt"] for j in a["inputs"]]
        x, kind = xs[0], a["kind"]
        if kind == "dense":
            y = _doc_requantize(x @ A["W"].astype(np.int64) + A["c"], a["acc_frac"], q)
        elif kind == "conv2d":
            W = A["W"].astype(np.int64)
            (ph, pw), s = a["padding"], a["stride"]
            xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
            acc = sum(np.einsum("nchw,oc->nohw", p, W[:, :, t // W.shape[3], t % W.shape[3]])
                      for t, p in enumerate(_doc_windows(xp, W.shape[2:], s)))
            y = _doc_requantize(acc + A["c"][None, :, None, None], a["acc_frac"], q)
        elif kind == "scale":
            shp = (1, -1) + (1,) * (x.ndim - 2)
            y = _doc_requantize(x * A["W"].astype(np.int64).reshape(shp) + A["c"].reshape(shp), a["acc_frac"], q)
        elif kind == "relu":
            y = np.maximum(x, 0)
        elif kind == "leaky_relu":
            y = _doc_overflow(np.where(x > 0, x, _doc_round(x * a["slope_code"], a["slope_frac"], q["rounding"])), q)
        elif kind == "maxpool2d":
            y = np.max(_doc_windows(x, a["kernel_size"], a["stride"]), axis=0)
        elif kind == "avgpool2d":
            ssum = np.sum(_doc_windows(x, a["kernel_size"], a["stride"]), axis=0)
            k = a["kernel_size"][0] * a["kernel_size"][1]
            d, r = np.divmod(ssum, np.int64(k))            # div_round: the exact mean, rounded
            up = {"floor": 0 * r, "nearest": 2 * r >= k, "nearest_even": (2 * r > k) | ((2 * r == k) & (d % 2 == 1))}
            y = _doc_overflow(d + up[q["rounding"]], q)
        elif kind == "flatten":
            y = x.reshape(len(x), -1)
        elif kind == "add":
            fa = max(in_q[0]["frac"], in_q[1]["frac"])
            acc = xs[0] * (1 << (fa - in_q[0]["frac"])) + xs[1] * (1 << (fa - in_q[1]["frac"]))
            y = _doc_requantize(acc, fa, q)
        elif kind == "lut":
            y = A["table"].astype(np.int64)[x - a["index_offset"]]
        else:
            raise AssertionError(kind)
        outs.append(y)
    stored = []
    for a in recs:
        d = f["nodes"][a["name"]]["observables/codes/data"]
        stored.append(d[()].reshape((d.shape[0],) + tuple(d.attrs["shape"])))
    f.close()
    return outs, stored


def test_reimplementation_from_the_format_doc_reproduces_the_traces(exported):
    path, _, _, _ = exported
    outs, stored = doc_reference_traces(path)
    assert len(outs) == len(stored)
    for i, (o, s) in enumerate(zip(outs, stored)):
        assert o.shape == s.shape and np.array_equal(o, s.astype(np.int64)), f"record {i}"


# ------------------------------------------------------------------------------------------------
# round trip and compatibility
# ------------------------------------------------------------------------------------------------
def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_export_read_round_trip_gives_identical_arrays(exported):
    path, e, model, x = exported
    r = hdf5.read(path)
    assert r.model_config == e.model_config and r.meta == e.meta and r.options == e.options
    assert r.format_version == hdf5.FORMAT_VERSION and r.created_by == e.created_by
    assert set(r.float_state) == set(e.float_state)
    assert all(_same(r.float_state[k], e.float_state[k]) for k in e.float_state)
    assert set(r.aux) == set(e.aux) and all(_same(r.aux[k], e.aux[k]) for k in e.aux)
    assert len(r.records) == len(e.records)
    for a, b in zip(r.records, e.records):
        assert type(a) is type(b) and a.attrs == b.attrs and set(a.arrays) == set(b.arrays)
        assert all(_same(a.arrays[k], b.arrays[k]) for k in b.arrays)
    assert all(_same(a, b) for a, b in zip(r.traces, e.traces))
    assert _same(r.calibration_x, e.calibration_x) and _same(r.labels, e.labels)
    # the float model rebuilt from the file computes exactly what the exported one did
    assert np.array_equal(r.float_model().forward(x, train=False), model.forward(x, train=False))
    assert hdf5.validate(path).records[0].attrs == e.records[0].attrs
    assert r.records[0]["attrs"]["shape"] == list(x.shape[1:])     # the plain-data view of old


def test_traces_read_as_nir_time_gridded_data(exported):
    nir = pytest.importorskip("nir")
    path, e, _, _ = exported
    data = nir.read_data(str(path))
    assert set(data.nodes) == {rec.name for rec in e.records}
    for rec, t in zip(e.records, e.traces):
        obs = data.nodes[rec.name].observables["codes"]
        assert isinstance(obs, nir.TimeGriddedData) and obs.dt == 1.0
        assert obs.data.shape == (t.shape[0], 1, int(np.prod(t.shape[1:])))
        assert np.array_equal(obs.data.reshape(t.shape), t)


def test_trace_nodes_are_named_like_the_nodes_of_the_nir_graph(tmp_path):
    nir = pytest.importorskip("nir")
    from exporters.nir import write_nir
    model = L.Sequential(*models.mlp((20, 16, 8, 4), activation_name="relu", rng=0))
    x = np.random.default_rng(0).normal(size=(8, 20)).astype(np.float32)
    hdf5.export(model, tmp_path / "m.h5", x)
    graph = nir.read(write_nir(model, tmp_path / "m.nir", input_shape=(20,)))
    data = nir.read_data(str(tmp_path / "m.h5"))
    data.check_nodes(graph)                      # raises KeyError for a node the graph lacks
    assert set(data.nodes) == set(graph.nodes) - {"output"}


def test_code_datasets_carry_their_q_format(tmp_path):
    path, e, _, _ = _export(tmp_path, "mlp", width=16, rounding="floor")
    x = np.zeros((4, 20), np.float32)
    assert hdf5.export(models.mlp((20, 3), rng=0), tmp_path / "list.h5", x).model_config["type"] == "Sequential"
    with h5py.File(path, "r") as f:
        W = f["integer/records/001_dense/W"]
        w_fmt = e.records[1].attrs["w_fmt"]
        assert W.dtype == np.int16
        assert {k: W.attrs[k] for k in ("width", "frac", "signed", "rounding", "overflow")} == \
            {**w_fmt, "signed": 1}
        c = f["integer/records/001_dense/c"]
        assert c.dtype == np.int64 and c.attrs["frac"] == e.records[1].acc_frac
        assert f.attrs["format"] == "bll_ref-fixedpoint" and f.attrs["format_version"] == hdf5.FORMAT_VERSION
        assert json.loads(f.attrs["model_config"]) == e.model_config
        assert f["model/0/0/W"].attrs["role"] == "param"


def _count_calls(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, counted)
    return calls


def test_export_checks_each_record_once(tmp_path, monkeypatch):
    made = _count_calls(monkeypatch, R.Record, "__post_init__")
    path, e, _, _ = _export(tmp_path, "cnn")
    assert len(made) == len(e.records)           # made (and checked) by the compiler, never again
    made.clear()
    hdf5.read(path)
    assert len(made) == len(e.records)           # a reader builds them once from the file


def test_verify_reads_the_file_once_and_builds_one_integer_model(tmp_path, monkeypatch):
    path, e, _, _ = _export(tmp_path, "cnn")
    reads = _count_calls(monkeypatch, hdf5_read, "_read_tree")
    hashed = _count_calls(monkeypatch, hdf5_read, "_checked_data")
    models_built = _count_calls(monkeypatch, IntegerModel, "__init__")
    made = _count_calls(monkeypatch, R.Record, "__post_init__")
    assert hdf5.verify(path)["ok"]
    with h5py.File(path, "r") as f:
        n_datasets = len(json.loads(f.attrs["datasets"]))
    assert (len(reads), len(hashed), len(models_built), len(made)) == (1, n_datasets, 1, len(e.records))


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def test_interrupted_export_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path, e, model, x = _export(tmp_path, "mlp")
    before = path.read_bytes()
    calls = []
    real = hdf5._write_object

    def dying(*a):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt("simulated crash")
        return real(*a)

    monkeypatch.setattr(hdf5, "_write_object", dying)
    with pytest.raises(KeyboardInterrupt):
        hdf5.export(model, path, x, width=16)
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        hdf5.export(model, tmp_path / "new.h5", x)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.h5"]


def test_write_refuses_inconsistent_data_and_writes_nothing(tmp_path):
    path, e, _, _ = _export(tmp_path, "mlp")
    e.traces[2] = e.traces[2].astype(np.int32)
    with pytest.raises(ExportFormatError, match=r"/nodes/0.1/observables/codes/data has dtype int32"):
        hdf5.write(e, tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


# ------------------------------------------------------------------------------------------------
# the documented errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused_with_its_name(tmp_path, keep):
    path, _, _, _ = _export(tmp_path, "mlp")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ExportFormatError, match=r"m\.h5: cannot be opened as HDF5 .*truncated"):
        hdf5.read(path)


def _flip(path, dataset, index=0):
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(off + index)
        b = fh.read(1)
        fh.seek(off + index)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("dataset", ["/integer/records/001_dense/W", "/model/1/0/W",
                                     "/nodes/1.0/observables/codes/data", "/aux/feedback0/W"])
def test_flipped_byte_in_a_dataset_is_named(tmp_path, dataset):
    path, _, _, _ = _export(tmp_path, "mlp")
    _flip(path, dataset, index=5)
    with pytest.raises(ExportFormatError, match=rf"dataset {dataset} fails its SHA-256 checksum"):
        hdf5.read(path)
    assert main(["verify", str(path)]) == 2


@pytest.mark.parametrize("obj,attr", [("/integer/records/001_dense/W", "frac"), ("/", "model_config"),
                                      ("/nodes/0.1/observables/codes/data", "shape"),
                                      ("/integer/records/003_dense", "record"), ("/model/0/0/c", "sha256")])
def test_missing_attribute_is_named(tmp_path, obj, attr):
    path, _, _, _ = _export(tmp_path, "mlp")
    with h5py.File(path, "r+") as f:
        del f[obj].attrs[attr]
    kind = "group" if obj == "/" or obj.endswith("_dense") else "dataset"
    with pytest.raises(ExportFormatError, match=rf"{kind} {obj} has no attribute '{attr}'"):
        hdf5.read(path)


def test_tampered_q_format_attribute_is_named(tmp_path):
    path, _, _, _ = _export(tmp_path, "cnn")
    with h5py.File(path, "r+") as f:
        f["integer/records/001_conv2d/W"].attrs["frac"] += 1
    with pytest.raises(ExportFormatError, match=r"dataset /integer/records/001_conv2d/W attribute 'frac' is"):
        hdf5.read(path)


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    path, _, _, _ = _export(tmp_path, "mlp")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 4
        del f["integer"]                         # a newer layout: must be refused before parsing it
    with pytest.raises(ExportFormatError, match=r"format version 4 is newer than supported 3; upgrade bll_ref"):
        hdf5.read(path)


def test_foreign_and_missing_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(ExportFormatError, match="junk.h5: cannot be opened as HDF5"):
        hdf5.read(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ExportFormatError, match="not a bll_ref fixed-point export"):
        hdf5.read(other)
    with pytest.raises(FileNotFoundError, match="absent.h5: no such file"):
        hdf5.read(tmp_path / "absent.h5")


@pytest.mark.parametrize("dataset", ["/model/1/0.body.1/running_var", "/calibration/labels",
                                     "/integer/records/005_conv2d/W_float", "/aux/step"])
def test_missing_dataset_is_named_even_when_optional(tmp_path, dataset):
    path, _, _, _ = _export(tmp_path, "cnn")
    with h5py.File(path, "r+") as f:
        del f[dataset]
    with pytest.raises(ExportFormatError, match=rf"missing dataset {dataset} \(listed in the root attribute 'datasets'\)"):
        hdf5.read(path)


def test_added_or_replaced_dataset_is_named(tmp_path):
    path, _, _, _ = _export(tmp_path, "mlp")
    with h5py.File(path, "r+") as f:
        d = f.create_dataset("aux/extra", data=np.zeros(2))
        d.attrs["sha256"] = hdf5._sha256(np.zeros(2))
    with pytest.raises(ExportFormatError, match=r"dataset /aux/extra is not listed in the root attribute 'datasets'"):
        hdf5.read(path)
    _, e, _, _ = _export(tmp_path, "mlp", name="n.h5")
    with h5py.File(tmp_path / "n.h5", "r+") as f:   # same checksum, other shape
        W = f["integer/records/001_dense/W"][()].reshape(-1)
        sha = f["integer/records/001_dense/W"].attrs["sha256"]
        del f["integer/records/001_dense/W"]
        f["integer/records/001_dense/W"] = W
        f["integer/records/001_dense/W"].attrs["sha256"] = sha
    with pytest.raises(ExportFormatError, match=r"dataset /integer/records/001_dense/W is int8 \[320\], but"):
        hdf5.read(tmp_path / "n.h5")


# ------------------------------------------------------------------------------------------------
# CLI end to end
# ------------------------------------------------------------------------------------------------
def test_cli_train_export_verify(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--data", "synthetic", "--sizes", "784,16,10", "--epochs", "1",
                 "--limit-train", "200", "--limit-test", "50", "--out", run]) == 0
    out = str(tmp_path / "model.h5")
    assert main(["export", os.path.join(run, "checkpoint.npz"), "--out", out, "--width", "16",
                 "--calibration", "64", "--traces", "8"]) == 0
    capsys.readouterr()
    assert main(["verify", out]) == 0
    text = capsys.readouterr().out
    assert "max |diff|" in text and "leaky_relu" in text and "KiB" in text
    assert "accuracy on 50 test examples: float" in text
    assert "OK: integer inference from the file reproduces all 4 stored traces" in text
    r = hdf5.read(out)
    assert r.options["width"] == 16 and r.options["n_calibration"] == 64 and r.traces[0].shape == (8, 784)
    assert r.meta["data"] == "synthetic" and "feedback0/W" in r.aux
    with open(out, "r+b") as fh:                 # truncated: exit 2 with the error on stderr
        fh.truncate(os.path.getsize(out) // 2)
    assert main(["verify", out]) == 2
    assert "cannot be opened as HDF5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# issue 12: the spec is the whole truth
# ------------------------------------------------------------------------------------------------
def _put(path, name, data):
    """Replace (or add) dataset ``name`` with ``data``, fixing its checksum and the manifest, as a
    careful tamperer would: only the consistency checks can catch it."""
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs) if name in f else {}
        if name in f:
            del f[name]
        d = f.create_dataset(name, data=data)
        for k, v in attrs.items():
            d.attrs[k] = v
        d.attrs["sha256"] = hdf5._sha256(np.asarray(data))
        manifest = json.loads(f.attrs["datasets"])
        manifest["/" + name.lstrip("/")] = [np.asarray(data).dtype.name, list(np.shape(data))]
        f.attrs["datasets"] = json.dumps(manifest, sort_keys=True)


def test_verify_checks_x_codes_against_the_quantised_x(tmp_path):
    path, e, _, _ = _export(tmp_path, "mlp")
    x = e.calibration_x.copy()
    x[0, 0] += 0.75                               # another input, its checksum and manifest fixed
    _put(path, "calibration/x", x)
    with pytest.raises(ExportFormatError, match=r"/calibration/x_codes differs from the quantised /calibration/x"):
        hdf5.verify(path)
    assert main(["verify", str(path), "--no-accuracy"]) == 2


def test_extra_dataset_in_a_record_group_is_refused_like_an_extra_node(tmp_path):
    path, _, _, _ = _export(tmp_path, "mlp")
    _put(path, "integer/records/001_dense/notes", np.zeros(3))
    with pytest.raises(ExportFormatError, match=r"dataset /integer/records/001_dense/notes is not a dataset of a 'dense'"):
        hdf5.read(path)
    path, _, _, _ = _export(tmp_path, "mlp", name="n.h5")
    with h5py.File(path, "r+") as f:
        f.create_group("nodes/stray")
    with pytest.raises(ExportFormatError, match=r"/nodes holds groups that match no record: \['stray'\]"):
        hdf5.read(path)


@pytest.mark.parametrize("field,value", [("c", (1 << 62) - 100), ("slope_code", 1 << 56)])
def test_intermediates_that_could_leave_int64_are_refused(tmp_path, field, value):
    model = L.Sequential(L.Sequential(L.Dense(20, 16, rng=0), L.LeakyReLU(0.1)), L.Sequential(L.Dense(16, 4, rng=1)))
    x = np.random.default_rng(1).normal(size=(8, 20)).astype(np.float32)
    e = hdf5.export(model, tmp_path / "m.h5", x)
    rec = e.records[1] if field == "c" else e.records[2]
    if field == "c":
        rec.c = rec.c.copy()
        rec.c[0] = value
    else:
        rec.slope_code = value
    with pytest.raises(ExportFormatError, match=r"could reach \d+ >= 2\^62"):
        hdf5.write(e, tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


def test_export_from_other_directories_is_byte_identical_and_leaks_no_path(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--sizes", "784,16,10", "--epochs", "1", "--limit-train", "200",
                 "--limit-test", "50", "--out", str(run)]) == 0
    outs = []
    for d in ("a/deep/dir", "b"):
        where = tmp_path / d
        where.mkdir(parents=True)
        (where / "checkpoint.npz").write_bytes((run / "checkpoint.npz").read_bytes())
        outs.append(where / "model.h5")
        assert main(["export", str(where / "checkpoint.npz"), "--out", str(outs[-1]), "--calibration", "32",
                     "--traces", "4"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with h5py.File(outs[0], "r") as f:
        meta = f.attrs["meta"]
    assert str(tmp_path) not in meta and json.loads(meta)["checkpoint"] == "checkpoint.npz"
    assert json.loads(meta)["options"]["out"] == "run"
