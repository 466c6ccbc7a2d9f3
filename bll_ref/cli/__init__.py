"""``bll-ref`` command line: train / eval / demo / report (and export / verify / nir / c-header,
see exporters/).

Exit codes: 0 success; 1 a verified mismatch (verify, c-header --compile); 2 bad input or
environment (one line on stderr naming the problem; never a traceback for a user mistake);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); temporary files are removed either way;
141 (SIGPIPE's status, nothing printed) when the reader of stdout went away (``bll-ref verify F | head``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from . import __version__, checkpoint, data, models
from .backend import DEVICES, device_info, resolve_device
from .fileio import RunLock, check_output, raise_if_signalled, sigterm_as_exit
from .methods.common import evaluate
from .parallel import SCHEDULES, SequentialSchedule, WorkerError


def load_data(args, image_shape, log=print):
    """The data policy of ``bll_ref.data.load`` for parsed options (--data, --limit-*); says which."""
    return data.load(getattr(args, "data", "auto"), images=bool(image_shape), limit_train=args.limit_train,
                     limit_test=args.limit_test, log=log)


def _build_model(args):
    dtype = np.dtype(args.dtype)
    if args.model == "mlp":
        sizes = _mlp_sizes(args.sizes, dtype)
        return models.mlp(sizes, activation_name=args.activation, rng=args.seed, dtype=dtype), False
    width = getattr(args, "width", None)  # runs saved before --width existed resume without it
    if width is not None and args.model != "resnet18":
        raise ValueError(f"--width applies to --model resnet18 only, not {args.model!r}; leave it out")
    if width is not None and width < 1:
        raise ValueError(f"--width must be >= 1 (base channels), got {width}")
    kw = {"width": width} if width is not None else {}
    return models.build(args.model, rng=args.seed, dtype=dtype, **kw), True


_DATA_HELP = ("auto: Fashion-MNIST from $BLL_DATA (an error if incomplete) or /usr/share/datasets/fashion-mnist "
              "when present, else the synthetic stand-in (said in the log); fashion-mnist: required; "
              "synthetic: the synthetic task")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already states the default or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in h:
            return h
        return super()._get_help_string(action)


# BLL options of `train` -> BLL keywords; None (not given) leaves the library default.
_BLL_ARGS = ("variational", "feedback", "var_weight", "tau", "m", "head_weight", "span", "l2",
             "feedback_decay", "feedback_lr")


def method_options(args) -> dict:
    """The keywords for ``bll_ref.methods.make`` from parsed ``train`` options (only those given)."""
    opts = {"optimizer": args.optimizer, "lr": args.lr}
    if args.momentum is not None:
        opts["momentum"] = args.momentum
    bll = {k: getattr(args, k) for k in _BLL_ARGS if getattr(args, k) is not None}
    if args.eq8_terms is not None:
        bll["eq8_terms"] = tuple(args.eq8_terms.split(","))
    if args.no_anneal:
        bll["anneal"] = False
    if args.no_head:
        bll["head"] = False
    if args.no_kernels:
        bll["use_kernels"] = False
    if args.method == "bll":
        bll["n_classes"] = 10
    return {**opts, **bll}


def _add_train_options(p):
    p.add_argument("--method", choices=("bp", "fa", "bll"), default="bll",
                   help="training rule: backprop, feedback alignment or block-local learning")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet", "resnet18"), default="mlp",
                   help="network: mlp (layer widths from --sizes) or an image model on 1x28x28 inputs")
    p.add_argument("--width", type=int, default=None, help="resnet18: base channels (default 16; 64 = ResNet-18)")
    p.add_argument("--sizes", default="784,1024,1024,1024,10", help="MLP layer widths in units, input first, classes last")
    p.add_argument("--activation", default="leaky_relu", choices=("relu", "leaky_relu", "sigmoid", "tanh"),
                   help="MLP hidden-layer activation")
    p.add_argument("--epochs", type=int, default=None, help="epochs in all (default 10; with --resume: "
                   "the resumed run's total unless given)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (step size, > 0) of every block")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="parameter update rule")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum in [0, 1) (every method; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed (int >= 0) of the initial weights and batch order")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float type of parameters and activations")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto", help=_DATA_HELP)
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    p.add_argument("--out", default=None, help="run directory (checkpoint.npz, history.json, state/); "
                   "default runs/METHOD-MODEL-seedSEED")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where to train: cpu (NumPy), cuda (CuPy + numba.cuda, the [cuda] extra), auto (the GPU "
                        "when one works); checkpoints are host arrays either way")
    g = p.add_argument_group("parallel training and resume (BLL, span 1, closed or trained feedback)")
    g.add_argument("--parallel", choices=SCHEDULES, default="none",
                   help="none: one loop; threads: one thread per group of blocks; mpi: one rank per group "
                        "(launch with mpiexec -n K python -m mpi4py -m bll_ref.cli train --parallel mpi)")
    g.add_argument("--workers", type=int, default=None,
                   help="threads: number of worker threads (default 2); mpi: must equal the number of ranks")
    g.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads per worker (default 1: every schedule then makes the same updates, "
                        "bit for bit; more can be faster for --parallel none on an idle machine)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from its last complete epoch with its own options")
    g = p.add_argument_group("BLL options (an option that does not apply to the chosen variant is an error)")
    g.add_argument("--variational", default=None, choices=("gauss_ln", "gauss", "eq8", "bernoulli_kl", "none", "sim"),
                   help="local variational loss; default gauss_ln; sim: Pred-Sim (Nokland & Eidnes 2019) similarity loss")
    g.add_argument("--feedback", default=None, choices=("closed", "trained", "twin"), help="feedback network giving each block its message b; default closed")
    g.add_argument("--var-weight", type=float, default=None, help="weight of the variational term (factor); default 1 (sim: 99)")
    g.add_argument("--tau", type=float, default=None, help="mixing m = 1/(1 + tau epoch) (per epoch, >= 0), default 2")
    g.add_argument("--m", type=float, default=None, help="constant mixing m in [0, 1] (instead of --tau; default: the --tau schedule)")
    g.add_argument("--no-anneal", action="store_true", help="Gaussian terms: do not weight by m")
    g.add_argument("--no-head", action="store_true", help="disable the local predictive head")
    g.add_argument("--head-weight", type=float, default=None, help="weight of the local head's loss (factor, >= 0); default 1")
    g.add_argument("--eq8-terms", default=None, help="eq8 only: forward,posterior (default both)")
    g.add_argument("--span", type=int, choices=(1, 2), default=None,
                   help="blocks a local gradient reaches (2: also into the block below); default 1")
    g.add_argument("--l2", type=float, default=None, help="closed feedback: ridge strength (>= 0), default 1")
    g.add_argument("--feedback-decay", type=float, default=None, help="closed feedback: running-statistics decay per step in [0, 1] (default: none, plain sums)")
    g.add_argument("--feedback-lr", type=float, default=None, help="trained/twin feedback: learning rate (> 0), default 1e-3")
    g.add_argument("--no-kernels", action="store_true", help="NumPy reference losses instead of Numba")


# train options a resumed run takes from its state (the rest may change: the schedule gives the
# same updates whichever it is, and --epochs may extend the run)
_RESUME_KEEPS_NEW = {"epochs", "parallel", "workers", "blas_threads", "resume", "device"}
# train options added after runs were saved without them: absent there means "not given"
_ADDED_OPTIONS = {"width": None}


def _resume_args(args):
    """args of the run in ``args.resume`` (its stored options), with this call's schedule/epochs."""
    from . import runstate
    t = runstate.read_trainer(os.path.join(args.resume, "state"))
    stored = {**_ADDED_OPTIONS, **(t.get("options") or {})}
    missing = sorted(set(vars(args)) - set(stored) - _RESUME_KEEPS_NEW - {"func", "command", "_given"})
    if missing:
        raise ValueError(f"{args.resume}: saved options lack {missing[:4]}; cannot resume this run")
    _refuse_changes(args, stored)
    merged = {**stored, **{k: getattr(args, k) for k in _RESUME_KEEPS_NEW}}
    merged["out"] = args.resume
    if merged["epochs"] is None:
        merged["epochs"] = stored.get("epochs")
    if _is_int(merged["epochs"]) and merged["epochs"] < t["epoch"]:
        raise ValueError(f"--epochs {merged['epochs']}: {args.resume} has already completed {t['epoch']} epochs "
                         f"(resuming would rewrite its checkpoint as epoch {merged['epochs']}); give --epochs >= "
                         f"{t['epoch']} or leave it out")
    return argparse.Namespace(**{**vars(args), **merged})


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _refuse_changes(args, stored):
    """--resume continues a run with its own options: one given on the command line with another
    value than the run's (--lr, --sizes, --method, --out, ...) is an error, not silently ignored.
    Only ``_RESUME_KEEPS_NEW`` (epochs, schedule, device) may change."""
    given = getattr(args, "_given", set())
    if "out" in given and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise ValueError(f"--out {args.out} with --resume {args.resume}: a resumed run writes to its own "
                         "directory; leave --out out (or copy the run directory first)")
    changed = [k for k in sorted(given - _RESUME_KEEPS_NEW - {"out"}) if k in stored and stored[k] != getattr(args, k)]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {stored[k]!r})"
                          for k in changed[:3])
        raise ValueError(f"--resume continues {args.resume} with its own options; {shown} would change the run: "
                         "leave them out, or start a new run with another --out (only --epochs, --parallel, "
                         "--workers, --blas-threads and --device may change)")


