"""``bll-ref`` command line: train / eval / demo (and export / verify, see exporters/)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import checkpoint, data, models
from .methods.common import evaluate
from .parallel import SCHEDULES, SequentialSchedule, WorkerError


def load_data(args, image_shape, log=print):
    """The data policy of ``bll_ref.data.load`` for parsed options (--data, --limit-*); says which."""
    return data.load(getattr(args, "data", "auto"), images=bool(image_shape), limit_train=args.limit_train,
                     limit_test=args.limit_test, log=log)


def _build_model(args):
    dtype = np.dtype(args.dtype)
    if args.model == "mlp":
        try:
            sizes = tuple(int(s) for s in args.sizes.split(","))
        except ValueError:
            raise ValueError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
        return models.mlp(sizes, activation_name=args.activation, rng=args.seed, dtype=dtype), False
    width = getattr(args, "width", None)  # runs saved before --width existed resume without it
    if width is not None and args.model != "resnet18":
        raise ValueError(f"--width applies to --model resnet18 only, not {args.model!r}; leave it out")
    if width is not None and width < 1:
        raise ValueError(f"--width must be >= 1 (base channels), got {width}")
    kw = {"width": width} if width is not None else {}
    return models.build(args.model, rng=args.seed, dtype=dtype, **kw), True


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
    p.add_argument("--method", choices=("bp", "fa", "bll"), default="bll")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet", "resnet18"), default="mlp")
    p.add_argument("--width", type=int, default=None, help="resnet18: base channels (default 16; 64 = ResNet-18)")
    p.add_argument("--sizes", default="784,1024,1024,1024,10", help="MLP layer sizes")
    p.add_argument("--activation", default="leaky_relu", choices=("relu", "leaky_relu", "sigmoid", "tanh"))
    p.add_argument("--epochs", type=int, default=None, help="epochs in all (default 10; with --resume: "
                   "the resumed run's total unless given)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (every method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoint.npz, history.json, state/)")
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
                   help="default gauss_ln; sim: Pred-Sim (Nokland & Eidnes 2019) similarity loss")
    g.add_argument("--feedback", default=None, choices=("closed", "trained", "twin"), help="default closed")
    g.add_argument("--var-weight", type=float, default=None, help="default 1 (sim: 99)")
    g.add_argument("--tau", type=float, default=None, help="mixing m = 1/(1 + tau epoch), default 2")
    g.add_argument("--m", type=float, default=None, help="constant mixing m (instead of --tau)")
    g.add_argument("--no-anneal", action="store_true", help="Gaussian terms: do not weight by m")
    g.add_argument("--no-head", action="store_true", help="disable the local predictive head")
    g.add_argument("--head-weight", type=float, default=None, help="default 1")
    g.add_argument("--eq8-terms", default=None, help="eq8 only: forward,posterior (default both)")
    g.add_argument("--span", type=int, choices=(1, 2), default=None, help="default 1")
    g.add_argument("--l2", type=float, default=None, help="closed feedback: ridge strength, default 1")
    g.add_argument("--feedback-decay", type=float, default=None, help="closed feedback: running-statistics decay")
    g.add_argument("--feedback-lr", type=float, default=None, help="trained/twin feedback: learning rate")
    g.add_argument("--no-kernels", action="store_true", help="NumPy reference losses instead of Numba")


# train options a resumed run takes from its state (the rest may change: the schedule gives the
# same updates whichever it is, and --epochs may extend the run)
_RESUME_KEEPS_NEW = {"epochs", "parallel", "workers", "blas_threads", "resume"}


def _resume_args(args):
    """args of the run in ``args.resume`` (its stored options), with this call's schedule/epochs."""
    from . import runstate
    t = runstate.read_trainer(os.path.join(args.resume, "state"))
    stored = t.get("options") or {}
    missing = sorted(set(vars(args)) - set(stored) - _RESUME_KEEPS_NEW - {"func", "command"})
    if missing:
        raise ValueError(f"{args.resume}: saved options lack {missing[:4]}; cannot resume this run")
    merged = {**stored, **{k: getattr(args, k) for k in _RESUME_KEEPS_NEW}}
    merged["out"] = args.resume
    if merged["epochs"] is None:
        merged["epochs"] = stored.get("epochs")
    return argparse.Namespace(**{**vars(args), **merged})


