"""A training run as a library call: ``TrainConfig`` holds every option once, ``train`` runs it,
``resume`` continues a run directory. The ``bll-ref train`` command only parses its arguments
into a config and prints; the examples, the fine-tuner and the benchmarks use the same calls.

    cfg = TrainConfig(method="bll", sizes="784,256,256,10", epochs=3, out="runs/a").validate()
    result = train(cfg)                    # runs/a: checkpoint.npz, history.json, state/
    result = resume("runs/a", epochs=5)    # two more epochs, the same updates as an unbroken run

A run directory holds the config as it was given (``to_dict``: JSON, with a version) in the
checkpoint's metadata and in ``state/trainer.json``; ``from_dict`` reads it back, also the
options of runs saved before the config existed (the command line's names, ``width`` for
``channels``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from . import data, models, runstate
from .backend import resolve_device
from .fileio import check_output, creatable_dir_problem
from .layers.base import SkipDraws
from .runlock import RunLock
from .memory import check_fits
from .methods import BLL_OPTIONS, check_options, make
from .loop import Diverged, fit
from .parallel import SCHEDULE_OPTIONS, SCHEDULES, make_schedule, resolve_micro_batches, start_up_beats, unread_data

__all__ = ["TrainConfig", "TrainResult", "train", "resume", "RESUMABLE", "CONFIG_VERSION"]

CONFIG_VERSION = 2
#: what ``resume`` may change: the schedule gives the same updates whichever it is, the device
#: only moves them, and more epochs extend the run
RESUMABLE = frozenset({"epochs", "parallel", "workers", "blas_threads", "device", "replicas"})
# BLL's keywords that the config holds under the same name (the others: no_anneal, no_head,
# no_kernels, eq8_terms as text, n_classes fixed by the data)
_BLL_KEYS = tuple(k for k in BLL_OPTIONS if k not in ("n_classes", "anneal", "head", "eq8_terms", "use_kernels"))
_MLP_DEFAULT = "784,1024,1024,1024,10"


@dataclass
class TrainConfig:
    """Every option of a training run (the ``bll-ref train`` options, same names and defaults).

    None means "not given": the method's own default applies, and an option that does not apply
    to the chosen model or BLL variant is an error only when given. ``channels`` is the base
    channel count of ``model="resnet18"`` (16; 64 is the paper's ResNet-18)."""

    method: str = "bll"
    model: str = "mlp"
    sizes: str = _MLP_DEFAULT
    activation: str = "leaky_relu"
    channels: int | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float | None = None
    seed: int = 0
    dtype: str = "float32"
    data: str = "auto"
    limit_train: int | None = None
    limit_test: int | None = None
    out: str | None = None
    device: str = "cpu"
    parallel: str = "none"
    workers: int | None = None
    blas_threads: int = 1
    micro_batches: int = 1  # >1: each batch in slices, gradients summed in slice order (docs/parallel.md)
    replicas: int | None = None  # MPI ranks per pipeline stage (divides micro_batches)
    variational: str | None = None
    feedback: str | None = None
    var_weight: float | None = None
    tau: float | None = None
    m: float | None = None
    no_anneal: bool = False
    no_head: bool = False
    head_weight: float | None = None
    eq8_terms: str | None = None
    span: int | None = None
    l2: float | None = None
    feedback_decay: float | None = None
    feedback_lr: float | None = None
    no_kernels: bool = False

    # --- plain data -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict of every option plus ``config_version``."""
        return {**dataclasses.asdict(self), "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, d, where="options") -> "TrainConfig":
        """The config of a stored dict: this version's, or the command-line options a run saved
        before the config existed (``width`` is ``channels`` there; ``resume`` is dropped)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: the training options must be an object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("config_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > CONFIG_VERSION:
            raise ValueError(f"{where}: config_version {version!r} is not one this bll_ref reads "
                             f"(1..{CONFIG_VERSION}); upgrade bll_ref")
        d.pop("resume", None)
        if "width" in d:
            d.setdefault("channels", d.pop("width"))
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown training option(s) {unknown[:4]}")
        return cls(**d)

    # --- checks -----------------------------------------------------------------------------------
    def validate(self, given=None) -> "TrainConfig":
        """Check every option before anything is built, loaded or created; returns self with
        ``device`` resolved ('auto' -> 'cpu' or 'cuda'). ``given``: the options the user named
        (the CLI knows); None takes every option that differs from its default as given."""
        given = self._given() if given is None else set(given)
        for name in ("epochs", "batch_size", "limit_train", "limit_test", "workers", "blas_threads", "micro_batches",
                     "replicas"):
            _count(name, getattr(self, name))
        _count("seed", self.seed, 0)
        _choice("method", self.method, ("bp", "fa", "bll"))
        _choice("model", self.model, ("mlp", "cnn", "resnet", "resnet18"))
        _choice("dtype", self.dtype, ("float32", "float64"))
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        _choice("parallel", self.parallel, SCHEDULES)
        _choice("data", self.data, ("auto", "fashion-mnist", "synthetic"))
        if self.model == "mlp":
            models.parse_sizes(self.sizes, self.dtype)
        self._refuse_inapplicable(given)
        self._check_method_options()
        if self.channels is not None:
            if self.channels < 1:
                raise ValueError(f"--channels must be >= 1 (base channels), got {self.channels}")
            n, acts = models.resnet18_size(self.channels)
            # parameters, gradients, two optimiser moments; one batch of convolution outputs (a lower bound)
            check_fits((4 * n + self.batch_size * acts) * np.dtype(self.dtype).itemsize,
                                  f"--model resnet18 --channels {self.channels} ({n:,} parameters, "
                                  f"batch {self.batch_size})")
        _number("lr", self.lr, low=0, low_open=True, dtype=self.dtype)
        _number("momentum", self.momentum, low=0, high=1, high_open=True)
        _number("feedback-lr", self.feedback_lr, low=0, low_open=True, dtype=self.dtype)
        _number("m", self.m, low=0, high=1)
        _number("feedback-decay", self.feedback_decay, low=0, high=1)
        for name in ("var_weight", "tau", "head_weight", "l2"):
            _number(name.replace("_", "-"), getattr(self, name), low=0, dtype=self.dtype)
        self.device = resolve_device(self.device)  # DeviceError (a ValueError) before any work
        if self.parallel == "streams" and self.device != "cuda":
            raise ValueError("--parallel streams runs each block on its own CUDA stream; it needs --device cuda")
        if self.parallel in ("threads", "mpi") and self.device != "cpu":
            raise ValueError(f"--parallel {self.parallel} runs on CPU cores; with --device cuda use --parallel "
                             "streams (one CUDA stream per block) or none")
        if self.parallel == "none" and self.workers not in (None, 1):
            raise ValueError("--workers needs --parallel threads or mpi")
        self.micro_batches = resolve_micro_batches(self, given)
        return self

    def _given(self):
        defaults = TrainConfig()
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}

    def _refuse_inapplicable(self, given):
        """Options of the MLP with an image model, and --channels with anything but resnet18, are
        errors, as the BLL options that do not apply are (the image models use ReLU, so
        ``activation="relu"`` states what they do and is accepted)."""
        if self.channels is not None and self.model != "resnet18":
            raise ValueError(f"--channels applies to --model resnet18 only, not {self.model!r}; leave it out")
        if self.model == "mlp":
            return
        bad = ["--sizes"] if "sizes" in given else []
        if "activation" in given and self.activation != "relu":
            bad.append(f"--activation {self.activation}")
        if bad:
            raise ValueError(f"{' and '.join(bad)} appl{'y' if len(bad) > 1 else 'ies'} to --model mlp only, "
                             f"not {self.model!r} (its layers are fixed, with ReLU); leave "
                             f"{'them' if len(bad) > 1 else 'it'} out")

    def _check_method_options(self):
        """The BLL options against the chosen method and variant, before anything is built: BP and
        FA take none; BLL refuses those its variational term and feedback source do not declare."""
        bll = {k: v for k, v in self.method_options().items() if k in BLL_OPTIONS and k != "n_classes"}
        if self.method != "bll":
            named = {"anneal": "--no-anneal", "head": "--no-head", "use_kernels": "--no-kernels"}
            given = sorted(named.get(k, "--" + k.replace("_", "-")) for k in bll)
            if given:
                raise ValueError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --method bll only, "
                                 f"not {self.method!r}; leave {'them' if len(given) > 1 else 'it'} out")
            return
        bll.pop("use_kernels", None)
        check_options(**bll)

    # --- what the run is made of ------------------------------------------------------------------
    def method_options(self) -> dict:
        """The keywords of ``bll_ref.methods.make`` (only the options given)."""
        opts = {"optimizer": self.optimizer, "lr": self.lr}
        if self.momentum is not None:
            opts["momentum"] = self.momentum
        bll = {k: getattr(self, k) for k in _BLL_KEYS if getattr(self, k) is not None}
        if self.eq8_terms is not None:
            bll["eq8_terms"] = tuple(self.eq8_terms.split(","))
        if self.no_anneal:
            bll["anneal"] = False
        if self.no_head:
            bll["head"] = False
        if self.no_kernels:
            bll["use_kernels"] = False
        if self.method == "bll":
            bll["n_classes"] = 10
        return {**opts, **bll}

    def build_model(self, rng=None):
        """(blocks, images): the blocks with the run's initial weights (from ``rng``, default the seed; a
        ``SkipDraws``: zeros until drawn); whether it takes images (N, 1, 28, 28) rather than vectors."""
        dtype, rng = np.dtype(self.dtype), self.seed if rng is None else rng
        if self.model == "mlp":
            sizes = models.parse_sizes(self.sizes, dtype)
            return models.mlp(sizes, activation_name=self.activation, rng=rng, dtype=dtype), False
        kw = {"width": self.channels} if self.channels is not None else {}
        return models.build(self.model, rng=rng, dtype=dtype, **kw), self.model in models.IMAGE_MODELS

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", f"{self.method}-{self.model}-seed{self.seed}")

    def stored(self) -> dict:
        """``to_dict`` with the run directory as its own name, not this machine's path (the same
        run gives the same checkpoint bytes wherever it ran)."""
        d = self.to_dict()
        if d.get("out"):
            d["out"] = os.path.basename(os.path.normpath(os.path.abspath(d["out"])))
        return d


@dataclass
class TrainResult:
    """What ``train`` and ``resume`` return: the history, the trained method (on its device; on an MPI rank
    only its stage), the run directory, the data source used, and whether this process wrote the run."""
    history: dict
    method: object
    out: str
    source: str
    wrote: bool = True

    @property
    def test_acc(self) -> float:
        return self.history["test_acc"][-1]


# ------------------------------------------------------------------------------------ the run
def train(config, *, log=print, resuming=False, given=None) -> TrainResult:
    """Run ``config`` (validated here) into its run directory: checkpoint.npz (host arrays,
    whatever the device), history.json, state/. Holds an exclusive lock on the directory for the
    run; leaves no empty directory behind when it fails. ``resuming``: continue from state/
    (use :func:`resume`). Under ``parallel="mpi"`` every rank calls it; rank 0 writes."""
    config.validate(given)
    with RunLock() as lock:
        return _run(config, lock, log, resuming)


def _run(cfg, lock, log, resuming):
    beats = start_up_beats() if cfg.parallel == "mpi" else None  # a hung rank is named at start-up too
    rank = beats.rank if beats else 0
    out = cfg.run_dir()
    if rank == 0:
        _check_writable(out, create=False)  # before loading data; created only once all checks pass
        _check_run_outputs(out)
        if os.path.isdir(out):
            lock.acquire(out)
    log = log if rank == 0 else None
    draws = (SkipDraws(cfg.seed), SkipDraws(cfg.seed)) if cfg.parallel == "mpi" else None  # parallel.shard.draw_own
    blocks, images = cfg.build_model(draws[0] if draws else None)
    d, source = data.load(cfg.data, images=images, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                          log=log, skip=unread_data(rank, cfg.replicas) if cfg.parallel == "mpi" else ())
    d = data.as_float(d, np.float64) if cfg.dtype == "float64" else d
    method = make(cfg.method, blocks, sample_input=np.ascontiguousarray(d["x_train"][:8]),
                  rng=draws[1] if draws else cfg.seed, **cfg.method_options())
    if cfg.device != "cpu":
        method.to(cfg.device)  # built on the host (same initial weights as a CPU run), then moved
    schedule = make_schedule(method, d, log=log, draws=draws, beats=beats,
                             **{k: getattr(cfg, k) for k in SCHEDULE_OPTIONS})
    created = not os.path.exists(out)
    if rank == 0:
        _check_writable(out)
        lock.acquire(out)
    if log:
        log(f"training {cfg.method} on {cfg.model} for {cfg.epochs} epochs "
            f"(schedule {schedule.name}, {schedule.workers} worker{'s' * (schedule.workers > 1)}) -> {out}")
    options = cfg.stored()
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # fit reports divergence
            hist = fit(method, d, epochs=cfg.epochs, batch_size=cfg.batch_size, rng=cfg.seed,
                       log=print if (rank == 0 or schedule.name == "mpi" and schedule.last) else None,
                       history_path=os.path.join(out, "history.json") if rank == 0 else None,
                       state_dir=os.path.join(out, "state"),  # every rank resumes from it; rank 0 writes
                       resume=resuming, options=options, schedule=schedule)
        meta = dict(method=cfg.method, model=cfg.model, data=source, options=options, test_acc=hist["test_acc"])
        schedule.write_checkpoint(os.path.join(out, "checkpoint.npz"), method, meta)  # MPI: rank 0, from every stage
        schedule.finish()  # under MPI the others wait for rank 0's "done" (a hung rank 0 is named)
    except BaseException as e:
        if schedule.name == "mpi" and isinstance(e, Exception):
            schedule.abort(e)
        lock.release()
        if rank == 0 and created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # nothing of the run was kept: leave no empty directory behind
        if isinstance(e, Diverged):
            raise Diverged(f"{e}; no checkpoint written") from None
        raise
    return TrainResult(hist, method, out, source, wrote=schedule.is_root)


def resume(run_dir, *, log=print, given=None, **changes) -> TrainResult:
    """Continue ``run_dir`` from its last complete epoch with its own options; only ``RESUMABLE``
    options may change (``epochs`` to at least the epochs done). An option in ``changes`` with
    another value than the run's is an error naming it, not silently ignored. ``given``: the
    names the user gave (the CLI), to refuse even a change to a default value."""
    t = runstate.read_trainer(os.path.join(run_dir, "state"))
    cfg = TrainConfig.from_dict(t.get("options") or {}, where=os.path.join(run_dir, "state", "trainer.json"))
    changed = [k for k in sorted(set(changes) - RESUMABLE - {"out"}) if getattr(cfg, k, object()) != changes[k]]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {changes[k]!r} (the run has {getattr(cfg, k)!r})"
                          for k in changed[:3])
        raise ValueError(f"--resume continues {run_dir} with its own options; {shown} would change the run: "
                         "leave them out, or start a new run with another --out (only --epochs, --parallel, "
                         "--workers, --replicas, --blas-threads and --device may change)")
    if changes.get("out") is not None and os.path.abspath(changes["out"]) != os.path.abspath(run_dir):
        raise ValueError(f"--out {changes['out']} with --resume {run_dir}: a resumed run writes to its own "
                         "directory; leave --out out (or copy the run directory first)")
    for k in RESUMABLE:
        if changes.get(k) is not None:
            setattr(cfg, k, changes[k])
    cfg.replicas = cfg.replicas if cfg.parallel == "mpi" else None  # resumed elsewhere: the same slices, no replicas
    cfg.out = run_dir
    if isinstance(cfg.epochs, int) and cfg.epochs < t["epoch"]:
        raise ValueError(f"--epochs {cfg.epochs}: {run_dir} has already completed {t['epoch']} epochs "
                         f"(resuming would rewrite its checkpoint as epoch {cfg.epochs}); give --epochs >= "
                         f"{t['epoch']} or leave it out")
    return train(cfg, log=log, resuming=True, given=set(cfg._given()) | set(given or ()))


# ------------------------------------------------------------------------------------ checks
def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def _number(name, value, *, low=None, high=None, low_open=False, high_open=False, dtype=None):
    """A finite float option within its range (and representable in the training dtype)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number, got {value}")
    if dtype is not None and abs(value) > float(np.finfo(dtype).max):
        raise ValueError(f"--{name} {value:g} does not fit in {dtype} (max {np.finfo(dtype).max:.3g})")
    if low is not None and (value < low or low_open and value == low):
        raise ValueError(f"--{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or high_open and value == high):
        raise ValueError(f"--{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")


def _count(name, value, low=1):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _check_writable(out, create=True):
    """Fail now, not after training, when the run directory cannot be written. ``create=False``:
    only look (the nearest existing ancestor must be a writable directory), creating nothing."""
    if not create:
        problem = creatable_dir_problem(out)
        if problem:
            raise ValueError(f"cannot write the run directory {out}: {problem}")
        return
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write the run directory {out}: {e.strerror or e}") from None


def _check_run_outputs(out):
    """The run's fixed output files, where present, must be regular files (before any work)."""
    state = os.path.join(out, "state")
    if os.path.lexists(state) and not os.path.isdir(state):  # found only after an epoch otherwise
        raise ValueError(f"{state} is in the way: the run keeps its resumable state in that directory; "
                         "remove or rename it, or give another --out")
    for name in ("checkpoint.npz", "history.json", os.path.join("state", "trainer.json")):
        if os.path.lexists(os.path.join(out, name)):
            check_output(os.path.join(out, name))
