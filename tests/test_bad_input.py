"""Issue 11: a careless or hostile user never sees a traceback, never loses or poisons a file.

Exit codes: 0 success, 1 a verified mismatch, 2 bad input or environment with ONE line on stderr.
Items 1-11 of the issue, one section each (item 12, the README, is in test_bad_input_readme.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from bll_ref import checkpoint, fileio, losses, models
from bll_ref.cli import main
from bll_ref.layers import Dense
from bll_ref.methods import make
from bll_ref.loop import TIMING_FIELDS, Diverged, fit
from clitools import TINY, cli, train_and_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BLL run on the synthetic task: (run dir, checkpoint path, exported .h5 path)."""
    return train_and_export(tmp_path_factory.mktemp("trained"))


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _forge(src, dst, *, header=None, edit=None):
    """Copy checkpoint ``src`` to ``dst`` with ``header(dict) -> dict | str`` and ``edit(arrays)`` applied."""
    a = _arrays(src)
    if header is not None:
        h = header(json.loads(str(a["header"])))
        a["header"] = np.array(h if isinstance(h, str) else json.dumps(h))
    if edit is not None:
        edit(a)
    np.savez(dst, **a)
    return dst


# ------------------------------------------------------------------------------------------------
# 1. divergence
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--lr", "1e6", "--optimizer", "sgd"],
                                   ["--method", "bp", "--optimizer", "sgd", "--lr", "1e30", "--dtype", "float64"],
                                   ["--method", "fa", "--optimizer", "sgd", "--lr", "1e30"]])
def test_diverging_run_exits_2_naming_epoch_step_block_and_writes_no_checkpoint(tmp_path, capsys, extra):
    rc, out, err = cli(capsys, "train", *TINY, "--epochs", "2", "--sizes", "784,16,16,10", *extra,
                       "--out", tmp_path / "run")
    assert rc == 2
    assert "diverged" in err and "epoch" in err and "step" in err and "block" in err and "--lr" in err
    assert "no checkpoint written" in err
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("opt", [
    ["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--lr", "-1"], ["--lr", "1e39"],
    ["--optimizer", "sgd", "--momentum", "nan"], ["--optimizer", "sgd", "--momentum", "1.5"],
    ["--feedback", "trained", "--feedback-lr", "inf"], ["--feedback", "trained", "--feedback-lr", "0"],
    ["--var-weight", "nan"], ["--tau", "-1"], ["--tau", "inf"], ["--m", "2"], ["--head-weight", "inf"],
    ["--l2", "nan"], ["--feedback-decay", "1.5"],
])
def test_non_finite_or_out_of_range_hyperparameters_are_refused_up_front(tmp_path, capsys, opt):
    rc, out, err = cli(capsys, "train", *TINY, *opt, "--out", tmp_path / "run")
    assert rc == 2 and opt[-2] in err
    assert out == "" and not (tmp_path / "run").exists()  # no data loaded, nothing created


def test_fit_names_the_block_and_checks_parameters_once_per_epoch_not_every_step(monkeypatch):
    from bll_ref import loop as common
    rng = np.random.default_rng(0)
    d = {"x_train": rng.standard_normal((256, 20)).astype(np.float32), "y_train": rng.integers(0, 4, 256),
         "x_test": rng.standard_normal((32, 20)).astype(np.float32), "y_test": rng.integers(0, 4, 32)}
    calls = []
    real = common._finite_state
    monkeypatch.setattr(common, "_finite_state", lambda method: calls.append(1) or real(method))
    m = make("bp", models.mlp((20, 16, 4), rng=0), sample_input=d["x_train"][:8], lr=1e-3)
    fit(m, d, epochs=3, batch_size=16, log=None)   # 16 steps per epoch
    assert len(calls) == 3
    m = make("bp", models.mlp((20, 16, 16, 4), rng=0), sample_input=d["x_train"][:8], lr=1e8, optimizer="sgd")
    with pytest.raises(Diverged, match=r"epoch 1, step \d+, block \d"):
        fit(m, d, epochs=2, batch_size=16, log=None)


