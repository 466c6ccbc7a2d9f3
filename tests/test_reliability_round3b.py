"""Issue 23, classes 5 and 8-12: report trusts nothing, third-party errors, silent acceptance, work
before refusing, messages that name the real cause, finite divergence and SIGPIPE.

Exit codes: 0 success, 1 a verified mismatch, 2 bad input or environment with ONE line on stderr.
The full disk is a tmpfs mounted in a temporary directory (root only); the real /dev/full is never
touched.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import h5py
import numpy as np
import pytest

from bll_ref import memory, models
from bll_ref.cli import main
from bll_ref.idx import read_idx
from clitools import TINY, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, timeout=120, **kw):
    """bll-ref in a fresh interpreter (import-time behaviour, pipes, FIFOs)."""
    return subprocess.run([sys.executable, "-m", "bll_ref.cli", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-epoch BLL run on the synthetic task: (run dir, checkpoint path, exported .h5 path)."""
    d = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--epochs", "2", "--out", str(d / "run")]) == 0
    ck = d / "run" / "checkpoint.npz"
    h5 = d / "m.h5"
    assert main(["export", str(ck), "--out", str(h5), "--calibration", "64", "--traces", "4"]) == 0
    return d / "run", ck, h5


def _copy_run(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "history.json")
    with open(path) as f:
        h = json.load(f)
    edit(h)
    with open(path, "w") as f:
        f.write(json.dumps(h))
    return dst


def _set_block(h, v):
    h["diagnostics"][0]["blocks"][0]["block"] = v


# ------------------------------------------------------------------------------------------------
# 5. report validates history.json and keeps report.md's structure whatever the run is called
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,entry", [
    (lambda h: h.update(n_train=float("inf")), "'n_train'"),
    (lambda h: _set_block(h, [1]), "block ids"),
    (lambda h: _set_block(h, "1"), "block ids"),
    (lambda h: h.update(version="1"), "'version' must be a whole number"),
    (lambda h: h["epochs"].__setitem__(0, 1.5), "'epochs'"),
])
def test_report_refuses_a_history_with_bad_values(trained, tmp_path, capsys, edit, entry):
    bad = _copy_run(trained[0], tmp_path / "bad", edit)
    rc, _, err = cli(capsys, "report", bad, "--out", tmp_path / "out")
    assert rc == 2 and entry in err and "history.json" in err, err
    assert "newer" not in err
    assert not (tmp_path / "out").exists()


def test_a_run_name_with_a_newline_adds_no_markdown_to_the_report(trained, tmp_path, capsys):
    evil = tmp_path / "x\n# Injected heading\n- [link](http://evil) |a|`b`"
    shutil.copytree(trained[0], evil)
    rc, _, _ = cli(capsys, "report", trained[0], evil, "--out", tmp_path / "out")
    assert rc == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert not any(line.startswith(("# Injected", "- [link]")) for line in md.splitlines())
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and all(line.count(" | ") == rows[0].count(" | ") for line in rows), rows
    assert md.count("\n# ") == 0 and md.startswith("# Run report\n")


# ------------------------------------------------------------------------------------------------
# 8. third-party errors: zip compression, NUMBA_NUM_THREADS, a damaged Numba cache
# ------------------------------------------------------------------------------------------------
def test_a_checkpoint_with_an_unsupported_zip_compression_is_exit_2(trained, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    shutil.copy(trained[1], bad)
    data = bytearray(bad.read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # compression method of every local and central header
        off, at = data.find(sig), {b"PK\x03\x04": 8, b"PK\x01\x02": 10}[sig]
        while off >= 0:
            data[off + at:off + at + 2] = (99).to_bytes(2, "little")
            off = data.find(sig, off + 4)
    bad.write_bytes(bytes(data))
    rc, _, err = cli(capsys, "eval", bad)
    assert rc == 2 and "compression" in err and str(bad) in err, err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_numba_num_threads_below_one_is_ignored_with_a_warning(value):
    res = run(["--version"], env={**os.environ, "NUMBA_NUM_THREADS": value})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert f"NUMBA_NUM_THREADS={value}" in res.stderr and "ignored" in res.stderr


def test_a_damaged_numba_cache_is_removed_said_and_compiled_again(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    script = textwrap.dedent("""
        import numpy as np
        from numba import njit
        import bll_ref  # noqa: F401  (guards the cache)
        @njit(cache=True)
        def twice(x):
            return 2 * x
        print(twice(np.arange(3)).sum())
    """)
    path = tmp_path / "kern.py"
    path.write_text(script)
    first = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert first.returncode == 0 and first.stdout.strip() == "6", first.stderr
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert any(f.endswith(".nbi") for f in files) and any(f.endswith(".nbc") for f in files)
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"\x80\x04garbage")
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "6", res.stderr
    assert "Traceback" not in res.stderr and "Numba cache file" in res.stderr and "damaged" in res.stderr


# ------------------------------------------------------------------------------------------------
# 10. silent acceptance: --resume changes, --epochs below done, inapplicable options, 16.5 units
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,says", [
    (["--lr", "0.1"], "--lr"), (["--sizes", "784,32,10"], "--sizes"), (["--method", "bp"], "--method"),
    (["--optimizer", "sgd"], "--optimizer"), (["--out", "elsewhere"], "--out"),
    (["--epochs", "1"], "already completed 2 epochs"),
])
def test_resume_refuses_options_that_would_change_the_run(trained, tmp_path, capsys, extra, says):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    before = (run_dir / "checkpoint.npz").read_bytes()
    extra = [str(tmp_path / e) if e == "elsewhere" else e for e in extra]
    rc, out, err = cli(capsys, "train", "--resume", run_dir, *extra)
    assert rc == 2 and says in err, err
    assert "epoch" not in out and (run_dir / "checkpoint.npz").read_bytes() == before
    assert not (tmp_path / "elsewhere").exists()