def _given_train_options(argv):
    """The dests of the ``train`` options given on the command line (not filled in as defaults)."""
    argv = list(argv)
    if "train" not in argv:
        return set()
    p = argparse.ArgumentParser(add_help=False)
    _add_train_options(p)
    unset = object()  # not a string: argparse would run a string default through the option's type
    p.set_defaults(**{a.dest: unset for a in p._actions})
    ns, _ = p.parse_known_args(argv[argv.index("train") + 1:])
    return {k for k, v in vars(ns).items() if v is not unset}


def _inapplicable(args):
    """Options of the MLP given with an image model are errors, as the BLL options are. The image
    models use ReLU, so ``--activation relu`` states what they do and is accepted."""
    given = getattr(args, "_given", set())
    if args.model == "mlp":
        return
    bad = [f"--{k}" for k in ("sizes",) if k in given]
    if "activation" in given and args.activation != "relu":
        bad.append(f"--activation {args.activation}")
    if bad:
        raise ValueError(f"{' and '.join(bad)} appl{'y' if len(bad) > 1 else 'ies'} to --model mlp only, "
                         f"not {args.model!r} (its layers are fixed, with ReLU); leave "
                         f"{'them' if len(bad) > 1 else 'it'} out")


def _number(name, value, *, low=None, high=None, low_open=False, high_open=False, dtype=None):
    """A finite float option within its range (and representable in the training dtype)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number, got {value}")
    if dtype is not None and abs(value) > float(np.finfo(dtype).max):
        raise ValueError(f"--{name} {value:g} does not fit in {dtype} (max {np.finfo(dtype).max:.3g})")
    if low is not None and (value < low or low_open and value == low):
        raise ValueError(f"--{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or high_open and value == high):
        raise ValueError(f"--{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")


def _count(name, value, low=1):
    if value is not None and value < low:
        raise ValueError(f"--{name} must be >= {low}, got {value}")


def _mlp_sizes(text, dtype):
    """--sizes "784,256,10" -> (784, 256, 10), refused before allocation when they cannot fit."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"--sizes needs at least two widths, each >= 1, got {text!r}")
    if sizes[0] != 784 or sizes[-1] != 10:
        raise ValueError(f"--sizes must start with 784 (28x28 input pixels) and end with 10 (classes), "
                         f"got {text!r}")
    n = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    # parameters, gradients and two optimiser moments per weight
    checkpoint.check_fits(4 * n * np.dtype(dtype).itemsize, f"--sizes {text} ({n:,} parameters)")
    return sizes


