"""The training loop: ``fit`` trains any method (BP, FA, BLL) for some epochs on a schedule
(sequential, threads, MPI, CUDA streams), with progress lines, evaluation after every epoch,
divergence checks, history.json and the resumable state written after every epoch.
"""
from __future__ import annotations

import time

import numpy as np

from . import backend, runstate
from .data import batches
from .fileio import write_json_atomic
from .methods.common import accuracy, topk_accuracy
from .parallel import SequentialSchedule, blas_threads, fault_point

__all__ = ["fit", "Diverged", "TIMING_FIELDS", "LOSS_RISE", "MAX_PARAM"]


class Diverged(FloatingPointError):
    """Training produced a non-finite loss or parameters; the message names epoch, step and block."""


# history fields that hold wall-clock measurements: the only ones that differ between two runs with
# the same seed, data and options (everything else in history.json is bit-identical)
TIMING_FIELDS = ("epoch_seconds", "samples_per_s")


def _finite_params(layers) -> bool:
    return all(bool(backend.array_module(v).isfinite(v).all()) for layer in layers for v in layer.params.values())


def _finite_state(method) -> bool:
    """Parameters of every block and the auxiliary arrays a checkpoint keeps (heads, feedback)."""
    return _finite_params(method.model.layers) and all(np.isfinite(v).all() for v in method.aux_state().values())


# Divergence that stays finite (tanh saturating at --lr 1e6 --optimizer sgd trained to a loss of 2e6
# and exit 0): the loss rising this many times above the run's first step (|loss|, at least 1), or a
# parameter beyond MAX_PARAM. A healthy run's loss falls; no trained layer of ours nears 1e8.
LOSS_RISE, MAX_PARAM = 1e4, 1e8


def _largest_param(layers) -> float:
    return max((float(backend.array_module(v).abs(v).max()) for layer in layers for v in layer.params.values()
                if v.size), default=0.0)


def _finite_loss(learner) -> bool:
    """One scalar per BLL block: the sum of its running local-loss statistics."""
    return bool(np.isfinite(float(sum(learner.stats.values()))))


class _DeviceLosses:
    """Per-step losses that may be GPU scalars: kept on the device and fetched in one transfer
    every ``every`` steps (a host read per step would make the CPU wait for the GPU every step)."""

    def __init__(self):
        self.pending = []

    def add(self, loss):
        self.pending.append(loss)

    def flush(self) -> list:
        if not self.pending:
            return []
        if backend.is_device_array(self.pending[0]):
            xp = backend.array_module(self.pending[0])
            out = [float(v) for v in xp.stack([xp.asarray(l).reshape(()) for l in self.pending]).get()]
        else:
            out = [float(l) for l in self.pending]
        self.pending = []
        return out


def _bad_block(method):
    """1-based index of the first block whose running local loss or parameters are non-finite."""
    for k, learner in enumerate(getattr(method, "learners", ())):
        if not _finite_loss(learner):
            return k + 1
    for k, block in enumerate(method.model.layers):
        if not _finite_params([block]):
            return k + 1
    return None


def _check_state(method, epoch, steps):
    """Diverged unless every parameter, head and feedback weight is finite and below MAX_PARAM."""
    if not _finite_state(method):
        raise _diverged(method, epoch, steps, "parameters became NaN or inf")
    big = _largest_param(method.model.layers)
    if big > MAX_PARAM:
        raise _diverged(method, epoch, steps, f"a parameter reached |w| = {big:.3g} (weights exploding, "
                        f"more than {MAX_PARAM:.0e})", finite=True)


def _diverged(method, epoch, step, what, finite=False):
    """``finite``: nothing is NaN or inf; the block named is the one holding the largest weight."""
    k = _bad_block(method)
    if k is None and finite:
        sizes = [_largest_param([b]) for b in method.model.layers]
        k = 1 + int(np.argmax(sizes)) if sizes else None
    where = f"epoch {epoch}, step {step}" + (f", block {k}" if k else "")
    return Diverged(f"training diverged at {where}: {what}; lower the learning rate (--lr) "
                    "or check the inputs")


