"""Micro-batches and MPI replicas (issue 26): a batch split into R slices whose gradients are summed
in slice order makes the same updates under every schedule, bit for bit: sequential
``--micro-batches R``, the thread pipeline, and MPI pipelines whose stages run on several replica
ranks (checkpoint and every learner state by sha256, history.json without its timings and schedule
name, and every step's loss). In exact arithmetic the slices' summed gradients are the full
batch's (checked in float64). The network path (TCP on loopback, the docs' hostfile command), a
dead or hung rank, and resuming a replicated run into another world size are tested here too.

Every test that starts processes has a timeout, so a hang fails instead of stalling CI."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bll_ref import models
from bll_ref.cli import main
from bll_ref.loop import TIMING_FIELDS, fit
from bll_ref.methods import make
from bll_ref.parallel import SequentialSchedule, ThreadPipeline
from bll_ref.parallel.base import micro_step
from bll_ref.parallel.slices import pack_records, run_slice, slice_bounds, unpack_records
from test_parallel import MPIEXEC, _assert_same_run, _cli, _digest, _env, _method, _task, fault_seconds, needs_mpi

MLP = ["train", "--data", "synthetic", "--limit-train", "320", "--limit-test", "64", "--batch-size", "32",
       "--sizes", "784,64,48,32,10"]
CNN = ["train", "--data", "synthetic", "--model", "cnn", "--limit-train", "96", "--limit-test", "32",
       "--batch-size", "32"]
ARGS = {"mlp": MLP, "cnn": CNN,  # three optimisers per learner (block, head, feedback), SGD's velocities
        "mlp_sgd": MLP + ["--feedback", "trained", "--optimizer", "sgd", "--momentum", "0.9"],
        # evaluations of several 1000-row chunks through the stages (test 7, training accuracy 2): more
        # than the 2 + 2 chunks in flight, which is where rank 0 taking the logits late deadlocked
        "mlp_chunks": [{"320": "1100", "64": "6500"}.get(a, a) for a in MLP]}
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "parallel.md")


def _history(run_dir):
    with open(os.path.join(run_dir, "history.json")) as f:
        h = json.load(f)
    return {k: v for k, v in h.items() if k not in (*TIMING_FIELDS, "schedule", "workers")}


def _assert_same_history(a, b):
    ha, hb = _history(a), _history(b)
    assert ha["step_losses"] and ha["step_losses"] == hb["step_losses"]  # every step's loss, exactly
    assert ha == hb


# ------------------------------------------------------------------------------ the arithmetic
def test_slice_bounds_cover_the_batch_in_near_equal_slices():
    assert slice_bounds(32, 3) == [0, 11, 22, 32]
    assert slice_bounds(7, 7) == list(range(8))
    with pytest.raises(ValueError, match="cannot be split"):
        slice_bounds(2, 3)


@pytest.mark.parametrize("opts", [dict(variational="none"), dict(variational="eq8", feedback="trained")],
                         ids=["head only", "eq8 + trained feedback"])
def test_micro_batched_gradients_sum_to_the_full_batch_gradient_in_float64(opts):
    """Losses are means over the batch, so slice gradients times n_r / N add up to the full batch's;
    with the label-only feedback and no BatchNorm nothing else depends on the slice. SGD makes the
    parameter change the gradient itself."""
    x, y = _task()["x_train"][:30], _task()["y_train"][:30]
    states = []
    for slices in (1, 3, 4):
        m = make("bll", models.mlp((32, 24, 20, 4), rng=1, dtype=np.float64), sample_input=x[:4].astype(np.float64),
                 n_classes=4, optimizer="sgd", lr=0.5, **opts)
        xb = x.astype(np.float64)
        (m.train_step(xb, y) if slices == 1 else micro_step(m.learners, xb, y, m.one_hot(y), slices))
        states.append({k: v for k, v in m.state_dict().items() if "/block/" in k or "/head/" in k or "feedback" in k})
    for other in states[1:]:
        assert set(other) == set(states[0])
        for k in states[0]:
            np.testing.assert_allclose(other[k], states[0][k], rtol=1e-12, atol=1e-14, err_msg=k)
    changed = [k for k in states[0] if "params" in k and not np.array_equal(states[0][k], states[1][k])]
    assert changed  # float64 rounding differs: the slices really ran separately


def test_run_slice_leaves_the_learner_unchanged_and_records_pack_losslessly():
    m = _method("cnn")
    d = _task(True)
    learner = m.learners[0]
    before = _digest(learner.state_dict())
    Y = m.one_hot(d["y_train"][:8])
    _, rec = run_slice(learner, d["x_train"][:8], d["y_train"][:8], Y, 0.25)
    assert _digest(learner.state_dict()) == before
    assert any(k.startswith("bn0/") for k in rec) and any(k.startswith("g0/") for k in rec)
    buf, layout = pack_records([rec, rec])
    back = unpack_records(buf, layout, 2)
    assert _digest(back[1]) == _digest(rec)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("shards", [2, 3, 5])
@pytest.mark.parametrize("opts", [{}, dict(feedback="trained", optimizer="sgd", momentum=0.9)],
                         ids=["default", "trained feedback + sgd"])
def test_a_step_in_shares_makes_the_whole_step_bit_for_bit(kind, shards, opts):
    """Replicas on one host each sum and step their share of a learner's parameters
    (``shard_parts``, ``combine(parts=...)``), then take the others' shares: the parameters and,
    put together, the optimiser moments equal the whole step's exactly, over two steps."""
    import copy

    from bll_ref.parallel.slices import optimisers, combine, shard_parts, split

    m = _method(kind, **opts)
    d = _task(kind == "cnn")
    x, y = d["x_train"][:30], d["y_train"][:30]
    learner = m.learners[1]
    net = learner.source.net
    assert optimisers(learner) == [learner.opt, learner.head_opt] + ([net.opt] if opts else [])  # the keys below
    owner = {f"{part}/params/": j for j, part in enumerate(("block", "head", "feedback"))}
    owner.update({f"{o}/{s}/": j for j, o in enumerate(("opt", "head_opt", "feedback_opt"))
                  for s in ("m", "v", "velocity")})
    h = m.learners[0].forward(x)
    replicas = [copy.deepcopy(learner) for _ in range(shards)]
    parts = [shard_parts(learner, q, shards) for q in range(shards)]
    sizes = [sum(hi - lo for part in ps for lo, hi in part.values()) for ps in parts]
    assert sum(sizes) == sum(p.size for o in optimisers(learner) for p in o.layer.params.values())
    assert max(sizes) - min(sizes) <= 32  # cuts at multiples of 16 elements
    for _ in range(2):  # moments and step counts carried from step to step
        recs = [run_slice(learner, *args)[1] for args in zip(*split(h, y, m.one_hot(y), 3))]
        combine(learner, recs)
        before = [copy.deepcopy(c.state_dict()) for c in replicas]
        for q, c in enumerate(replicas):
            combine(c, recs, parts[q])
        whole, states = learner.state_dict(), [c.state_dict() for c in replicas]
        for key, v in whole.items():
            prefix = next((p for p in owner if key.startswith(p)), None)
            if prefix is None:  # not stepped in shares (statistics, feedback, step counts): every replica's
                assert all(np.array_equal(st[key], v) for st in states), key
                continue
            got = np.full(v.size, np.nan, v.dtype)
            for q, st in enumerate(states):
                lo, hi = parts[q][owner[prefix]].get(key[len(prefix):], (0, 0))
                got[lo:hi] = st[key].reshape(-1)[lo:hi]
                rest = np.ones(v.size, bool)
                rest[lo:hi] = False
                assert np.array_equal(st[key].reshape(-1)[rest], before[q][key].reshape(-1)[rest]), key  # not stepped
            assert np.array_equal(got, v.reshape(-1)), key
        for c in replicas:  # each takes the others' parameters (what ``shm.take_params`` copies)
            for o, o_whole in zip(optimisers(c), optimisers(learner)):
                for k, p in o.layer.params.items():
                    p[...] = o_whole.layer.params[k]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]], ids=["2 workers", "3 workers"])