def validate_train(args):
    """Every ``train`` option checked before anything is built, loaded or created on disk."""
    for name in ("epochs", "batch_size", "limit_train", "limit_test", "workers", "blas_threads"):
        _count(name.replace("_", "-"), getattr(args, name))
    _count("seed", args.seed, 0)
    if args.model == "mlp":
        _mlp_sizes(args.sizes, args.dtype)
    _inapplicable(args)
    if args.model == "resnet18" and getattr(args, "width", None) is not None and args.width >= 1:
        n, acts = models.resnet18_size(args.width)
        # parameters, gradients, two optimiser moments; one batch of convolution outputs (a lower bound)
        checkpoint.check_fits((4 * n + args.batch_size * acts) * np.dtype(args.dtype).itemsize,
                              f"--model resnet18 --width {args.width} ({n:,} parameters, batch {args.batch_size})")
    _number("lr", args.lr, low=0, low_open=True, dtype=args.dtype)
    _number("momentum", args.momentum, low=0, high=1, high_open=True)
    _number("feedback-lr", args.feedback_lr, low=0, low_open=True, dtype=args.dtype)
    _number("m", args.m, low=0, high=1)
    _number("feedback-decay", args.feedback_decay, low=0, high=1)
    for name in ("var_weight", "tau", "head_weight", "l2"):
        _number(name.replace("_", "-"), getattr(args, name), low=0, dtype=args.dtype)
    args.device = resolve_device(args.device)  # DeviceError (exit 2, one line) before any work
    if args.parallel == "streams" and args.device != "cuda":
        raise ValueError("--parallel streams runs each block on its own CUDA stream; it needs --device cuda")
    if args.parallel in ("threads", "mpi") and args.device != "cpu":
        raise ValueError(f"--parallel {args.parallel} runs on CPU cores; with --device cuda use --parallel "
                         "streams (one CUDA stream per block) or none")


