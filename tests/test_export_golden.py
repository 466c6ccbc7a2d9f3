"""Exports pinned byte for byte: sha256 of HDF5 files, NIR files, C golden models and verify reports
of small deterministic models, stored in tests/golden/export_hashes.json.

The hashes were made with the exporters as they were before the fixed-point refactor (issue 13),
so this test proves the refactor kept the file format and the integer arithmetic unchanged.
HDF5 bytes also depend on the HDF5 library: the file hashes are compared only under the HDF5
version that made them (the C text and the verify reports always).  Regenerate (only when a
format change is intended) with ``python tests/test_export_golden.py --update``.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile

import h5py
import numpy as np
import pytest

from bll_ref import layers as L
from bll_ref import models

import test_export_hdf5 as hdf5_tests  # noqa: E402  (tests/ is on sys.path: conftest.py)

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "export_hashes.json"
# (width, rounding, overflow, percentile) of each HDF5 export
CONFIGS = [(8, "nearest", "saturate", 100.0), (16, "nearest_even", "wrap", 99.0), (8, "floor", "saturate", 99.9)]


def _randomise_bn(layer, rng):
    """Non-trivial eval statistics so BN folding and the scale record change the numbers."""
    return hdf5_tests._randomise_bn(layer, rng)


def _mlp():
    return L.Sequential(*models.mlp((20, 16, 12, 4), activation_name="relu", rng=0))


def _mlp_lut():
    """LeakyReLU, Tanh, Sigmoid and a folded Dense + BatchNorm (no NIR mapping)."""
    g = np.random.default_rng(3)
    bn = _randomise_bn(L.BatchNorm(12), g)
    return L.Sequential(L.Sequential(L.Dense(20, 16, rng=g), L.LeakyReLU(0.1)),
                        L.Sequential(L.Dense(16, 12, rng=g), bn, L.Tanh()),
                        L.Sequential(L.Dense(12, 6, rng=g), L.Sigmoid(), L.Dense(6, 4, rng=g)))


def _cnn():
    """models.cnn: Conv + BatchNorm + MaxPool + ReLU blocks (MaxPool: no NIR mapping)."""
    return _randomise_bn(L.Sequential(*models.cnn(in_channels=2, image_size=8, channels=(4, 6),
                                                  n_classes=3, rng=1)), np.random.default_rng(4))


def _cnn_avg():
    """Conv + BN + ReLU + AvgPool, a residual with a projection shortcut, a lone BN (scale)."""
    g = np.random.default_rng(5)
    body = L.Sequential(L.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, rng=g), L.BatchNorm(6), L.ReLU(),
                        L.Conv2d(6, 6, 3, padding=1, rng=g))
    shortcut = L.Sequential(L.Conv2d(4, 6, 1, stride=2, rng=g), L.BatchNorm(6))
    model = L.Sequential(L.Sequential(L.Conv2d(2, 4, 3, padding=1, rng=g), L.BatchNorm(4), L.ReLU(), L.AvgPool2d(2)),
                         L.Sequential(L.Residual(body, shortcut), L.ReLU(), L.BatchNorm(6)),
                         L.Sequential(L.AvgPool2d(3, stride=1), L.Flatten(), L.Dense(6, 3, rng=g)))
    return _randomise_bn(model, g)


def _resnet():
    return _randomise_bn(L.Sequential(*models.resnet(in_channels=1, image_size=8, widths=(4, 6),
                                                     blocks_per_stage=1, n_classes=3, rng=2)),
                         np.random.default_rng(6))


# name -> (builder, per-sample input shape, has a NIR mapping)
MODELS = {"mlp": (_mlp, (20,), True), "mlp_lut": (_mlp_lut, (20,), False), "cnn": (_cnn, (2, 8, 8), False),
          "cnn_avg": (_cnn_avg, (2, 12, 12), True), "resnet": (_resnet, (1, 8, 8), True)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_exports(out: pathlib.Path) -> dict:
    """Export every model in every configuration under ``out``; returns {key: sha256}."""
    from exporters import hdf5
    from exporters.c_header import write_c
    from exporters.nir import write_nir
    hashes = {}
    for name, (build, shape, has_nir) in MODELS.items():
        model = build()
        g = np.random.default_rng(len(name))
        x = g.normal(size=(24,) + shape).astype(np.float32)
        labels = np.arange(24) % 3
        aux = {"feedback0/W": g.normal(size=(3, 4)), "step": np.int64(5)}
        for width, rounding, ovf, pct in CONFIGS:
            key = f"{name}/w{width}-{rounding}-{ovf}-p{pct:g}"
            path = out / f"{name}-w{width}-{rounding}.h5"
            hdf5.export(model, path, x, width=width, rounding=rounding, overflow=ovf, percentile=pct,
                        n_traces=6, aux=aux, meta={"model": name, "seed": 1}, labels=labels)
            hashes[f"{key}.h5"] = _sha(path.read_bytes())
            rep = hdf5.verify(path)
            assert rep.pop("path") == str(path) and rep["ok"], key
            hashes[f"{key}.verify.json"] = _sha(json.dumps(rep, sort_keys=True).encode())
            e = hdf5.read(path)
            c_dir = out / f"c-{name}-w{width}-{rounding}"
            paths = write_c(e.records, c_dir, name="golden", test_inputs=e.traces[0][:3],
                            traces=[t[:3] for t in e.traces])
            for part, p in sorted(paths.items()):
                hashes[f"{key}.c.{part}"] = _sha(p.read_bytes())
        if has_nir:
            for dtype in (np.float32, np.float64):
                p = write_nir(model, out / f"{name}.nir", input_shape=shape, dtype=dtype)
                hashes[f"{name}/{np.dtype(dtype).name}.nir"] = _sha(pathlib.Path(p).read_bytes())
    return hashes


def _is_file_hash(key):
    return key.endswith((".h5", ".nir"))


def test_exports_are_byte_identical_to_the_golden_hashes(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = make_exports(tmp_path)
    assert set(got) == set(golden["hashes"])
    same_hdf5 = golden["hdf5_version"] == h5py.version.hdf5_version
    diff = sorted(k for k, v in got.items() if v != golden["hashes"][k] and (same_hdf5 or not _is_file_hash(k)))
    assert not diff, f"{len(diff)} exports differ from tests/golden/export_hashes.json: {diff[:8]}"
    if not same_hdf5:
        pytest.skip(f"HDF5 {h5py.version.hdf5_version} here, the golden file hashes were made with HDF5 "
                    f"{golden['hdf5_version']}: only the C text and verify reports were compared")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        hashes = make_exports(pathlib.Path(tmp))
    doc = {"hdf5_version": h5py.version.hdf5_version, "h5py_version": h5py.version.version,
           "numpy_version": np.__version__, "hashes": hashes}
    if "--update" in sys.argv[1:]:
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(hashes)} hashes to {GOLDEN}")
    else:
        print(json.dumps(doc, indent=1, sort_keys=True))
