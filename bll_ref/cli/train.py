"""``bll-ref train``: its options parsed into a ``bll_ref.training.TrainConfig``, the run started or
resumed by the library, the result printed."""
from __future__ import annotations

import argparse
import sys

from ..backend import DEVICES
from ..parallel import SCHEDULES
from ..training import TrainConfig, resume, train
from .common import add_data_option

__all__ = ["add_train_command", "cmd_train", "given_train_options"]


class _DeprecatedWidth(argparse.Action):
    """``train --width N``: the old name of ``--channels`` (``--width`` means bits in export and
    finetune-q); still taken, and ``cmd_train`` says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "channels", values)
        setattr(namespace, "_width_given", True)


def add_train_command(sub):
    p = sub.add_parser("train", help="train a model with BP, FA or BLL")
    add_train_options(p)
    p.set_defaults(func=cmd_train)


def add_train_options(p):
    p.add_argument("--method", choices=("bp", "fa", "bll"), default="bll",
                   help="training rule: backprop, feedback alignment or block-local learning")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet", "resnet18"), default="mlp",
                   help="network: mlp (layer widths from --sizes) or an image model on 1x28x28 inputs")
    p.add_argument("--channels", type=int, default=None,
                   help="resnet18: base channels (default 16; 64 = the paper's ResNet-18)")
    p.add_argument("--width", type=int, action=_DeprecatedWidth, dest="channels", default=argparse.SUPPRESS,
                   help="deprecated name of --channels (no default of its own)")
    p.add_argument("--sizes", default=TrainConfig.sizes, help="MLP layer widths in units, input first, classes last")
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
    add_data_option(p, None)
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
                        "(launch with mpiexec -n K python -m mpi4py -m bll_ref.cli train --parallel mpi); "
                        "streams: one CUDA stream per block (--device cuda)")
    g.add_argument("--workers", type=int, default=None,
                   help="threads: number of worker threads (default 2); mpi: must equal the number of ranks")
    g.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads per worker (default 1: every schedule then makes the same updates, "
                        "bit for bit; more can be faster for --parallel none on an idle machine)")
    g.add_argument("--micro-batches", type=int, default=1, metavar="R",
                   help="BLL: split every batch into R slices whose gradients are summed in slice order before "
                        "each optimiser step (default 1: the plain step); every schedule gives the same result")
    g.add_argument("--replicas", type=int, default=None, metavar="R",
                   help="mpi: run every pipeline stage on R ranks (world = stages x R), each taking its share "
                        "of the slices; bit-identical to --micro-batches (default: --replicas R means R slices)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from its last complete epoch with its own options")
    g = p.add_argument_group("BLL options (an option that does not apply to the chosen variant is an error)")
    g.add_argument("--variational", default=None, choices=("gauss_ln", "gauss", "eq8", "bernoulli_kl", "none", "sim"),
                   help="local variational loss; default gauss_ln; sim: Pred-Sim (Nokland & Eidnes 2019) similarity loss")
    g.add_argument("--feedback", default=None, choices=("closed", "trained", "twin"),
                   help="feedback network giving each block its message b; default closed")
    g.add_argument("--var-weight", type=float, default=None,
                   help="weight of the variational term (factor); default 1 (sim: 99)")
    g.add_argument("--tau", type=float, default=None, help="mixing m = 1/(1 + tau epoch) (per epoch, >= 0), default 2")
    g.add_argument("--m", type=float, default=None,
                   help="constant mixing m in [0, 1] (instead of --tau; default: the --tau schedule)")
    g.add_argument("--no-anneal", action="store_true", help="Gaussian terms: do not weight by m")
    g.add_argument("--no-head", action="store_true", help="disable the local predictive head")
    g.add_argument("--head-weight", type=float, default=None,
                   help="weight of the local head's loss (factor, >= 0); default 1")
    g.add_argument("--eq8-terms", default=None, help="eq8 only: forward,posterior (default both)")
    g.add_argument("--span", type=int, choices=(1, 2), default=None,
                   help="blocks a local gradient reaches (2: also into the block below); default 1")
    g.add_argument("--l2", type=float, default=None, help="closed feedback: ridge strength (>= 0), default 1")
    g.add_argument("--feedback-decay", type=float, default=None,
                   help="closed feedback: running-statistics decay per step in [0, 1] (default: none, plain sums)")
    g.add_argument("--feedback-lr", type=float, default=None,
                   help="trained/twin feedback: learning rate (> 0), default 1e-3")
    g.add_argument("--no-kernels", action="store_true", help="NumPy reference losses instead of Numba")


def given_train_options(argv):
    """The dests of the ``train`` options given on the command line (not filled in as defaults)."""
    argv = list(argv)
    if "train" not in argv:
        return set()
    p = argparse.ArgumentParser(add_help=False)
    add_train_options(p)
    unset = object()  # not a string: argparse would run a string default through the option's type
    p.set_defaults(**{a.dest: unset for a in p._actions})
    ns, _ = p.parse_known_args(argv[argv.index("train") + 1:])
    return {k for k, v in vars(ns).items() if v is not unset and not k.startswith("_")}


def cmd_train(args):
    if getattr(args, "_width_given", False):
        print("note: train --width is deprecated (it means bits in export and finetune-q); use --channels",
              file=sys.stderr)
    given = getattr(args, "_given", set())
    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume") and not k.startswith("_")}
    if args.resume:
        result = resume(args.resume, given=given - {"resume"}, **{k: fields[k] for k in given if k in fields})
    else:
        fields["epochs"] = 10 if fields["epochs"] is None else fields["epochs"]
        result = train(TrainConfig(**fields), given=given)
    if result.wrote and result.history.get("test_acc"):  # an MPI rank but 0 holds no final evaluation
        print(f"final test accuracy {100 * result.test_acc:.2f}%; checkpoint {result.out}/checkpoint.npz")
    return 0