def _check_writable(out, create=True):
    """Fail now, not after training, when the run directory cannot be written. ``create=False``:
    only look (the nearest existing ancestor must be a writable directory), creating nothing."""
    if not create:
        path = os.path.abspath(out)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise ValueError(f"cannot write the run directory {out}: {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write the run directory {out}: {path} is not writable")
        return
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write the run directory {out}: {e.strerror or e}") from None


def _schedule(args, method, d, log):
    """The schedule of ``--parallel`` (and the assignment of blocks to workers)."""
    from .parallel import check_pipelinable, plan_groups
    if args.parallel == "none":
        if args.workers not in (None, 1):
            raise ValueError("--workers needs --parallel threads or mpi")
        return SequentialSchedule(blas=args.blas_threads)
    check_pipelinable(method)
    if args.parallel == "streams":
        from .parallel.streams import StreamSchedule
        return StreamSchedule(method)
    x, y = d["x_train"][:args.batch_size], d["y_train"][:args.batch_size]
    if args.parallel == "threads":
        from .parallel.threads import ThreadPipeline
        workers = 2 if args.workers is None else args.workers
        groups, _ = plan_groups(method, workers, x, y, log=log)
        return ThreadPipeline(method, groups, blas=args.blas_threads)
    from .parallel.mpi import MPIPipeline, bcast_groups, world
    comm = world()
    if args.workers is not None and args.workers != comm.Get_size():
        raise ValueError(f"--workers {args.workers} but {comm.Get_size()} MPI ranks; launch with mpiexec -n {args.workers}")
    if comm.Get_size() > len(method.learners):
        raise ValueError(f"{comm.Get_size()} MPI ranks for {len(method.learners)} blocks; use at most one rank per block")
    groups = plan_groups(method, comm.Get_size(), x, y, log=log)[0] if comm.Get_rank() == 0 else None
    return MPIPipeline(method, comm, bcast_groups(comm, groups), d["x_train"][:2], blas=args.blas_threads)


