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
    res = _load_example().main(["--synthetic", "--epochs", "3", "--limit-train", "1024", "--limit-test", "256",
                                "--channels", "4,8,8", "--batch-size", "32", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert set(res["results"]) == {"bp", "fa", "bll"}
    for name, r in res["results"].items():
        # 10 bar orientations: chance is 0.10; each method learns (bp 0.69, fa 0.51, bll 0.55 here)
        assert len(r["test_acc"]) == 3 and r["test_acc"][-1] > 0.3, (name, r["test_acc"])
        assert f"| {name} |" in res["table"] and f"| {name} |" in printed
    assert res["data"] == "synthetic" and res["n_train"] == 1024 and res["n_test"] == 256
    assert json.loads(out.read_text())["results"].keys() == res["results"].keys()