def test_thread_pipeline_with_micro_batches_equals_sequential(kind, groups):
    def trained(schedule_of):
        m = _method(kind)
        h = fit(m, _task(kind == "cnn"), epochs=2, batch_size=32, rng=5, log=None, schedule=schedule_of(m))
        return _digest(m.state_dict()), h["step_losses"]

    seq = trained(lambda m: SequentialSchedule(blas=1, micro_batches=3, method=m))
    par = trained(lambda m: ThreadPipeline(m, groups, blas=1, micro_batches=3))
    plain = trained(lambda m: SequentialSchedule(blas=1))
    assert seq[1] == par[1] and [k for k in seq[0] if seq[0][k] != par[0][k]] == []
    assert seq[0] != plain[0]  # slices are not the whole batch: the comparison can fail


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_records_written_over_from_step_to_step_make_the_same_steps_as_fresh_ones(kind):
    """The sequential schedule and the thread workers keep a step's micro-batch records and let
    the next step's ``run_slice`` write into them (MPI replicas write into their send buffers the
    same way); the steps are those of freshly allocated records, bit for bit."""
    d = _task(kind == "cnn")

    def trained(pool):
        m, arrays = _method(kind), []
        for t in range(4):
            xb, yb = d["x_train"][32 * t:32 * t + 32], d["y_train"][32 * t:32 * t + 32]
            micro_step(m.learners, xb, yb, m.one_hot(yb), 3, pool=pool)
            if pool is not None:
                arrays.append([v for rec in pool["records"][0] for k, v in sorted(rec.items()) if k.startswith("g")])
        if pool is not None:  # the same gradient arrays every step, written over
            assert arrays[0] and all(a is b for later in arrays[1:] for a, b in zip(arrays[0], later))
        return _digest(m.state_dict())

    assert trained({}) == trained(None)