def cmd_train(args):
    with RunLock() as lock:  # one run per run directory; released (its file removed) however it ends
        return _train(args, lock)


def _check_run_outputs(out):
    """The run's fixed output files, where present, must be regular files (before any work)."""
    state = os.path.join(out, "state")
    if os.path.lexists(state) and not os.path.isdir(state):  # found only after an epoch otherwise
        raise ValueError(f"{state} is in the way: the run keeps its resumable state in that directory; "
                         "remove or rename it, or give another --out")
    for name in ("checkpoint.npz", "history.json", os.path.join("state", "trainer.json")):
        if os.path.lexists(os.path.join(out, name)):
            check_output(os.path.join(out, name))


def _train(args, lock):
    from .methods import make
    from .methods.common import Diverged, fit
    if args.resume:
        args = _resume_args(args)
    args.epochs = 10 if args.epochs is None else args.epochs
    validate_train(args)
    rank = _mpi_rank() if args.parallel == "mpi" else 0
    out = args.out or os.path.join("runs", f"{args.method}-{args.model}-seed{args.seed}")
    if rank == 0:
        _check_writable(out, create=False)  # before loading data; created only once all checks pass
        _check_run_outputs(out)
        if os.path.isdir(out):
            lock.acquire(out)
    log = print if rank == 0 else None
    blocks, images = _build_model(args)
    d, source = load_data(args, images, log=log)
    if args.dtype == "float64":
        d = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in d.items()}
    method = make(args.method, blocks, sample_input=d["x_train"][:8], rng=args.seed, **method_options(args))
    if args.device != "cpu":
        method.to(args.device)  # built on the host (same initial weights as a CPU run), then moved
    schedule = _schedule(args, method, d, log)
    created = not os.path.exists(out)
    if rank == 0:
        _check_writable(out)
        lock.acquire(out)
    if log:
        log(f"training {args.method} on {args.model} for {args.epochs} epochs "
            f"(schedule {schedule.name}, {schedule.workers} worker{'s' * (schedule.workers > 1)}) -> {out}")
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command") and not k.startswith("_")}
    # the run's name, not the absolute path of this machine: same run -> same checkpoint bytes
    options.update({k: _run_name(options[k]) for k in ("out", "resume") if options.get(k)})
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # fit reports divergence
            hist = fit(method, d, epochs=args.epochs, batch_size=args.batch_size, rng=args.seed,
                       log=print if (rank == 0 or schedule.name == "mpi" and schedule.last) else None,
                       history_path=os.path.join(out, "history.json") if rank == 0 else None,
                       state_dir=os.path.join(out, "state"),  # every rank resumes from it; rank 0 writes
                       resume=bool(args.resume), options=options, schedule=schedule)
    except BaseException as e:
        if schedule.name == "mpi" and isinstance(e, Exception):
            schedule.abort(e)
        lock.release()
        if rank == 0 and created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # nothing of the run was kept: leave no empty directory behind
        if isinstance(e, Diverged):
            raise Diverged(f"{e}; no checkpoint written") from None
        raise
    if not schedule.is_root:
        return 0
    meta = {"method": args.method, "model": args.model, "data": source, "options": options,
            "test_acc": hist["test_acc"]}
    checkpoint.save(os.path.join(out, "checkpoint.npz"), method.model, meta, method.aux_state())
    print(f"final test accuracy {100 * hist['test_acc'][-1]:.2f}%; checkpoint {out}/checkpoint.npz")
    return 0


def _run_name(path):
    """The run directory's own name (``runs/a`` and ``/home/x/runs/a`` both give ``a``)."""
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _mpi_rank():
    from .parallel.mpi import world
    return world().Get_rank()


