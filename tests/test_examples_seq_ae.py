"""Smoke tests for examples/transformer_reversal.py and examples/uncertainty_autoencoder.py:
each example's main(argv) at a reduced size (seconds each), checking that what it returns and
writes is sane."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reversal():
    return _load("transformer_reversal")


@pytest.fixture(scope="module")
def autoencoder():
    return _load("uncertainty_autoencoder")


def _has_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


def test_transformer_reversal_tiny_run_reports_accuracies(reversal, tmp_path, capsys):
    out = tmp_path / "res.json"
    res = reversal.main(["--blocks", "2", "--dim", "16", "--epochs", "2", "--n-train", "256",
                         "--n-test", "64", "--out", str(out)])
    runs = res["runs"]
    assert [r["run"] for r in runs] == ["bll eq8+head", "bp"]
    for r in runs:
        assert r["blocks"] == 2 and len(r["element_acc"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["element_acc"])
        assert 0.0 <= r["sequence_acc"] <= 1.0
    bll = runs[0]
    assert bll["var_weight"] == pytest.approx(0.03)
    assert len(bll["head_acc_last_epoch"]) == 2  # one local head per hidden block
    assert all(math.isfinite(b) for epoch in bll["mean_abs_b_per_epoch"] for b in epoch)
    assert json.loads(out.read_text())["runs"][1]["method"] == "bp"
    printed = capsys.readouterr().out
    assert "seq-acc" in printed and "bll eq8+head" in printed


def test_transformer_reversal_bp_learns_reversal_in_two_epochs(reversal):
    # A width-64 single block learns the position-reversing attention within two short epochs
    # of BP (100 % at seed 0): proves the data, model and accuracy plumbing of the example.
    res = reversal.main(["--method", "bp", "--blocks", "1", "--dim", "64", "--epochs", "2",
                         "--n-train", "4000", "--n-test", "200"])
    assert res["runs"][0]["element_acc"][-1] > 0.9  # chance is 0.1


def test_transformer_reversal_variants_without_head(reversal):
    res = reversal.main(["--method", "bll", "--variant", "eq8", "--blocks", "2", "--dim", "16",
                         "--epochs", "1", "--n-train", "128", "--n-test", "32"])
    r = res["runs"][0]
    assert r["run"] == "bll eq8" and r["var_weight"] == 1.0 and "head_acc_last_epoch" not in r
    assert 0.0 <= r["element_acc"][0] <= 1.0


def test_transformer_reversal_full_plan_covers_paper_depths(reversal):
    args = reversal.parse_args(["--full"])
    depths = {n for _, _, n in reversal.plan(args)}
    assert depths == {5, 20}
    assert ("bll", "eq8", 5) in reversal.plan(args)  # the no-head ablation is reported too


def _check_autoencoder_result(res, epochs, learnt=True):
    for hist in res["runs"].values():
        assert len(hist["epochs"]) == epochs
        for row in [hist["init"]] + hist["epochs"]:
            for key in ("s15", "s16", "s17", "mse"):
                assert math.isfinite(row[key]), (key, row)
            assert row["s16"] >= 0 and row["mse"] >= 0
        if learnt:  # trained vs untrained: the predicted variance tracks the error far better
            assert hist["epochs"][-1]["s16"] < hist["init"]["s16"]


def test_uncertainty_autoencoder_tiny_run(autoencoder, tmp_path, capsys):
    res = autoencoder.main(["--n-train", "256", "--n-test", "64", "--epochs", "2",
                            "--out-dir", str(tmp_path)])
    _check_autoencoder_result(res, 2)
    assert (tmp_path / "uncertainty_autoencoder.json").is_file()
    printed = capsys.readouterr().out
    assert "S16" in printed and "S17" in printed
    if not _has_matplotlib():
        pytest.skip("matplotlib not installed: PNG check skipped (pip install matplotlib)")
    png = tmp_path / autoencoder.PNG_NAME
    assert res["png"]["bp"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uncertainty_autoencoder_folded_and_synthetic_fallback(autoencoder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BLL_DATA", raising=False)
    monkeypatch.setattr("bll_ref.data.DEFAULT_FASHION_MNIST_PATH", str(tmp_path / "no-such-dir"))
    res = autoencoder.main(["--method", "both", "--n-train", "128", "--n-test", "32", "--epochs", "1",
                            "--out-dir", str(tmp_path)])
    assert res["data"] == "synthetic"
    assert set(res["runs"]) == {"bp", "folded"}
    _check_autoencoder_result(res, 1, learnt=False)  # 4 steps: too few to require progress
    assert "Fashion-MNIST not found" in capsys.readouterr().out


def test_uncertainty_autoencoder_png_skipped_without_matplotlib(autoencoder, tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = autoencoder.main(["--n-train", "64", "--n-test", "16", "--epochs", "1", "--out-dir", str(tmp_path)])
    assert res["png"] == {}
    assert not (tmp_path / autoencoder.PNG_NAME).exists()
    assert "skipping the PNG" in capsys.readouterr().out
