"""bll_ref.report: figures and report.md from real (tiny) BP and BLL runs; clear errors for bad runs."""
import json
import math
import os
import shutil
import sys

import pytest

from bll_ref import report
from bll_ref.cli import main as cli_main
from bll_ref.report.figures import import_matplotlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRAIN = 256


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs made through the CLI: BP (2 epochs) and BLL (3 epochs, 2 hidden blocks)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--data", "synthetic", "--limit-train", str(N_TRAIN), "--limit-test", "128",
              "--sizes", "784,32,32,10", "--batch-size", "64"]
    for method, epochs in (("bp", 2), ("bll", 3)):
        assert cli_main(["train", "--method", method, "--epochs", str(epochs), *common,
                         "--out", str(root / method)]) == 0
    return {"bp": str(root / "bp"), "bll": str(root / "bll")}


def _history(run_dir):
    with open(os.path.join(run_dir, "history.json")) as f:
        return json.load(f)


def _table(md_path):
    """report.md's table -> {run: {column: cell}}."""
    lines = [l for l in open(md_path).read().splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells))
            for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:])}


def _assert_png(path):
    from matplotlib.image import imread
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)


def _copy_run(src, dst, edit=None, *, checkpoint=True):
    os.makedirs(dst)
    h = _history(src)
    if edit:
        edit(h)
    with open(os.path.join(dst, "history.json"), "w") as f:
        json.dump(h, f)
    if checkpoint:
        shutil.copy(os.path.join(src, "checkpoint.npz"), dst)
    return str(dst)