def cmd_eval(args):
    _count("limit-test", args.limit_test)
    from exporters.cli import _is_image_model
    model, meta, _ = checkpoint.load(args.checkpoint)
    images = meta.get("model") in ("cnn", "resnet", "resnet18") or _is_image_model(meta, model.config())
    d, source = checkpoint.training_data(meta, args.data, images=images, limit_train=1, limit_test=args.limit_test)
    x, y = d["x_test"][:args.limit_test], d["y_test"][:args.limit_test]
    try:
        acc = evaluate(model, x, y)
    except ValueError as e:  # the layers name the input shape they expected
        raise ValueError(f"{args.checkpoint} does not fit the {source} test data: {e}") from None
    print(f"{args.checkpoint}: test accuracy {100 * acc:.2f}% ({len(x)} {source} test examples)")
    return 0


def cmd_demo(args):
    """A short BP vs BLL run on Fashion-MNIST (all 60k/10k images) or the synthetic fallback."""
    from .methods import make
    from .methods.common import fit
    args.data = "auto"
    for name in ("epochs", "limit_train", "limit_test"):
        _count(name.replace("_", "-"), getattr(args, name))
    d, source = load_data(args, False)
    rows = []
    for method_name in ("bp", "bll"):
        blocks = models.mlp((784, 256, 256, 256, 10), rng=0)
        method = make(method_name, blocks, sample_input=d["x_train"][:8])
        print(f"--- {method_name}: MLP 784-256-256-256-10, 4 blocks, {args.epochs} epochs")
        t = time.perf_counter()
        hist = fit(method, d, epochs=args.epochs, batch_size=128, rng=0)
        rows.append((method_name, 100 * hist["test_acc"][-1], time.perf_counter() - t))
        for b in hist["diagnostics"][-1].get("blocks", []):
            print(f"  block {b['block']}: local head accuracy {100 * b['head_acc']:.1f}%, between-class "
                  f"variance fraction {b['between_class_fraction']:.2f}, mean |a| {b['mean_abs_a']:.2f}")
    print(f"\nresults on {source} data:\n| method | test accuracy % | seconds |\n|---|---|---|")
    for name, acc, sec in rows:
        print(f"| {name} | {acc:.2f} | {sec:.1f} |")
    return 0


def cmd_report(args):
    from .report import make_report
    _count("dpi", args.dpi)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a directory for the report")
    make_report(args.run_dirs, args.out, dpi=args.dpi)
    return 0


def _add_finetune_q(sub):
    p = sub.add_parser("finetune-q", help="block-local quantisation-aware fine-tuning: every block trained on "
                       "its own with fake-quantised weights and activations (straight-through estimator)")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train (MLP or CNN; each BatchNorm is "
                   "folded into the Conv2d / Dense before it, and the fine-tuned checkpoint holds the folded model)")
    p.add_argument("--width", type=int, required=True, help="bits of the export to train for (2..16; 4, 6 or 8)")
    p.add_argument("--out", required=True, help="fine-tuned checkpoint to write (.npz)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over the training set (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--objective", choices=("auto", "bll", "reconstruct"), default="auto",
                   help="auto (default): a BLL checkpoint's own local losses (heads, feedback), else block "
                   "reconstruction of the float block outputs (BP/FA checkpoints have no local heads)")
    p.add_argument("--per-channel", action="store_true",
                   help="per-output-channel weight formats (default off; recorded in the checkpoint, which "
                   "bll-ref export then follows)")
    p.add_argument("--calibration-method", choices=("percentile", "mse"), default="percentile",
                   help="activation calibration (default percentile; the formats are stored in the "
                   "checkpoint and bll-ref export --width W uses them)")
    p.add_argument("--percentile", type=float, default=99.9, help="with percentile calibration (default 99.9)")
    p.add_argument("--output-width", type=int, default=None, metavar="BITS",
                   help="bits of the model's output (logits), e.g. 16 after 4-bit layers (default: --width)")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training examples that calibrate the activation formats, as export's (default 256)")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto",
                   help="training data; auto (default): what the checkpoint was trained on")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N training examples")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.set_defaults(func=cmd_finetune_q)