# ------------------------------------------------------------------------------------------------
# 2. non-finite weights on load
# ------------------------------------------------------------------------------------------------
def test_checkpoint_with_nan_parameters_is_refused_by_eval_export_nir(trained, tmp_path, capsys):
    _, ck, _ = trained

    def poison(a):
        a["model/params/0.0.W"][0, 0] = np.nan
    bad = _forge(ck, tmp_path / "nan.npz", edit=poison)
    for argv in (["eval", bad], ["export", bad, "--out", tmp_path / "m.h5"], ["nir", bad, "--out", tmp_path / "m.nir"]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and "NaN or inf" in err and "model/params/0.0.W" in err
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.nir").exists()


# ------------------------------------------------------------------------------------------------
# 3. never destroy an input
# ------------------------------------------------------------------------------------------------
def test_output_path_equal_to_the_input_is_refused(trained, tmp_path, capsys):
    _, ck, h5 = trained
    mine = tmp_path / "ck.npz"
    shutil.copy(ck, mine)
    os.symlink(mine, tmp_path / "link.npz")
    before = mine.read_bytes()
    for argv in (["export", mine, "--out", mine], ["export", mine, "--out", tmp_path / "link.npz"],
                 ["nir", mine, "--out", tmp_path / "link.npz"], ["nir", tmp_path / "link.npz", "--out", mine]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and "is the input file" in err
    assert mine.read_bytes() == before
    cfile = tmp_path / "bll_model.c"      # an HDF5 file a careless user named like c-header's output
    shutil.copy(h5, cfile)
    rc, _, err = cli(capsys, "c-header", cfile, "--out-dir", tmp_path)
    assert rc == 2 and "is the input file" in err and cfile.read_bytes() == h5.read_bytes()


# ------------------------------------------------------------------------------------------------
# 4. file-system errors, temporary files
# ------------------------------------------------------------------------------------------------
def test_file_system_errors_exit_2_with_one_line_naming_the_path(trained, tmp_path, capsys):
    _, ck, h5 = trained
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [(["export", ck, "--out", tmp_path / "afile" / "m.h5"], "afile"),
             (["export", ck, "--out", tmp_path / "adir"], "adir"),
             (["nir", ck, "--out", tmp_path / "afile" / "m.nir"], "afile"),
             (["nir", ck, "--out", tmp_path / "adir"], "adir"),
             (["c-header", h5, "--out-dir", tmp_path / "afile"], "afile"),
             (["verify", tmp_path / "adir"], "adir"),
             (["c-header", tmp_path / "adir", "--out-dir", tmp_path / "c"], "adir"),
             (["nir", ck, "--out", tmp_path / "m.nir", "--quant", tmp_path / "adir"], "adir"),
             (["report", ck.parent, "--out", tmp_path / "afile"], "afile"),
             (["train", *TINY, "--out", tmp_path / "afile" / "run"], "afile")]
    for argv, name in cases:
        rc, out, err = cli(capsys, *argv)
        assert rc == 2 and name in err, (argv, err)
        assert "epoch" not in out   # train: refused before training


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(trained, tmp_path, capsys):
    _, ck, _ = trained
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for argv in (["export", ck, "--out", ro / "m.h5"], ["nir", ck, "--out", ro / "m.nir"],
                     ["train", *TINY, "--out", ro / "run"]):
            rc, out, err = cli(capsys, *argv)
            assert rc == 2 and str(ro) in err and "epoch" not in out
    finally:
        ro.chmod(0o755)


def test_train_checks_its_run_directory_before_loading_data_or_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # as a read-only file system answers
    rc, out, err = cli(capsys, "train", *TINY, "--out", tmp_path / "run")
    assert rc == 2 and "not writable" in err and str(tmp_path) in err
    assert out == "" and not (tmp_path / "run").exists()


def test_full_disk_at_the_final_write_exits_2_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import errno
    real = np.lib.format.write_array

    def full(fp, array, *a, **k):
        if array.dtype.kind == "U":     # the checkpoint header: the last array written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, array, *a, **k)
    monkeypatch.setattr(np.lib.format, "write_array", full)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *TINY, "--out", run)
    assert rc == 2 and "No space left" in err and "checkpoint.npz" in err
    assert not (run / "checkpoint.npz").exists()
    assert [f for f in os.listdir(run) if ".tmp" in f] == []


def test_failed_write_removes_the_temporary_file_and_names_the_target(tmp_path):
    target = tmp_path / "history.json"
    with pytest.raises(OSError, match="history.json"):
        with fileio.atomic_open(target, "w") as f:
            f.write("{")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_a_write_removes_the_temporary_file(tmp_path, sig, code):
    """SIGTERM / SIGINT while the checkpoint is being written: no checkpoint, no *.tmp<PID>."""
    script = textwrap.dedent(f"""
        import sys, time
        from bll_ref import checkpoint, fileio
        from bll_ref.cli import main
        def slow(path, arrays):
            with fileio.atomic_open(path, "wb") as f:
                f.write(b"half a checkpoint")
                f.flush()
                print("WRITING", flush=True)
                time.sleep(60)
        checkpoint.write_npz = slow
        sys.exit(main(["train"] + {TINY!r} + ["--out", {str(tmp_path / "run")!r}]))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    try:
        for line in p.stdout:
            if "WRITING" in line:
                break
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code and "Traceback" not in err
    assert [f for f in os.listdir(tmp_path / "run") if "checkpoint" in f] == []


# ------------------------------------------------------------------------------------------------
# 5. data
# ------------------------------------------------------------------------------------------------
def test_explicit_bll_data_that_is_empty_or_incomplete_is_an_error_not_a_fallback(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    part = tmp_path / "part"
    part.mkdir()
    (part / "train-images-idx3-ubyte.gz").write_bytes(b"")
    for root, missing in ((tmp_path / "empty", "train-images"), (part, "t10k-labels"),
                          (tmp_path / "nope", "no such directory")):
        monkeypatch.setenv("BLL_DATA", str(root))
        for data in ("auto", "fashion-mnist"):
            rc, out, err = cli(capsys, "train", "--data", data, "--sizes", "784,8,10", "--epochs", "1",
                               "--out", tmp_path / "run")
            assert rc == 2 and str(root) in err and missing in err and "synthetic" not in out
            assert not (tmp_path / "run").exists()


def test_auto_without_bll_data_falls_back_to_synthetic_and_says_so(tmp_path, capsys, monkeypatch):
    from bll_ref import data
    monkeypatch.delenv("BLL_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(tmp_path / "none"))
    rc, out, _ = cli(capsys, "train", "--sizes", "784,8,10", "--epochs", "1", "--limit-train", "100",
                     "--limit-test", "50", "--out", tmp_path / "run")
    assert rc == 0 and "synthetic" in out and "not found" in out


@pytest.mark.parametrize("argv", [
    ["train", "--data", "synthetic", "--limit-train", "0"], ["train", "--data", "synthetic", "--limit-test", "-1"],
    ["train", "--data", "fashion-mnist", "--limit-train", "0"], ["train", "--limit-test", "0"],
    ["demo", "--limit-train", "0"], ["demo", "--epochs", "0"],
])
def test_limits_are_validated_on_every_data_path(tmp_path, capsys, argv):
    rc, out, err = cli(capsys, *argv, *(["--out", tmp_path / "run"] if argv[0] == "train" else []))
    assert rc == 2 and ("limit" in err or "epochs" in err) and not (tmp_path / "run").exists()


def test_synthetic_limits_that_cannot_fit_in_memory_are_refused_before_drawing(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", "--data", "synthetic", "--sizes", "784,8,10", "--limit-train", "100000000",
                       "--out", tmp_path / "run")
    assert rc == 2 and "memory" in err and "--limit-train" in err and not (tmp_path / "run").exists()


def test_limits_of_eval_and_verify(trained, capsys):
    _, ck, h5 = trained
    assert cli(capsys, "eval", ck, "--limit-test", "0")[0] == 2
    assert cli(capsys, "verify", h5, "--limit-test", "0")[0] == 2


def test_eval_uses_the_data_the_checkpoint_was_trained_on(trained, capsys):
    run, ck, _ = trained
    hist = json.loads((run / "history.json").read_text())
    rc, out, _ = cli(capsys, "eval", ck)
    assert rc == 0 and "synthetic" in out
    assert f"{100 * hist['test_acc'][-1]:.2f}%" in out and "(100 synthetic" in out
    rc, out, _ = cli(capsys, "eval", ck, "--data", "synthetic", "--limit-test", "40")
    assert rc == 0 and "(40 synthetic" in out


def test_eval_of_a_library_checkpoint_without_meta(tmp_path, capsys):
    """checkpoint.save from Python records no meta: eval infers images from the first layer and a
    model that does not fit the data is one line, not a traceback."""
    checkpoint.save(tmp_path / "cnn.npz", models.cnn(channels=(4,), rng=0))
    rc, out, _ = cli(capsys, "eval", tmp_path / "cnn.npz", "--data", "synthetic", "--limit-test", "20")
    assert rc == 0 and "(20 synthetic" in out
    checkpoint.save(tmp_path / "mlp.npz", models.mlp((20, 8, 10), rng=0))
    rc, _, err = cli(capsys, "eval", tmp_path / "mlp.npz", "--data", "synthetic")
    assert rc == 2 and "does not fit" in err


# ------------------------------------------------------------------------------------------------
# 6. checkpoint headers
# ------------------------------------------------------------------------------------------------
def _deep(h, n):
    """The header with its model wrapped in n Sequentials (JSON text: json.dumps would recurse)."""
    text = json.dumps({**h, "model": "MODEL"})
    dense = '{"type": "Dense", "in_features": 784, "out_features": 10}'
    return text.replace('"MODEL"', '{"type": "Sequential", "layers": [' * n + dense + "]}" * n)


def _huge(h):
    h["model"]["layers"][0]["layers"][0]["out_features"] = 10 ** 9
    h["model"]["layers"][1]["layers"][0]["in_features"] = 10 ** 9
    return h


HEADERS = {
    "not json": (lambda h: "{not json", "not valid JSON"),
    "a list": (lambda h: [h], "must be a JSON object"),
    "missing model": (lambda h: {k: v for k, v in h.items() if k != "model"}, "lacks the key 'model'"),
    "missing meta": (lambda h: {k: v for k, v in h.items() if k != "meta"}, "lacks the key 'meta'"),
    "version a string": (lambda h: {**h, "version": "1"}, "'version' must be a int"),
    "meta a list": (lambda h: {**h, "meta": []}, "'meta' must be a dict"),
    "meta data a number": (lambda h: {**h, "meta": {**h["meta"], "data": 3}}, "'data' must be a string"),
    "limit a string": (lambda h: {**h, "meta": {**h["meta"], "options": {"limit_test": "x"}}}, "limit_test"),
    "units a string": (lambda h: json.loads(json.dumps(h).replace('"out_features": 16', '"out_features": "16"')),
                       "model config"),
    "unknown layer": (lambda h: json.loads(json.dumps(h).replace('"Dense"', '"Densest"', 1)), "unknown layer type"),
    "900 deep meta": (lambda h: {**h, "meta": {"x": json.loads("[" * 900 + "]" * 900)}}, "nested"),
    "900 deep model": (lambda h: _deep(h, 900), "nested"),
    "layers not a list": (lambda h: {**h, "model": {"type": "Sequential", "layers": 3}}, "model config"),
    "negative units": (lambda h: json.loads(json.dumps(h).replace('"out_features": 16', '"out_features": -16')),
                       "model config"),
    "bool units": (lambda h: json.loads(json.dumps(h).replace('"out_features": 16', '"out_features": true')),
                   "model config"),
    "1e9 units": (_huge, "memory"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_edited_header_is_refused_with_one_line(trained, tmp_path, capsys, case):
    edit, msg = HEADERS[case]
    bad = _forge(trained[1], tmp_path / "bad.npz", header=edit)
    rc, _, err = cli(capsys, "eval", bad)
    assert rc == 2 and msg in err, err


ARRAYS = {
    "integer weights": (lambda a: a.update({"model/params/0.0.W": a["model/params/0.0.W"].astype(np.int32)}), "int32"),
    "complex weights": (lambda a: a.update({"model/params/0.0.W": a["model/params/0.0.W"].astype(np.complex64)}),
                        "complex64"),
    "float64 in a float32 model": (lambda a: a.update({"model/params/0.0.W": a["model/params/0.0.W"].astype(np.float64)}),
                                   "float64, the header records float32"),
    "complex aux": (lambda a: a.update({"aux/head0/0.W": a["aux/head0/0.W"].astype(np.complex64)}), "complex64"),
    "missing weight": (lambda a: a.pop("model/params/0.0.c"), "missing"),
    "stray entry": (lambda a: a.update({"evil": np.zeros(3)}), "unexpected entry"),
}


@pytest.mark.parametrize("case", sorted(ARRAYS))
def test_arrays_must_be_exactly_the_recorded_float_dtype(trained, tmp_path, capsys, case):
    edit, msg = ARRAYS[case]
    bad = _forge(trained[1], tmp_path / "bad.npz", edit=edit)
    rc, _, err = cli(capsys, "eval", bad)
    assert rc == 2 and msg in err, err


def test_a_file_that_is_not_an_npz_is_called_that(tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for f in ("obj.npy", "arr.npy", "text.npz"):
        rc, _, err = cli(capsys, "eval", tmp_path / f)
        assert rc == 2 and "not a readable .npz file" in err and "allow_pickle" not in err


def test_absurd_array_sizes_are_refused_before_allocation(tmp_path, capsys):
    """An entry whose .npy header claims 10^12 floats (a few bytes on disk) is refused unread."""
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        with zf.open("model/params/0.0.W.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (10 ** 6, 10 ** 6)})
        with zf.open("header.npy", "w") as f:
            np.lib.format.write_array(f, np.array("{}"))
    rc, _, err = cli(capsys, "eval", bad)
    assert rc == 2 and "GiB" in err and "memory" in err


def test_train_sizes_that_cannot_fit_in_memory_are_refused_before_allocation(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", "--data", "synthetic", "--sizes", "784,1000000000,10",
                       "--out", tmp_path / "run")
    assert rc == 2 and "memory" in err and "--sizes" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 7. arguments validated before any work
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", [
    ["--epochs", "0"], ["--batch-size", "0"], ["--sizes", "784,0,10"], ["--sizes", "784"], ["--sizes", "a,b"],
    ["--sizes", "100,16,10"], ["--sizes", "784,16,5"],
    ["--seed", "-1"], ["--workers", "0"], ["--blas-threads", "0"], ["--limit-train", "0"],
])
def test_train_arguments_are_validated_before_any_work(tmp_path, capsys, opt):
    rc, out, err = cli(capsys, "train", "--data", "synthetic", *opt, "--out", tmp_path / "run")
    assert rc == 2 and opt[0] in err
    assert out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("opt", [["--parallel", "threads", "--span", "2"], ["--method", "bp", "--tau", "1"],
                                 ["--parallel", "none", "--workers", "2"]])
def test_options_refused_after_loading_data_still_create_nothing(tmp_path, capsys, opt):
    rc, _, err = cli(capsys, "train", *TINY, *opt, "--out", tmp_path / "run")
    assert rc == 2 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 8. library API
# ------------------------------------------------------------------------------------------------
BAD = {"empty": np.zeros((0, 4)), "complex": np.ones((3, 4)) + 1j, "object": np.ones((3, 4)).astype(object),
       "int": np.ones((3, 4), np.int64), "bool": np.ones((3, 4), bool), "list": [[1.0, 2.0]]}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_output_losses_reject_empty_complex_object_and_integer_arrays(kind):
    x = BAD[kind]
    good = np.zeros((3, 4))
    with pytest.raises(ValueError):
        losses.mse(x, x)
    with pytest.raises(ValueError):
        losses.mse(good, x)
    with pytest.raises(ValueError):
        losses.softmax_cross_entropy(x, np.zeros(len(x), np.int64))
    with pytest.raises(ValueError):
        losses.output.softmax(x)


def test_layer_call_runs_the_subclass_forward():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    layer = Dense(3, 2, rng=0)
    np.testing.assert_array_equal(layer(x), layer.forward(x))
    np.testing.assert_array_equal(layer(x, train=False), layer.forward(x, train=False))


# ------------------------------------------------------------------------------------------------
# 9. honest progress line
# ------------------------------------------------------------------------------------------------
def test_samples_per_second_counts_the_samples_processed(monkeypatch):
    """300 examples in batches of 128: the last step has 44; a clock that ticks 1 s per reading."""
    from bll_ref import loop as common
    ticks = iter(range(1000))
    monkeypatch.setattr(common, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(ticks)))}))
    rng = np.random.default_rng(0)
    d = {"x_train": rng.standard_normal((300, 20)).astype(np.float32), "y_train": rng.integers(0, 4, 300),
         "x_test": rng.standard_normal((30, 20)).astype(np.float32), "y_test": rng.integers(0, 4, 30)}
    lines = []
    fit(make("bp", models.mlp((20, 8, 4), rng=0), sample_input=d["x_train"][:8]), d, epochs=1,
        batch_size=128, log=lines.append)
    steps = [l for l in lines if "step" in l]
    assert steps[0].endswith(" 128 samples/s") and steps[1].endswith(" 128 samples/s")   # 128/1, 256/2
    assert steps[2].startswith("epoch 1/1 step 3/3") and steps[2].endswith(" 100 samples/s")  # 300/3


# ------------------------------------------------------------------------------------------------
# 10. provenance without leaks, bit-identical runs
# ------------------------------------------------------------------------------------------------
def test_same_run_in_two_directories_gives_identical_checkpoint_and_history(tmp_path, capsys, monkeypatch):
    runs = []
    for where in ("a", "b/deeper"):
        cwd = tmp_path / where
        cwd.mkdir(parents=True)
        monkeypatch.chdir(cwd)
        assert main(["train", *TINY, "--epochs", "2", "--out", str(cwd / "run")]) == 0
        runs.append(cwd / "run")
    capsys.readouterr()
    a, b = (r / "checkpoint.npz" for r in runs)
    assert a.read_bytes() == b.read_bytes()
    assert str(tmp_path).encode() not in a.read_bytes()
    assert json.loads(str(_arrays(a)["header"]))["meta"]["options"]["out"] == "run"
    ha, hb = (json.loads((r / "history.json").read_text()) for r in runs)
    assert ha["timing_fields"] == list(TIMING_FIELDS) == ["epoch_seconds", "samples_per_s"]
    strip = lambda h: {k: v for k, v in h.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(ha) == strip(hb) and len(ha["epoch_seconds"]) == 2
    assert str(tmp_path) not in (runs[0] / "state" / "trainer.json").read_text()


# ------------------------------------------------------------------------------------------------
# 11. CLI help and --version
# ------------------------------------------------------------------------------------------------
def _subparsers():
    import argparse
    import bll_ref.cli as cli_mod
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli_mod.main(["--version"])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_of_every_subcommand_has_help_with_its_default(capsys):
    choices = _subparsers()
    assert {"train", "eval", "demo", "report", "export", "verify", "nir", "c-header"} <= set(choices)
    for name, p in choices.items():
        text = p.format_help()
        for a in p._actions:
            if a.help is None:
                raise AssertionError(f"bll-ref {name} {a.dest}: no help text")
            if a.option_strings and a.default not in (None, False) and a.dest != "help":
                assert str(a.default) in text.replace("\n", " ").replace("  ", " ") or "default" in a.help, \
                    f"bll-ref {name} {a.option_strings[0]}: default {a.default} not shown"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "bll-ref 0.1.0"


# ------------------------------------------------------------------------------------------------
# the bar: bad input never prints a traceback (a real process, as a user runs it)
# ------------------------------------------------------------------------------------------------
def test_bad_input_in_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "x.npz").write_text("not a checkpoint")
    for argv in (["eval", "x.npz"], ["train", "--lr", "nan"], ["export", "x.npz", "--out", "x.npz"]):
        r = subprocess.run([sys.executable, "-m", "bll_ref.cli", *argv], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