def test_micro_batches_refuse_what_they_cannot_split(tmp_path, capsys):
    bad = [(["--micro-batches", "2", "--method", "bp"], "BLL's block learners"),
           (["--micro-batches", "2", "--feedback-decay", "0.9"], "--feedback-decay"),
           (["--micro-batches", "64"], "more than --batch-size"),
           (["--replicas", "2"], "needs --parallel mpi"),
           (["--micro-batches", "0"], "--micro-batches must be >= 1"),
           (["--replicas", "0", "--parallel", "mpi"], "--replicas must be >= 1"),
           (["--micro-batches", "3", "--limit-train", "322"], "the last batch has 2 rows")]
    for args, match in bad:
        assert main(MLP + ["--epochs", "1", "--out", str(tmp_path / "x"), *args]) == 2, args
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ MPI
@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    return sequential_runs(tmp_path_factory)


def sequential_runs(tmp_path_factory):
    """Sequential reference runs, one per (model, micro-batches), made when first asked for."""
    runs = {}

    def get(kind, micro):
        if (kind, micro) not in runs:
            out = tmp_path_factory.mktemp(f"seq-{kind}-{micro}") / "run"
            assert main(ARGS[kind] + ["--epochs", "2", "--out", str(out), "--micro-batches", str(micro)]) == 0
            runs[kind, micro] = out
        return runs[kind, micro]
    return get


@needs_mpi
@pytest.mark.parametrize("kind,ranks,replicas,micro", [
    ("mlp", 2, 2, 2), ("mlp", 3, 3, 3), ("mlp", 3, 1, 1), ("mlp", 4, 2, 2), ("mlp", 2, 2, 4),
    ("cnn", 2, 2, 2), ("cnn", 3, 1, 1), ("cnn", 4, 2, 2), ("mlp_sgd", 3, 3, 3),
    ("mlp_chunks", 2, 1, 1), ("mlp_chunks", 4, 1, 1), ("mlp_chunks", 4, 2, 2)],
    ids=lambda v: str(v))
