"""Issue 23: special files as outputs, output = input, run-directory locks, C-safe names, signals.

Exit codes: 0 success, 1 a verified mismatch, 2 bad input or environment with ONE line on stderr.
Device nodes are made with mknod in a temporary directory (root only); the real /dev/null and
/dev/full are never touched.
"""
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bll_ref import fileio
from bll_ref.runlock import RunLock
from clitools import TINY, cli, train_and_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BLL run on the synthetic task: (run dir, checkpoint path, exported .h5 path)."""
    return train_and_export(tmp_path_factory.mktemp("trained"))


def _special(path, kind):
    """Make a character device (the numbers of /dev/null, but a new node) or a FIFO at ``path``."""
    if kind == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        os.mkfifo(path)
    return path


def _still_special(path, kind):
    mode = os.lstat(path).st_mode
    return stat.S_ISCHR(mode) if kind == "chardev" else stat.S_ISFIFO(mode)


KINDS = [pytest.param("chardev", marks=ROOT_ONLY), "fifo"]


# ------------------------------------------------------------------------------------------------
# 1. an output that is a device node, FIFO (or directory) is refused, never replaced
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_atomic_write_refuses_a_device_or_fifo_before_writing(tmp_path, kind):
    target = _special(tmp_path / "out.bin", kind)
    with pytest.raises(OSError, match="not a regular file"):
        with fileio.atomic_open(target, "wb") as f:
            f.write(b"x")
    assert _still_special(target, kind) and sorted(os.listdir(tmp_path)) == ["out.bin"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_writing_command_refuses_a_special_output(trained, tmp_path, capsys, kind):
    run, ck, h5 = trained
    cases = {
        "export": lambda p: ["export", ck, "--out", p, "--calibration", "16", "--traces", "2"],
        "nir": lambda p: ["nir", ck, "--out", p],
        "finetune-q": lambda p: ["finetune-q", ck, "--out", p, "--width", "8", "--limit-train", "300",
                                 "--calibration", "16"],
    }
    for cmd, argv in cases.items():
        target = _special(tmp_path / f"{cmd}.out", kind)
        rc, out, err = cli(capsys, *argv(target))
        assert rc == 2 and str(target) in err and "regular file" in err, (cmd, err)
        assert _still_special(target, kind), cmd
        assert out == "", cmd       # refused before any work
    # c-header: a file of the C model in --out-dir
    cdir = tmp_path / "c"
    cdir.mkdir()
    target = _special(cdir / "bll_model.c", kind)
    rc, _, err = cli(capsys, "c-header", h5, "--out-dir", cdir)
    assert rc == 2 and str(target) in err and _still_special(target, kind)
    assert os.listdir(cdir) == ["bll_model.c"]
    # report: report.md in --out
    rdir = tmp_path / "report"
    rdir.mkdir()
    target = _special(rdir / "report.md", kind)
    rc, _, err = cli(capsys, "report", run, "--out", rdir)
    assert rc == 2 and str(target) in err and _still_special(target, kind)
    assert os.listdir(rdir) == ["report.md"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_refuses_a_special_file_in_the_run_directory_before_training(tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    target = _special(run / "history.json", kind)
    rc, out, err = cli(capsys, "train", *TINY, "--out", run)
    assert rc == 2 and str(target) in err and "training" not in out
    assert _still_special(target, kind) and os.listdir(run) == ["history.json"]


def test_a_symlink_to_a_regular_file_is_followed_and_one_to_a_fifo_refused(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fileio.write_json_atomic(link, {"a": 1})
    assert os.path.islink(link) and real.read_text().startswith("{")
    fifo = _special(tmp_path / "fifo", "fifo")
    link2 = tmp_path / "link2"
    link2.symlink_to(fifo)
    with pytest.raises(OSError, match="through a symlink"):
        fileio.write_json_atomic(link2, {})
    assert _still_special(fifo, "fifo") and os.path.islink(link2)


# ------------------------------------------------------------------------------------------------
# 2. output = input (same name, a symlink, a hard link) is refused by every reading writer
# ------------------------------------------------------------------------------------------------
def test_finetune_q_and_exporters_refuse_to_write_over_their_input(trained, tmp_path, capsys):
    _, ck0, h5 = trained
    ck = tmp_path / "ck.npz"
    shutil.copy(ck0, ck)
    before = ck.read_bytes()
    (tmp_path / "sym.npz").symlink_to(ck)
    os.link(ck, tmp_path / "hard.npz")
    for out in (ck, tmp_path / "sym.npz", tmp_path / "hard.npz"):
        rc, _, err = cli(capsys, "finetune-q", ck, "--out", out, "--width", "8", "--limit-train", "300",
                         "--calibration", "16")
        assert rc == 2 and "is the input file" in err, err
        for cmd in (["nir", ck, "--out", out],
                    ["export", ck, "--out", out, "--calibration", "16", "--traces", "2"]):
            rc, _, err = cli(capsys, *cmd)
            assert rc == 2 and "is the input file" in err, (cmd, err)
    assert ck.read_bytes() == before and os.path.islink(tmp_path / "sym.npz")
    cdir = tmp_path / "c"
    cdir.mkdir()
    os.link(h5, cdir / "bll_model.h")
    rc, _, err = cli(capsys, "c-header", h5, "--out-dir", cdir)
    assert rc == 2 and "is the input file" in err
    assert os.path.samefile(cdir / "bll_model.h", h5)


# ------------------------------------------------------------------------------------------------
# 4. one run per run directory
# ------------------------------------------------------------------------------------------------
def test_a_second_train_on_a_locked_run_directory_exits_2_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom bll_ref.runlock import RunLock\n"
         f"RunLock().acquire({str(run)!r}); print('LOCKED', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        rc, out, err = cli(capsys, "train", *TINY, "--out", run)
        assert rc == 2 and f"pid {holder.pid}" in err and "in use" in err, err
        assert "training" not in out
        rc, _, err = cli(capsys, "train", *TINY, "--resume", run)
        assert rc == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert os.path.exists(run / RunLock.NAME)     # left by the killed holder: stale, not blocking
    rc, _, _ = cli(capsys, "train", *TINY, "--out", run)
    assert rc == 0 and not os.path.exists(run / RunLock.NAME)


# ------------------------------------------------------------------------------------------------
# 6. c-header --compile: compiler errors are exit 2; hostile record names stay valid C
# ------------------------------------------------------------------------------------------------
def test_c_header_compile_failure_is_exit_2_with_the_compilers_first_error(trained, tmp_path, capsys,
                                                                          monkeypatch):
    _, _, h5 = trained
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'note: starting' >&2\necho 'badcc: error: no space in the universe' >&2\n"
                  "exit 4\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    rc, _, err = cli(capsys, "c-header", h5, "--out-dir", tmp_path / "c", "--compile")
    assert rc == 2 and "badcc: error: no space in the universe" in err
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, _, err = cli(capsys, "c-header", h5, "--out-dir", tmp_path / "c2", "--compile")
    assert rc == 2 and "no C compiler" in err and not (tmp_path / "c2").exists()


def test_hostile_record_names_give_a_header_that_compiles_with_werror(trained, tmp_path):
    from exporters import hdf5
    from exporters.c_header import compile_c, find_c_compiler, write_c
    if find_c_compiler() is None:
        pytest.skip("no C compiler")
    e = hdf5.read(trained[2])
    hostile = ["a\nb", "??=x??/", 'q"uote\\', "end*/ /*x", "ünï ☃", "tab\there\r"]
    for r, name in zip(e.records, hostile * len(e.records)):
        r.name = name
    write_c(e.records, tmp_path, name="m", test_inputs=e.traces[0][:2], traces=[t[:2] for t in e.traces])
    exe = compile_c(tmp_path, name="m")
    res = subprocess.run([str(exe)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout


# ------------------------------------------------------------------------------------------------
# 7. a signal that a library's cleanup swallows still ends the command: 143, no output file
# ------------------------------------------------------------------------------------------------
def test_sigterm_swallowed_during_h5py_cleanup_still_exits_143_without_output(trained, tmp_path):
    _, ck, _ = trained
    out = tmp_path / "m.h5"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import h5py
        from bll_ref.cli import main
        real_close = h5py.File.close
        class Bomb:
            def __del__(self):          # an exception raised here is only printed, then dropped
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    time.sleep(0.001)
        def close(self):
            Bomb()
            real_close(self)
        h5py.File.close = close
        sys.exit(main(["export", {str(ck)!r}, "--out", {str(out)!r}, "--calibration", "16", "--traces", "2"]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 143, res.stderr
    assert "Traceback" not in res.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 3. resume trusts nothing in state/: exit 2 naming the file and the entry
# ------------------------------------------------------------------------------------------------
def _edit_trainer(run, edit):
    import json
    path = run / "state" / "trainer.json"
    t = json.loads(path.read_text())
    edit(t)
    path.write_text(json.dumps(t))


def _edit_state(run, edit):
    path = run / "state" / "learner0-epoch1.npz"
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    edit(a)
    os.remove(path)
    np.savez(path, **a)


def _first_float(a):
    return next(k for k, v in a.items() if v.dtype.kind == "f" and v.ndim == 2)


@pytest.mark.parametrize("what,edit,entry", [
    ("trainer", lambda t: t["options"].update(sizes=16), "options.sizes"),
    ("trainer", lambda t: t["options"].update(lr="0.1"), "options.lr"),
    ("trainer", lambda t: t.update(history={}), "history.epochs"),
    ("trainer", lambda t: t.update(version="1"), "version"),
    ("trainer", lambda t: t.update(rng={"bit_generator": "PCG64"}), "rng"),
    ("trainer", lambda t: t["files"].update(learner0="../../checkpoint.npz"), "files.learner0"),
    ("state", lambda a: a.update({_first_float(a): a[_first_float(a)].astype(np.complex128)}), "complex128"),
    ("state", lambda a: a.update({_first_float(a): a[_first_float(a)][:1]}), "shape"),
])
def test_resume_refuses_a_damaged_trainer_json_or_state_file(trained, tmp_path, capsys, what, edit, entry):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (_edit_trainer if what == "trainer" else _edit_state)(run, edit)
    rc, out, err = cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert rc == 2 and entry in err and ("trainer.json" if what == "trainer" else "learner0-epoch1.npz") in err, err
    assert "epoch 2/2" not in out


def test_resume_refuses_a_truncated_state_file(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    path = run / "state" / "learner0-epoch1.npz"
    path.write_bytes(path.read_bytes()[:300])
    rc, _, err = cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert rc == 2 and "learner0-epoch1.npz" in err