def test_resume_accepts_the_runs_own_values_and_the_schedule_options(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    rc, out, _ = cli(capsys, "train", "--resume", run_dir, "--lr", "0.001", "--sizes", "784,16,10",
                     "--epochs", "3", "--blas-threads", "1", "--out", run_dir)
    assert rc == 0 and "epoch 3/3 done" in out


@pytest.mark.parametrize("extra", [["--sizes", "784,16,10"], ["--activation", "tanh"],
                                   ["--activation", "leaky_relu"]])
def test_mlp_options_with_an_image_model_are_errors(tmp_path, capsys, extra):
    rc, out, err = cli(capsys, "train", "--data", "synthetic", "--model", "cnn", *extra, "--out", tmp_path / "r")
    assert rc == 2 and extra[0] in err and "mlp" in err and out == ""
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sizes", [(784, 16.5, 10), (784, True, 10), (784, 0, 10), (784, "16", 10)])
def test_mlp_refuses_sizes_that_are_not_whole_numbers_of_units(sizes):
    with pytest.raises(ValueError, match="whole numbers of units"):
        models.mlp(sizes)


# ------------------------------------------------------------------------------------------------
# 11. declared sizes, FIFOs, a file named state, --tb-dir, resnet18 width: refused before the work
# ------------------------------------------------------------------------------------------------
def test_a_zip_bomb_npz_is_refused_before_inflating(trained, tmp_path, capsys):
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(trained[1]) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with dst.open("aux/zeros.npy", "w", force_zip64=True) as f:  # 512 MiB of zeros, a few hundred KB
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (1 << 27,)})
            block = bytes(1 << 20)
            for _ in range(512):
                f.write(block)
    assert bomb.stat().st_size < 4 << 20
    rc, _, err = cli(capsys, "eval", bomb)
    assert rc == 2 and "inflates" in err and "aux/zeros.npy" in err, err


def test_a_state_file_declaring_other_shapes_is_refused_before_reading(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    path = run_dir / "state" / "learner0-epoch2.npz"
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    key = next(k for k, v in a.items() if v.dtype.kind == "f" and v.ndim == 2)
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in a.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                if k == key:  # header says 1 GiB; the entry holds nothing of it
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                             "shape": (1 << 14, 1 << 14)})
                else:
                    np.lib.format.write_array(f, v)
    rc, _, err = cli(capsys, "train", "--resume", run_dir, "--epochs", "3")
    assert rc == 2 and "learner0-epoch2.npz" in err and key in err, err


def test_an_hdf5_dataset_declaring_more_than_it_stores_is_refused_before_reading(trained, tmp_path, capsys):
    bad = tmp_path / "big.h5"
    shutil.copy(trained[2], bad)
    with h5py.File(bad, "a") as f:
        d = f.create_dataset("/aux/huge", shape=(1 << 28,), dtype="f4")  # 1 GiB declared, nothing written
        d.attrs["sha256"] = "0"
    assert bad.stat().st_size < 4 << 20
    rc, _, err = cli(capsys, "verify", bad)
    assert rc == 2 and "/aux/huge" in err and "declares" in err, err


def test_eval_and_verify_on_a_fifo_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ck.npz"
    os.mkfifo(fifo)
    for cmd in ("eval", "verify", "c-header"):
        argv = [cmd, fifo] + (["--out-dir", tmp_path / "c"] if cmd == "c-header" else [])
        res = run(argv, timeout=60)
        assert res.returncode == 2 and "pipe or FIFO" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_file_named_state_in_the_run_directory_is_refused_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state").write_text("not a directory")
    rc, out, err = cli(capsys, "train", *TINY, "--out", run_dir)
    assert rc == 2 and "state" in err and "training" not in out and "epoch" not in out
    assert sorted(os.listdir(run_dir)) == ["state"]


def test_export_refuses_a_tb_dir_under_a_file_before_writing_the_h5(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "m.h5"
    rc, _, err = cli(capsys, "export", trained[1], "--out", out, "--calibration", "16", "--traces", "2",
                     "--tb-dir", tmp_path / "file" / "tb")
    assert rc == 2 and "--tb-dir" in err and not out.exists()


def test_resnet18_width_that_cannot_fit_is_refused_up_front_with_an_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "memory_limit", lambda: 64 << 30)
    n, _ = models.resnet18_size(2000)
    assert n > 10 ** 10
    rc, out, err = cli(capsys, "train", "--data", "synthetic", "--model", "resnet18", "--channels", "2000",
                       "--out", tmp_path / "r")
    assert rc == 2 and "--channels 2000" in err and "GiB" in err and f"{n:,} parameters" in err and out == ""