def test_report_figures_are_pngs_and_table_equals_history(runs, tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    out = tmp_path / "new" / "report"  # missing parents are created
    res = report.make_report([runs["bp"], runs["bll"]], out, log=lines.append)
    paths = res["paths"]
    assert paths["curves"] == str(out / "curves.png") and set(paths["blocks"]) == {"bll"}
    for p in (paths["curves"], paths["blocks"]["bll"]):
        _assert_png(p)
    assert sorted(os.listdir(out)) == ["blocks-bll.png", "curves.png", "report.md"]  # no temp files left
    assert len(lines) == 3 and all(l.startswith("wrote ") for l in lines)

    table = _table(paths["markdown"])
    assert set(table) == {"bp", "bll"}
    assert table["bp"]["method"] == "bp" and table["bll"]["method"] == "bll gauss_ln"
    for name, run_dir in runs.items():
        h, row = _history(run_dir), table[name]
        best = max(range(len(h["test_acc"])), key=lambda i: h["test_acc"][i])
        wall = sum(h["epoch_seconds"])
        assert float(row["final test acc %"]) == round(100 * h["test_acc"][-1], 2)
        assert float(row["best test acc %"]) == round(100 * h["test_acc"][best], 2)
        assert int(row["best epoch"]) == h["epochs"][best]
        assert int(row["epochs"]) == len(h["epochs"])
        assert float(row["wall time s"]) == round(wall, 2)
        # the checkpoint's options pin --limit-train, so samples/s is derivable
        assert int(row["samples/s"].replace(",", "")) == round(N_TRAIN * len(h["epochs"]) / wall)
    md = open(paths["markdown"]).read()
    assert "](curves.png)" in md and "](blocks-bll.png)" in md


def test_bll_ref_report_command_writes_the_report(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli_main(["report", runs["bll"], runs["bp"], "--out", str(tmp_path / "r"), "--dpi", "40"]) == 0
    assert "report.md" in capsys.readouterr().out
    _assert_png(tmp_path / "r" / "curves.png")


def test_optional_history_keys_are_used_or_ignored(runs, tmp_path):
    """samples_per_s per epoch (weighted by time), unknown new keys ignored, n/a without a sample count."""
    def add_keys(h):
        h.update(samples_per_s=[1000.0] * len(h["epochs"]), schedule={"kind": "x"}, workers=2,
                 options={"variational": "eq8", "feedback": "twin"})
    a = _copy_run(runs["bll"], tmp_path / "a", add_keys)
    def drop_counts(h):  # an older history: no sample count, no throughput
        for k in ("samples_per_s", "n_train"):
            h.pop(k, None)
    b = _copy_run(runs["bp"], tmp_path / "b", drop_counts, checkpoint=False)  # no checkpoint either
    res = report.make_report([a, b], tmp_path / "out", log=None)
    rows = {r["run"]: r for r in res["rows"]}
    assert rows["a"]["samples_per_s"] == pytest.approx(1000.0)
    assert rows["a"]["label"] == "bll eq8 twin"
    assert rows["b"]["samples_per_s"] is None and rows["b"]["label"] == "bp"
    assert _table(res["paths"]["markdown"])["b"]["samples/s"] == "n/a"


def test_same_run_names_stay_apart(runs, tmp_path):
    pytest.importorskip("matplotlib")
    a = _copy_run(runs["bll"], tmp_path / "x" / "run")
    b = _copy_run(runs["bll"], tmp_path / "y" / "run")
    res = report.make_report([a, b], tmp_path / "out", log=None, dpi=40)
    assert len({r["run"] for r in res["rows"]}) == 2
    assert len(set(res["paths"]["blocks"].values())) == 2


def _drop(key):
    return lambda h: h.pop(key)


BAD_RUNS = {
    "no_history": (None, "no history.json"),
    "corrupt_json": ("{\"method\": \"bp\", \"epochs\": [1", "not readable JSON"),
    "missing_test_acc": (_drop("test_acc"), "missing 'test_acc'"),
    "missing_epoch_seconds": (_drop("epoch_seconds"), "missing 'epoch_seconds'"),
    "bll_without_blocks": (lambda h: [d.pop("blocks") for d in h["diagnostics"]], "'blocks'"),
    "bll_without_diagnostics": (_drop("diagnostics"), "missing 'diagnostics'"),
    "newer_version": (lambda h: h.update(version=99), "upgrade bll_ref"),
    "lengths_differ": (lambda h: h["test_acc"].pop(), "differ in length"),
    "no_epochs": (lambda h: [h[k].clear() for k in ("epochs", "test_acc", "train_loss",
                                                    "epoch_seconds", "diagnostics")], "no finished epoch"),
    "not_a_list": (lambda h: h.update(test_acc="high"), "'test_acc' should be a list of numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_gives_exit_2_and_one_line(runs, tmp_path, capsys, case):
    edit, expected = BAD_RUNS[case]
    bad = tmp_path / "bad"
    if edit is None:
        bad.mkdir()
    elif isinstance(edit, str):
        bad.mkdir()
        (bad / "history.json").write_text(edit)
    else:
        _copy_run(runs["bll"], bad, edit)
    out = tmp_path / "out"
    assert cli_main(["report", runs["bp"], str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err and expected in err
    assert not out.exists()  # every run is checked before anything is written
    with pytest.raises(report.ReportError):
        report.make_report([str(bad)], out, log=None)


def test_missing_run_directory_is_exit_2(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "no such run directory" in err


def test_without_matplotlib_writes_markdown_and_hint(runs, tmp_path, monkeypatch, capsys):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` now raises ImportError
    assert import_matplotlib() is None
    out = tmp_path / "out"
    assert cli_main(["report", runs["bp"], runs["bll"], "--out", str(out)]) == 0
    assert os.listdir(out) == ["report.md"]
    assert "pip install 'bll_ref[examples]'" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "pip install 'bll_ref[examples]'" in md and ".png" not in md
    table = _table(out / "report.md")
    h = _history(runs["bll"])
    assert float(table["bll"]["final test acc %"]) == round(100 * h["test_acc"][-1], 2)
    assert not math.isnan(float(table["bp"]["wall time s"]))
