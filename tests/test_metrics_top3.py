"""Top-3 test accuracy and top-1 train accuracy (paper 001 Table 1's test-3 and train-1): the metric
by hand, what fit records per epoch, and the report's columns."""
import json

import numpy as np
import pytest

from bll_ref import models, report
from bll_ref.loop import fit
from bll_ref.methods import evaluate, make
from bll_ref.methods.common import accuracy, predict, topk_accuracy


def test_topk_by_hand():
    logits = np.array([[0.1, 0.5, 0.3, 0.9],    # label 0 is 4th
                       [0.1, 0.5, 0.3, 0.9],    # label 2 is 3rd
                       [2.0, 1.0, 1.0, 1.0],    # label 1 ties 2nd-4th: no class beats it but 0
                       [0.0, 0.0, 0.0, 0.0]])   # all tied: counted as a hit
    y = np.array([0, 2, 1, 3])
    assert topk_accuracy(logits, y, 1) == 0.25  # only the all-tied row (argmax picks class 0 there: 0.0)
    assert accuracy(logits, y) == 0.0
    assert topk_accuracy(logits, y, 2) == 0.5
    assert topk_accuracy(logits, y, 3) == 0.75
    assert topk_accuracy(logits, y, 4) == 1.0


def test_topk_equals_sorting_without_ties_and_handles_sequences():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 10))
    y = rng.integers(0, 10, 200)
    for k in (1, 3, 5):
        want = np.mean([y[i] in np.argsort(-logits[i])[:k] for i in range(200)])
        assert topk_accuracy(logits, y, k) == pytest.approx(want)
    assert topk_accuracy(logits, y, 1) == accuracy(logits, y)
    seq = rng.standard_normal((4, 7, 5))
    ys = rng.integers(0, 5, (4, 7))
    assert topk_accuracy(seq, ys, 2) == pytest.approx(topk_accuracy(seq.reshape(-1, 5), ys.reshape(-1), 2))
    with pytest.raises(ValueError, match="k=11"):
        topk_accuracy(logits, y, 11)


def _data(n_train=300, n_test=100):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 12))
    def make_set(n):
        y = rng.integers(0, 5, n)
        return (centres[y] + 1.5 * rng.standard_normal((n, 12))).astype(np.float32), y
    (xt, yt), (xs, ys) = make_set(n_train), make_set(n_test)
    return {"x_train": xt, "y_train": yt, "x_test": xs, "y_test": ys}


@pytest.mark.parametrize("method", ["bp", "bll"])
def test_fit_records_top3_and_train_accuracy_per_epoch(method, tmp_path):
    d = _data()
    m = make(method, models.mlp((12, 16, 16, 5), rng=0), sample_input=d["x_train"][:4], lr=1e-2,
             **({"n_classes": 5} if method == "bll" else {}))
    path = tmp_path / "history.json"
    h = fit(m, d, epochs=2, batch_size=50, log=None, history_path=str(path), train_eval=120)
    assert len(h["test_top3"]) == len(h["train_acc"]) == len(h["test_acc"]) == 2
    assert h["train_eval_samples"] == 120
    logits = predict(m.model, d["x_test"])
    assert h["test_acc"][-1] == accuracy(logits, d["y_test"])
    assert h["test_top3"][-1] == topk_accuracy(logits, d["y_test"], 3)
    assert h["test_top3"][-1] >= h["test_acc"][-1] and h["test_top3"][-1] > 0.6  # chance: 0.6 for 3 of 5
    # train-1 = the first 120 training examples in eval mode after the last epoch's updates
    assert h["train_acc"][-1] == evaluate(m.model, d["x_train"][:120], d["y_train"][:120])
    assert json.loads(path.read_text())["test_top3"] == h["test_top3"]


def test_train_eval_zero_skips_and_records_none():
    d = _data(100, 50)
    m = make("bp", models.mlp((12, 8, 5), rng=0))
    h = fit(m, d, epochs=1, batch_size=50, log=None, train_eval=0)
    assert h["train_acc"] == [None] and h["train_eval_samples"] == 0


def test_report_table_has_top3_and_train_columns(tmp_path):
    d = _data()
    run = tmp_path / "run"
    run.mkdir()
    h = fit(make("bp", models.mlp((12, 16, 5), rng=0)), d, epochs=2, batch_size=50, log=None,
            history_path=str(run / "history.json"))
    res = report.make_report([str(run)], tmp_path / "rep", log=None)
    lines = [l for l in open(res["paths"]["markdown"]).read().splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(head, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert float(row["final test top-3 %"]) == round(100 * h["test_top3"][-1], 2)
    assert float(row["final train acc %"]) == round(100 * h["train_acc"][-1], 2)
    # a history without the new keys (older bll_ref) reports n/a instead of failing
    old = json.loads((run / "history.json").read_text())
    del old["test_top3"], old["train_acc"]
    (run / "history.json").write_text(json.dumps(old))
    res = report.make_report([str(run)], tmp_path / "rep2", log=None)
    assert res["rows"][0]["final_test_top3"] is None and "| n/a | n/a |" in open(res["paths"]["markdown"]).read()
