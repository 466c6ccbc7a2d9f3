"""Smoke test of examples/resnet_fashion_mnist.py on a tiny synthetic slice: one JSON per
(method, seed), the Table-1-shaped table over seeds, resume (skips done runs), refusal of mixed
settings, the validation split, and the CNN through the same script."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic", "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--batch-size", "32",
        "--train-eval", "32", "--quiet"]


def _example():
    spec = importlib.util.spec_from_file_location("resnet_fashion_mnist",
                                                  os.path.join(ROOT, "examples", "resnet_fashion_mnist.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_five_methods_two_seeds_table_and_resume(tmp_path, capsys):
    ex, out = _example(), tmp_path / "r18"
    res = ex.main([*TINY, "--width", "2", "--seeds", "0,1", "--out", str(out)])
    specs = ["bp", "fa", "bll", "head", "predsim"]
    assert [r["spec"] for r in res["rows"]] == specs
    files = sorted(os.listdir(out / "runs"))
    assert files == sorted(f"{s}-seed{k}.json" for s in specs for k in (0, 1))
    for row in res["rows"]:
        recs = [json.loads((out / "runs" / f"{row['spec']}-seed{k}.json").read_text()) for k in (0, 1)]
        top1 = [100 * r["history"]["test_acc"][-1] for r in recs]
        assert row["test_top1"][0] == pytest.approx(np.mean(top1))
        assert row["test_top1"][1] == pytest.approx(np.std(top1, ddof=1))
        assert row["seeds"] == [0, 1] and recs[0]["settings"]["model"] == {"name": "resnet18", "width": 2}
    assert recs[0]["options"] == {"variational": "sim"} and recs[0]["eval_set"] == "test"
    # predsim minus bll, paired by seed
    bll = [json.loads((out / "runs" / f"bll-seed{k}.json").read_text()) for k in (0, 1)]
    paired = [100 * (p["history"]["test_acc"][-1] - b["history"]["test_acc"][-1]) for p, b in zip(recs, bll)]
    assert res["rows"][-1]["minus_bll"][0] == pytest.approx(np.mean(paired)) and res["rows"][-1]["minus_bll"][1] == [0, 1]
    assert res["rows"][2]["spec"] == "bll" and res["rows"][2]["minus_bll"] is None
    md = (out / "table.md").read_text()
    assert "| predsim |" in md and "test-3 %" in md and "train-1 %" in md and "92.7 / 99.3 / 96.0" in md
    assert json.loads((out / "table.json").read_text())["rows"][0]["spec"] == "bp"
    if res["curves"]:
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # resume: runs whose JSON exists are skipped; a new seed is added and the table grows
    capsys.readouterr()
    mtime = os.path.getmtime(out / "runs" / "bp-seed0.json")
    res = ex.main([*TINY, "--width", "2", "--seeds", "0,2", "--methods", "bp", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bp seed 0: done already, skipped" in printed and "=== bp seed 0" not in printed
    assert os.path.getmtime(out / "runs" / "bp-seed0.json") == mtime
    assert res["rows"][0]["seeds"] == [0, 1, 2]

    # other settings into the same directory: refused, nothing overwritten
    with pytest.raises(SystemExit):
        ex.main([*TINY, "--width", "3", "--seeds", "0", "--methods", "bp", "--out", str(out)])
    assert "other settings" in capsys.readouterr().err


def test_validation_split_variants_and_cnn(tmp_path):
    ex = _example()
    res = ex.main([*TINY, "--model", "cnn", "--channels", "2,2", "--val", "32", "--seeds", "0",
                   "--methods", "bll+var_weight=0.3+anneal=false,bll+variational=bernoulli_kl",
                   "--out", str(tmp_path / "v")])
    rec = json.loads((tmp_path / "v" / "runs" / "bll__var_weight=0.3__anneal=false-seed0.json").read_text())
    assert rec["eval_set"] == "val" and rec["n_train"] == 32 and rec["n_eval"] == 32
    assert rec["options"] == {"var_weight": 0.3, "anneal": False}
    assert [r["spec"] for r in res["rows"]] == ["bll+var_weight=0.3+anneal=false", "bll+variational=bernoulli_kl"]
    assert "val-1 %" in res["table"]
    assert ex.parse_spec("bll+feedback_decay=0.9") == ("bll", {"feedback_decay": 0.9})
    with pytest.raises(ValueError, match="unknown method"):
        ex.parse_spec("sgd")
    with pytest.raises(ValueError, match="takes none"):
        ex.parse_spec("bp+lr=1")
