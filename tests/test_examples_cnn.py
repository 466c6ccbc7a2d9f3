"""Smoke test of examples/cnn_fashion_mnist.py: a tiny run of all three methods (synthetic images)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    path = os.path.join(ROOT, "examples", "cnn_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("cnn_fashion_mnist", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cnn_example_runs_bp_fa_bll_and_reports_a_table(tmp_path, capsys):
    out = tmp_path / "cnn.json"
    res = _load_example().main(["--synthetic", "--epochs", "1", "--limit-train", "256", "--limit-test", "128",
                                "--channels", "4,8,8", "--batch-size", "64", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert set(res["results"]) == {"bp", "fa", "bll"}
    for name, r in res["results"].items():
        assert len(r["test_acc"]) == 1 and 0.0 <= r["test_acc"][0] <= 1.0
        assert f"| {name} |" in res["table"] and f"| {name} |" in printed
    assert res["data"] == "synthetic" and res["n_train"] == 256 and res["n_test"] == 128
    assert json.loads(out.read_text())["results"].keys() == res["results"].keys()