def fit(method, data, *, epochs, batch_size=128, rng=0, log=print, history_path=None,
        eval_batch=1000, diag_samples=2000, schedule=None, state_dir=None, resume=False, options=None,
        train_eval=5000, eval_name="test"):
    """Train ``method`` on ``data`` (dict x_train, y_train, x_test, y_test) for ``epochs``.

    Prints a progress line ~10 times per epoch (epoch, step, loss, samples/s) and the test
    accuracy after every epoch. Returns the history dict (also written to ``history_path``
    atomically after every epoch, so an interrupted run keeps what it finished).

    Per epoch the history records test top-1 (``test_acc``) and top-3 (``test_top3``) accuracy
    and ``train_acc``: top-1 in eval mode on a fixed subset, the first ``train_eval`` training
    examples (``train_eval_samples``; 0 skips it: None), evaluated after the epoch's updates, not the
    running accuracy of the training batches (paper 001 Table 1 reports test-1, test-3, train-1).

    schedule : a ``bll_ref.parallel`` schedule (default: the sequential loop); only its root
        process evaluates, logs epoch results and writes files.
    eval_name : what the progress line calls ``x_test`` (``"val"`` when it holds held-out
        training images; the history keys stay ``test_*``).
    state_dir : write the resumable state there after every epoch (``bll_ref.runstate``);
        ``resume=True`` first loads the last complete epoch from it and continues, making the
        same updates as an uninterrupted run. ``options`` are stored with the state.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    schedule = schedule or SequentialSchedule()
    gen = np.random.default_rng(rng)
    x, y = data["x_train"], data["y_train"]
    steps = (len(x) + batch_size - 1) // batch_size
    every = max(1, steps // 10)
    history = {"method": method.name, "schedule": schedule.name, "workers": schedule.workers,
               "n_train": len(x), "batch_size": batch_size, "epochs": [], "test_acc": [],
               "train_loss": [], "epoch_seconds": [], "samples_per_s": [], "diagnostics": []}
    start = 0
    if resume:
        t = runstate.load(state_dir, method)
        start, history = t["epoch"], t["history"]
        gen.bit_generator.state = t["rng"]
        history.update(schedule=schedule.name, workers=schedule.workers)
        if log and schedule.is_root:
            log(f"resuming after epoch {start} from {state_dir}")
    history["timing_fields"] = list(TIMING_FIELDS)
    first = []  # the run's first step loss: the yardstick of LOSS_RISE
    for epoch in range(start, epochs):
        method.on_epoch_start(epoch)
        t0 = time.perf_counter()
        recent, pending = [], _DeviceLosses()
        on_gpu = method.device != "cpu"

        def on_step(step, loss):
            # divergence check per step: one scalar per block (the loss; BLL: each block's running
            # local loss sum), never a scan of the parameters. On a GPU every ``every`` steps.
            pending.add(loss)
            if on_gpu and not (step % every == 0 or step == steps):
                return
            for i, value in enumerate(pending.flush()):
                recent.append(value)
                if not np.isfinite(value):
                    raise _diverged(method, epoch + 1, len(recent), f"the loss became {value}")
                if not first:
                    first.append(value)
                elif abs(value) > LOSS_RISE * max(abs(first[0]), 1.0):
                    raise _diverged(method, epoch + 1, len(recent), f"the loss rose from {first[0]:.4g} to "
                                    f"{value:.4g} (more than {LOSS_RISE:.0e} times)", finite=True)
            if not all(_finite_loss(l) for l in getattr(method, "learners", ())):
                raise _diverged(method, epoch + 1, step, f"the loss became {recent[-1]}")
            if log and (step % every == 0 or step == steps):
                dt = time.perf_counter() - t0
                done = min(step * batch_size, len(x))  # the last batch may be short
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {np.mean(recent[-every:]):.4f} "
                    f"{done / dt:,.0f} samples/s")

        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # found by the checks
                losses = schedule.run_epoch(method, batches(x, y, batch_size, rng=gen), on_step)
            losses = recent[-len(losses):] if on_gpu else losses  # the host values of the same losses
        except (ValueError, FloatingPointError) as e:
            if isinstance(e, Diverged) or _bad_block(method) is None:
                raise
            raise _diverged(method, epoch + 1, len(recent) + 1,
                            "parameters became NaN or inf") from None
        seconds = time.perf_counter() - t0
        schedule.gather(method)
        if not schedule.evaluates:  # an MPI replica past the first: its stage's replica 0 holds the state
            continue
        _check_state(method, epoch + 1, steps)  # once per epoch, before anything is saved (an MPI rank: its blocks)
        # other processes wait for the root to finish the epoch (or the run): it beats after every piece of work
        beat = schedule.beat
        fault_point(schedule.rank, epoch, "eval")
        n_te = min(int(train_eval), len(x))
        with blas_threads(getattr(schedule, "blas", None)):  # as many as training: every schedule, same bits
            logits = schedule.predict(method, data["x_test"], eval_batch, on_chunk=beat)
            train_logits = schedule.predict(method, x[:n_te], eval_batch, on_chunk=beat) if n_te > 0 else None
            diag = schedule.diagnostics(method, data["x_test"][:diag_samples], data["y_test"][:diag_samples])
        if not schedule.is_root:  # an MPI rank: rank 0 writes its learners' state
            if state_dir:
                schedule.send_state(method)
            continue
        acc = accuracy(logits, data["y_test"])
        top3 = topk_accuracy(logits, data["y_test"], min(3, logits.shape[-1]))
        train_acc = accuracy(train_logits, y[:n_te]) if n_te > 0 else None
        beat()
        history["epochs"].append(epoch + 1)
        history["test_acc"].append(acc)
        for key, v in (("test_top3", top3), ("train_acc", train_acc)):
            history.setdefault(key, []).append(v)  # setdefault: a resumed run of an older version
        history["train_eval_samples"] = n_te
        history["train_loss"].append(float(np.mean(losses)))
        history.setdefault("step_losses", []).append([float(v) for v in losses])  # per step, for comparisons
        history["epoch_seconds"].append(seconds)
        history["samples_per_s"].append(len(x) / seconds)
        history["diagnostics"].append(diag)
        if log:
            log(f"epoch {epoch + 1}/{epochs} done in {seconds:.1f}s: train loss {np.mean(losses):.4f}, "
                f"{eval_name} accuracy {100 * acc:.2f}%")
        if history_path:
            write_json_atomic(history_path, history)
            beat()
        if state_dir:
            runstate.save(state_dir, method, epoch + 1, gen.bit_generator.state, history, options, on_file=beat,
                          parts=schedule.state_parts(method))
    return history