def test_mpi_replicas_equal_sequential_micro_batches(sequential, tmp_path, kind, ranks, replicas, micro):
    out = tmp_path / "mpi"
    extra = ["--replicas", str(replicas), "--micro-batches", str(micro)] if micro > 1 else []
    r = _cli(ARGS[kind] + ["--epochs", "2", "--out", str(out), *extra], mpi=ranks, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    if replicas > 1:  # replicas on one host share their records in memory
        assert "replicas of stage 1 exchange records through shared memory" in r.stdout
    stages = ranks // replicas
    assert f"world: {ranks} ranks = {stages} stage" in r.stdout and f"worker {stages - 1}:" in r.stdout
    held = re.search(r"memory per rank, MB \(model state, data, resident, peak resident\): (.*) \(the whole model is "
                     r"([\d.]+), the whole data ([\d.]+);", r.stdout)
    rows = [[float(v) for v in part.split(": ")[1].split(", ")] for part in held.group(1).split("; ")]
    state, data = [row[0] for row in rows], [row[1] for row in rows]
    whole = float(held.group(2))
    assert len(rows) == ranks and data[0] == float(held.group(3))  # rank 0 keeps all the data
    # every rank only its own stage's learners, rank 0 too: the stages' states add up to the model
    assert abs(sum(state[::replicas]) - whole) <= 0.01 * stages
    if stages > 1:
        assert max(state) < whole
    for rank in range(1, ranks):  # no test set off rank 0; no training images past stage 0
        assert data[rank] < data[0]
        if rank >= replicas:
            assert data[rank] < 0.01 * data[0]
    ref = sequential(kind, micro)
    _assert_same_run(ref, out)
    _assert_same_history(ref, out)


@needs_mpi
@pytest.mark.parametrize("kind,ranks,replicas,micro", [("mlp", 2, 2, 4), ("cnn", 4, 2, 2)], ids=lambda v: str(v))
def test_replicas_that_cannot_share_memory_send_their_records_and_give_the_same_bits(
        sequential, tmp_path, kind, ranks, replicas, micro):
    """BLL_REF_SHARED_DIR="" stands for replicas on several hosts: the records travel as messages."""
    out = tmp_path / "mpi"
    r = _cli(ARGS[kind] + ["--epochs", "2", "--out", str(out), "--replicas", str(replicas), "--micro-batches",
                           str(micro)], mpi=ranks, timeout=240, BLL_REF_SHARED_DIR="")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replicas of stage 1 exchange records through messages" in r.stdout
    _assert_same_run(sequential(kind, micro), out)
    _assert_same_history(sequential(kind, micro), out)


@needs_mpi
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_shared_directory_falls_back_to_messages_and_leaves_nothing(sequential, tmp_path):
    """A /dev/shm with no room (a one-page tmpfs here) is found when the file is made, not by a
    SIGBUS later: the replicas fall back to messages, and the directory is left empty."""
    shm = tmp_path / "shm"
    shm.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(shm)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = tmp_path / "mpi"
        r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", "2"], mpi=2, timeout=240,
                 BLL_REF_SHARED_DIR=str(shm))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "replicas of stage 1 exchange records through messages" in r.stdout
        assert os.listdir(shm) == []
        _assert_same_run(sequential("mlp", 2), out)
    finally:
        subprocess.run(["umount", str(shm)], check=True)


@needs_mpi
def test_shared_files_left_by_a_dead_job_are_removed_and_a_run_leaves_none(tmp_path):
    """A job whose rank 0 died between making a shared file and unlinking it (about a millisecond)
    leaves the file; the next job's rank 0 removes it (the dead pid in its name), and leaves any
    of a living process alone."""
    shm = tmp_path / "shm"
    shm.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = shm / f"bll_ref_records_{int(gone.stdout)}_x1", shm / f"bll_ref_records_{os.getpid()}_x2"
    dead.write_bytes(b"left")
    alive.write_bytes(b"in use")
    out = tmp_path / "mpi"
    r = _cli(MLP + ["--epochs", "1", "--out", str(out), "--replicas", "2"], mpi=2, timeout=240,
             BLL_REF_SHARED_DIR=str(shm))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replicas of stage 1 exchange records through shared memory" in r.stdout
    assert sorted(os.listdir(shm)) == [alive.name]


def _docs_command(marker):
    """The one command line of docs/parallel.md that contains ``marker``."""
    with open(DOCS) as f:
        lines = [l.strip() for l in f if marker in l and not l.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0].split()


def as_test_runs(words, out):
    """A docs command (its words) as a test runs it: this install's mpiexec and Python, the run
    directory ``out`` and the test MLP's small data, two epochs."""
    cmd = [MPIEXEC if c == "mpiexec" else sys.executable if c == "python" else c for c in words]
    return cmd[:cmd.index("--out")] + ["--out", str(out)] + MLP[1:] + ["--epochs", "2"]