def _check_writable(out):
    """Fail now, not after training, when the run directory cannot be written."""
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
    from .methods import make
    from .methods.common import fit
    if args.resume:
        args = _resume_args(args)
    args.epochs = 10 if args.epochs is None else args.epochs
    if args.blas_threads < 1:
        raise ValueError(f"--blas-threads must be >= 1, got {args.blas_threads}")
    rank = _mpi_rank() if args.parallel == "mpi" else 0
    log = print if rank == 0 else None
    blocks, images = _build_model(args)
    d, source = load_data(args, images, log=log)
    if args.dtype == "float64":
        d = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in d.items()}
    method = make(args.method, blocks, sample_input=d["x_train"][:8], rng=args.seed, **method_options(args))
    out = args.out or os.path.join("runs", f"{args.method}-{args.model}-seed{args.seed}")
    if rank == 0:
        _check_writable(out)
    schedule = _schedule(args, method, d, log)
    if log:
        log(f"training {args.method} on {args.model} for {args.epochs} epochs "
            f"(schedule {schedule.name}, {schedule.workers} worker{'s' * (schedule.workers > 1)}) -> {out}")
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    try:
        hist = fit(method, d, epochs=args.epochs, batch_size=args.batch_size, rng=args.seed,
                   log=print if (rank == 0 or schedule.name == "mpi" and schedule.last) else None,
                   history_path=os.path.join(out, "history.json") if rank == 0 else None,
                   state_dir=os.path.join(out, "state"),  # every rank resumes from it; rank 0 writes
                   resume=bool(args.resume), options=options, schedule=schedule)
    except Exception as e:
        if schedule.name == "mpi":
            schedule.abort(e)
        raise
    if not schedule.is_root:
        return 0
    meta = {"method": args.method, "model": args.model, "data": source, "options": options,
            "test_acc": hist["test_acc"]}
    checkpoint.save(os.path.join(out, "checkpoint.npz"), method.model, meta, method.aux_state())
    print(f"final test accuracy {100 * hist['test_acc'][-1]:.2f}%; checkpoint {out}/checkpoint.npz")
    return 0


def _mpi_rank():
    from .parallel.mpi import world
    return world().Get_rank()


def cmd_eval(args):
    model, meta, _ = checkpoint.load(args.checkpoint)
    images = meta.get("model") in ("cnn", "resnet", "resnet18")
    args.limit_train, args.limit_test = 1, args.limit_test
    d, _ = load_data(args, images)
    acc = evaluate(model, d["x_test"], d["y_test"])
    print(f"{args.checkpoint}: test accuracy {100 * acc:.2f}% ({len(d['x_test'])} examples)")
    return 0


def cmd_demo(args):
    """A short BP vs BLL run on Fashion-MNIST (all 60k/10k images) or the synthetic fallback."""
    from .methods import make
    from .methods.common import fit
    args.data = "auto"
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
    make_report(args.run_dirs, args.out, dpi=args.dpi)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bll-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model with BP, FA or BLL")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    p.add_argument("--limit-test", type=int, default=None)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="short BP vs BLL comparison on the embedded default")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="figures and a summary table of run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for curves.png, blocks-<run>.png, report.md")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(func=cmd_report)
    from exporters.cli import add_commands  # export, verify, nir, c-header
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"bll-ref {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (WorkerError, FloatingPointError) as e:  # a dead worker, a diverging run: exit 2, one line
        print(f"bll-ref {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