def cmd_finetune_q(args):
    from .quant_finetune import finetune_checkpoint
    if not 2 <= args.width <= 16:
        raise ValueError(f"--width must be in 2..16 (4, 6 or 8 for the accuracy table), got {args.width}")
    for name in ("epochs", "calibration"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    s = finetune_checkpoint(args.checkpoint, args.out, width=args.width, epochs=args.epochs, lr=args.lr,
                            objective=args.objective, data=args.data, n_calibration=args.calibration,
                            percentile=args.percentile, calibration=args.calibration_method,
                            per_channel=args.per_channel, output_width=args.output_width,
                            limit_train=args.limit_train, seed=args.seed)
    print(f"integer model ({args.width} bits) test accuracy {100 * s['test_acc_before']:.2f}% -> "
          f"{100 * s['test_acc_after']:.2f}% ({s['objective']} objective, {args.epochs} epoch(s)); wrote {args.out}")
    print(f"export it with: bll-ref export {args.out} --width {args.width} (the formats it was trained for "
          "are in the checkpoint and used)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bll-ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bll-ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model with BP, FA or BLL")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint.npz written by bll-ref train")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto",
                   help="test data; auto: the data the checkpoint was trained on (recorded in it)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="short BP vs BLL comparison on the embedded default")
    p.add_argument("--epochs", type=int, default=3, help="epochs per method")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use only the first N test examples (default: all)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="figures and a summary table of run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by bll-ref train")
    p.add_argument("--out", required=True, help="directory for curves.png, blocks-<run>.png, report.md")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (dots per inch)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("doctor", help="what this machine offers for --device cuda (GPU, driver, CUDA, CuPy, numba-cuda)")
    p.set_defaults(func=cmd_doctor)
    _add_finetune_q(sub)
    from exporters.cli import add_commands  # export, verify, nir, c-header
    add_commands(sub)
    for p in sub.choices.values():
        p.formatter_class = _Help
    args = parser.parse_args(argv)
    if args.command == "train":  # which options were given, not defaulted (--resume, inapplicable ones)
        args._given = _given_train_options(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_exit():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
            rc = args.func(args)
            raise_if_signalled()  # a signal that a library's cleanup swallowed still ends the command
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return rc
    except ValueError as e:
        print(f"bll-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (WorkerError, FloatingPointError) as e:  # a dead worker, a diverging run: exit 2, one line
        print(f"bll-ref {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:  # `bll-ref verify ... | head`: the reader left; end quietly as Unix tools do
        if not _stdout_gone():
            print(f"bll-ref {args.command}: error: {_os_message(e)}", file=sys.stderr)
            return 2
        _silence_stdout()
        return 128 + 13  # SIGPIPE's status
    except OSError as e:  # file system: read-only, full, a file or directory in the way
        print(f"bll-ref {args.command}: error: {_os_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"bll-ref {args.command}: error: out of memory; use a smaller model, batch or "
              "--limit-train", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bll-ref {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_doctor(args):
    """Print what the GPU stack looks like here; exit 0 when --device cuda works, else 2."""
    rows = device_info()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0 if rows[-1][1] == "works" else 2


def _stdout_gone() -> bool:
    """True when the reader of our stdout has gone (a pipe whose other end is closed)."""
    import select
    try:
        fd = sys.stdout.fileno()
        if not hasattr(select, "poll"):
            return True
        p = select.poll()
        p.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout():
    """Point fd 1 at /dev/null so that the interpreter's final flush of what is still buffered does
    not print "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _os_message(e: OSError) -> str:
    msg = e.strerror or str(e)
    if e.filename is not None and os.fspath(e.filename) not in msg:
        msg = f"{os.fspath(e.filename)}: {msg}"
    return msg


if __name__ == "__main__":
    sys.exit(main())