def docs_train_command(marker, out):
    """``_docs_command(marker)`` as a test runs it (``as_test_runs``)."""
    return as_test_runs(_docs_command(marker), out)


@needs_mpi
def test_docs_hostfile_command_over_tcp_on_loopback_equals_sequential(sequential, tmp_path):
    """The hostfile command of the docs, run as written (hosts.txt naming localhost; python and the
    run directory replaced), forces OpenMPI's TCP transport, so the messages cross the code a
    multi-host run uses. The Slurm lines: tests/test_slurm.py."""
    cmd = _docs_command("--hostfile hosts.txt")
    assert cmd[:2] == ["mpiexec", "-n"] and "tcp,self" in cmd
    (tmp_path / "hosts.txt").write_text("localhost slots=4\n")
    out = tmp_path / "run"
    cmd = docs_train_command("--hostfile hosts.txt", out)
    cmd.insert(1, "--oversubscribe")
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(sequential("mlp", 2), out)
    _assert_same_history(sequential("mlp", 2), out)


@needs_mpi
@pytest.mark.parametrize("kind,ranks,replicas", [("hang", 2, 1), ("hang", 2, 2), ("kill", 4, 2)])
def test_a_dead_or_hung_rank_ends_the_job_within_10_s(tmp_path, kind, ranks, replicas):
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", str(replicas)], mpi=ranks, timeout=120,
             BLL_REF_FAULT=f"{kind}:1:0:3")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    text = r.stdout + r.stderr
    if kind == "hang":
        who = r"rank 1 \(blocks? [\d-]+\)" if replicas == 1 else r"rank 1 \(blocks 1-4, replica 1\)"
        assert re.search(f"no message from {who} for \\d+ s at step \\d+; it is dead or hung", r.stderr), \
            r.stderr[-2000:]
    else:
        assert "rank 1" in text and "worker 0: block" in text  # OpenMPI names the rank; the assignment its blocks
    assert not (out / "checkpoint.npz").exists() and not (out / "state").exists()