def test_resnet18_size_counts_the_parameters_of_the_built_model():
    from bll_ref.layers import Sequential, state_dict
    for w in (1, 3, 8):
        built = sum(v.size for v in state_dict(Sequential(*models.resnet18(width=w))).values())
        assert models.resnet18_size(w)[0] == built


# ------------------------------------------------------------------------------------------------
# 9. messages that name the real cause
# ------------------------------------------------------------------------------------------------
def test_report_dpi_too_large_names_the_pixel_limit(trained, tmp_path, capsys):
    rc, _, err = cli(capsys, "report", trained[0], "--out", tmp_path / "o", "--dpi", "100000")
    assert rc == 2 and "pixels" in err and "memory" not in err and not (tmp_path / "o").exists()


def test_a_gzip_bomb_idx_is_refused_without_inflating_it(tmp_path):
    header = bytes([0, 0, 0x08, 1]) + (16).to_bytes(4, "big")
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as g:
        g.write(header + bytes(16))
        for _ in range(256):  # 256 MiB of trailing zeros, ~250 KB compressed
            g.write(bytes(1 << 20))
    with pytest.raises(ValueError, match="more than .* trailing bytes"):
        read_idx(bomb)
    big = tmp_path / "big.idx"
    big.write_bytes(bytes([0, 0, 0x08, 3]) + b"".join((1 << 20).to_bytes(4, "big") for _ in range(3)))
    with pytest.raises(ValueError, match="memory"):
        read_idx(big)


def test_a_text_file_as_state_is_not_called_pickled_data(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    (run_dir / "state" / "learner0-epoch2.npz").write_text("hello, not an archive\n")
    rc, _, err = cli(capsys, "train", "--resume", run_dir, "--epochs", "3")
    assert rc == 2 and "pickled" not in err and "not an .npz" in err, err


def test_eval_of_a_pipe_says_pipe_not_zip(trained):
    res = subprocess.run([sys.executable, "-m", "bll_ref.cli", "eval", "/dev/stdin"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, input="")
    assert res.returncode == 2 and "pipe" in res.stderr and "zip" not in res.stderr, res.stderr


def test_eval_of_a_checkpoint_wanting_absurd_synthetic_data_names_its_sizes(trained, tmp_path, capsys,
                                                                              monkeypatch):
    import bll_ref.data as data
    def boom(*a, **k):
        raise MemoryError
    monkeypatch.setattr(data, "synthetic_classification", boom)
    rc, _, err = cli(capsys, "eval", trained[1])
    assert rc == 2 and "out of memory" not in err and "--limit-train 300" in err and "checkpoint" in err, err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_named_without_hdf5_internals_or_temp_names(trained, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], timeout=30).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc, _, err = cli(capsys, "export", trained[1], "--out", full / "m.h5", "--calibration", "16",
                         "--traces", "2")
        assert rc == 2 and "No space left on device" in err and ".tmp" not in err and "errno" not in err, err
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], timeout=30)


# ------------------------------------------------------------------------------------------------
# 12. finite divergence, non-finite export weights, SIGPIPE
# ------------------------------------------------------------------------------------------------
def test_a_finite_but_absurd_learning_rate_is_stopped_as_divergence(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", *TINY, "--sizes", "784,64,64,10", "--activation", "tanh", "--limit-train",
                       "600", "--lr", "1e6", "--optimizer", "sgd", "--out", tmp_path / "r")
    assert rc == 2 and "diverged" in err and "step" in err and "rose" in err, err
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_c_header_refuses_non_finite_weights(trained, tmp_path, capsys):
    from exporters.hdf5_layout import _sha256
    bad = tmp_path / "nan.h5"
    shutil.copy(trained[2], bad)
    with h5py.File(bad, "a") as f:
        name = next(p for p in (f"/model/{k}" for k in _walk(f["/model"])) if f[p].dtype.kind == "f")
        a = f[name][()]
        a.flat[0] = np.nan
        f[name][...] = a
        f[name].attrs["sha256"] = _sha256(a)  # a crafted file: the checksum matches
    rc, _, err = cli(capsys, "c-header", bad, "--out-dir", tmp_path / "c")
    assert rc == 2 and "NaN" in err and name in err, err
    assert not (tmp_path / "c").exists() or os.listdir(tmp_path / "c") == []


def _walk(group, prefix=""):
    for k, v in group.items():
        if isinstance(v, h5py.Dataset):
            yield prefix + k
        else:
            yield from _walk(v, prefix + k + "/")


def test_verify_into_a_closed_pipe_exits_quietly(trained):
    p = subprocess.Popen([sys.executable, "-m", "bll_ref.cli", "verify", str(trained[2])], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    try:
        rc = p.wait(timeout=120)
        err = p.stderr.read().decode()
    finally:
        p.stderr.close()
    assert rc == 141 and err == "", err