@needs_mpi
@pytest.mark.parametrize("ranks,replicas", [(2, 1), (2, 2), (3, 1)])
def test_a_rank_hung_in_the_first_step_of_epoch_2_ends_the_job_within_10_s(tmp_path, ranks, replicas):
    """Rank 0 evaluates between epochs and tells the others it is busy; once it has started the
    next epoch every wait, the first step's included, has the short deadline: a rank hung at step 1
    of epoch 2 is named within seconds, and the run directory keeps epoch 1 only."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", str(replicas)], mpi=ranks, timeout=120,
             BLL_REF_FAULT="hang:1:1:1")
    assert r.returncode != 0
    assert "epoch 1/2 done" in r.stdout  # the fault is in the second epoch, after rank 0 evaluated
    assert fault_seconds(r) < 10
    who = r"rank 1 \(blocks? [\d-]+\)" if replicas == 1 else r"rank 1 \(blocks 1-4, replica 1\)"
    assert re.search(f"no message from {who} for \\d+ s at step \\d+; it is dead or hung", r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists()
    with open(out / "state" / "trainer.json") as f:
        assert json.load(f)["epoch"] == 1  # the last complete epoch, nothing of the second
    assert not [p for p in os.listdir(out) if "tmp" in p]


@needs_mpi
@pytest.mark.parametrize("ranks,replicas", [(2, 1), (2, 2)])
def test_a_rank_hung_in_the_very_first_step_ends_the_job_within_10_s(tmp_path, ranks, replicas):
    """Every rank loads or compiles its kernels on copies of its learners before the first step
    (``_warm_up``), so the first step of the run waits under the short deadline too (it used to
    allow 600 s). The Numba cache is warm here: the other tests of this module compiled it."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", str(replicas)], mpi=ranks, timeout=120,
             BLL_REF_FAULT="hang:1:0:1")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    who = r"rank 1 \(blocks? [\d-]+\)" if replicas == 1 else r"rank 1 \(blocks 1-4, replica 1\)"
    assert re.search(f"no message from {who} for \\d+ s at step [1-3]; it is dead or hung", r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists() and not (out / "state").exists()


@needs_mpi
def test_a_healthy_run_with_a_cold_numba_cache_is_not_taken_for_hung(sequential, tmp_path):
    """With no compiled kernel on disk every rank compiles while it warms up (under the start-up
    allowance); nothing is left to compile in the first step or in rank 0's evaluation, which wait
    under the short deadline, so the run ends normally and equal to the sequential one."""
    out = tmp_path / "run"
    r = _cli(CNN + ["--epochs", "2", "--out", str(out), "--replicas", "2"], mpi=4, timeout=400,
             NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert any((tmp_path / "numba-cache").rglob("*.nbi"))  # the ranks did compile into the empty cache
    _assert_same_run(sequential("cnn", 2), out)


@needs_mpi
def test_a_rank_0_hung_at_start_up_is_named_once_it_stops_beating(tmp_path):
    """Before the pipeline exists the others wait for rank 0's plan; rank 0's beat thread stops once
    its main thread neither runs nor moves (STILL, 5 s), and the others end the job SILENCE (8 s)
    after its last beat, however long the start-up allowance (600 s)."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "1", "--out", str(out)], mpi=2, timeout=120, BLL_REF_FAULT="hang:0:0:plan")
    assert r.returncode != 0
    assert fault_seconds(r) < 20
    assert ("rank 1: rank 0 has sent no beat for 8 s at start-up (waiting for rank 0's plan); it is hung or dead"
            in r.stderr), r.stderr[-2000:]
    assert not out.exists() or not os.listdir(out)


@needs_mpi
def test_a_rank_0_busy_at_start_up_for_longer_than_the_silence_is_waited_for(tmp_path, sequential):
    """Rank 0 works (here: a busy loop) for 20 s while it plans, longer than the 8 + 5 s after which
    a silent rank is named: it beats all along, so the run goes on and equals the sequential one."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out)], mpi=2, timeout=180, BLL_REF_FAULT="slow:0:0:plan")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "injected fault slow:0:0:plan" in r.stderr
    _assert_same_run(sequential("mlp", 1), out)


@needs_mpi
def test_a_rank_that_beats_but_never_arrives_ends_the_job_after_the_start_up_allowance(tmp_path):
    """A rank that keeps working but never reaches the others (here: a busy loop for an hour) is
    bounded by the start-up allowance (600 s; BLL_REF_MPI_START_UP makes it 3 s here)."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "1", "--out", str(out)], mpi=2, timeout=120, BLL_REF_FAULT="spin:0:0:plan",
             BLL_REF_MPI_START_UP="3")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    assert ("rank 1: still waiting for rank 0's plan after 3 s at start-up, although every rank beats; ending the job"
            in r.stderr), r.stderr[-2000:]
    assert not out.exists() or not os.listdir(out)


@needs_mpi
@pytest.mark.parametrize("ranks,replicas,epochs", [(2, 1, 2), (3, 1, 2), (2, 2, 2), (2, 1, 1), (2, 2, 1)])
def test_rank_0_hung_in_its_evaluation_ends_the_job_within_10_s(tmp_path, ranks, replicas, epochs):
    """Between epochs rank 0 evaluates and writes files while the others wait; it sends them a beat
    after every evaluation chunk and file, so a rank 0 that stops beating is named within seconds.
    After the last epoch (``epochs`` 1) the others wait the same way for its "done", sent once the
    checkpoint is written; they used to sit in MPI's finalize for ever."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", str(epochs), "--out", str(out), "--replicas", str(replicas)], mpi=ranks,
             timeout=120, BLL_REF_FAULT="hang:0:0:eval")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    who = r"rank 0 \(blocks? [\d-]+(, replica 0)?\)"
    when = "between epochs" if epochs > 1 else "after the last epoch"  # a replica; a later stage waits for a chunk
    assert re.search(f"no message from {who} for \\d+ s ({when}|in the evaluation of epoch 1); it is dead or hung",
                     r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists() and not (out / "state").exists()


@needs_mpi
@pytest.mark.parametrize("kind,ranks,replicas,rank", [("hang", 2, 1, 1), ("kill", 3, 1, 2), ("hang", 4, 2, 2)])
def test_a_stage_hung_or_dead_in_its_part_of_the_evaluation_ends_the_job_within_10_s(
        tmp_path, kind, ranks, replicas, rank):
    """The evaluation is a pipeline over the stages (no rank holds the whole model): a later stage
    that stops in its part of it is named by the rank waiting for its output, within seconds."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", str(replicas)], mpi=ranks,
             timeout=120, BLL_REF_FAULT=f"{kind}:{rank}:0:eval")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    if kind == "hang":
        who = f"rank {rank} \\(blocks? [\\d-]+(, replica 0)?\\)"
        assert re.search(f"no message from {who} for \\d+ s in the evaluation of epoch 1; it is dead or hung",
                         r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists() and not (out / "state").exists()


@needs_mpi
def test_a_rank_hung_before_the_pipeline_exists_is_named_once_it_stops_beating(tmp_path):
    """Rank 1 hangs at start-up while rank 0 goes on: rank 0 waits for it in a collective call
    (every rank meets before the replicas' Split, which used to wait for ever) and names it from its
    silence."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "1", "--out", str(out), "--replicas", "2"], mpi=2, timeout=120,
             BLL_REF_FAULT="hang:1:0:plan")
    assert r.returncode != 0
    assert fault_seconds(r) < 20
    assert re.search(r"rank 0 \(blocks? [\d-]+, replica 0\): rank 1 \(blocks? [\d-]+, replica 1\) has sent no beat for 8 s at "
                     r"start-up \(waiting for every rank to build its blocks\); it is hung or dead", r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists()


@needs_mpi
def test_replicated_run_resumes_bit_identical_into_another_world_size(sequential, tmp_path):
    """4 ranks (2 stages x 2 replicas) killed in epoch 2; resumed on 2 ranks (1 stage x 2 replicas)
    it ends exactly like the sequential --micro-batches 2 run."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out), "--replicas", "2"], mpi=4, timeout=120,
             BLL_REF_FAULT="kill:2:1:4")
    assert r.returncode != 0 and not (out / "checkpoint.npz").exists()
    assert (out / "state" / "trainer.json").exists()
    r = _cli(["train", "--resume", str(out)], mpi=2, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after epoch 1" in r.stdout and "world: 2 ranks = 1 stage x 2 replicas" in r.stdout
    assert r.stdout.count("final test accuracy") == 1  # rank 0's; the other rank holds only epoch 1's
    _assert_same_run(sequential("mlp", 2), out)
    _assert_same_history(sequential("mlp", 2), out)


@needs_mpi
def test_a_stage_killed_while_rank_0_writes_the_checkpoint_leaves_none_and_the_run_resumes(sequential, tmp_path):
    """Rank 0 writes checkpoint.npz as the stages' arrays arrive: a stage killed half-way ends the
    job with no checkpoint. A resumed run (the state of the last epoch is complete) writes it, and
    removes the temporaries a killed writer leaves (holding the run's lock, nobody else writes)."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "2", "--out", str(out)], mpi=2, timeout=120, BLL_REF_FAULT="kill:1:1:checkpoint")
    assert r.returncode != 0 and "injected fault kill:1:1:checkpoint" in r.stderr, r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists()
    (out / "state" / ".learner0-epoch2.npz.tmp4242").write_bytes(b"half")  # as a killed writer leaves one
    r = _cli(["train", "--resume", str(out)], mpi=2, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after epoch 2" in r.stdout
    assert not list(out.rglob(".*.tmp*"))
    _assert_same_run(sequential("mlp", 1), out)
    _assert_same_history(sequential("mlp", 1), out)


@needs_mpi
def test_a_stage_hung_while_rank_0_writes_the_checkpoint_is_named_and_leaves_no_temporary(tmp_path):
    """Rank 0 names the stage it waits for, and removes its half-written file before it aborts the
    job (an abort does not unwind)."""
    out = tmp_path / "run"
    r = _cli(MLP + ["--epochs", "1", "--out", str(out)], mpi=2, timeout=120, BLL_REF_FAULT="hang:1:0:checkpoint")
    assert r.returncode != 0
    assert fault_seconds(r) < 10
    assert re.search(r"no message from rank 1 \(blocks? [\d-]+\) for \d+ s writing the checkpoint; it is dead or hung",
                     r.stderr), r.stderr[-2000:]
    assert not (out / "checkpoint.npz").exists() and not list(out.rglob(".*.tmp*"))
