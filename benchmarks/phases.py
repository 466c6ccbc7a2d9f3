"""Per-phase time of a training step, each phase against its own limit (issue 10's roofline).

A :class:`PhaseClock` wraps the methods that make up a step (layer forward/backward, local losses,
feedback solves, optimiser steps) with timers that count *exclusive* time: a container's own
bookkeeping is "other", its children count in their own phase. Per call it also adds up the work
that sets the phase's limit:

- GEMM phases (Dense/Conv2d forward, backward): FLOPs of the products they perform; limit =
  FLOPs / the machine's GEMM rate measured in the same run;
- memory-bound phases (element-wise layers, local losses, optimiser): bytes of the arrays passed in
  and returned (the compulsory traffic: every input read once, every output written once; the
  optimiser's 7 words per Adam parameter, 5 per SGD-momentum parameter); limit = bytes / the
  bandwidth of an in-place a += s*b measured in the same run. Two bandwidths: element-wise layers
  and local losses work on activations (0.5 MB at batch 128 x 1024) that stay in cache, so their
  limit uses arrays of 4 MB; the optimiser streams every parameter and its state (46 MB for the
  MLP), which the rest of the step evicts from cache between two updates, so its limit uses the
  memory bandwidth (arrays of 64 MB, beyond any cache share of one core; STREAM's rule);
- feedback solves: FLOPs of the normal equations and the solve (small, latency-bound: a GEMM-rate
  limit says how far from it they are).

The wrappers cost ~1 us per call; a step makes a few hundred calls, so they add < 1 % to the
steps timed here (the unwrapped step is timed too and reported beside the sum).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
from numba import njit

from bll_ref import feedback, optim
from bll_ref.layers import Layer, conv, dense
from bll_ref.losses import kernels as loss_kernels
from bll_ref.losses import local as loss_local
from bll_ref.losses import output as loss_output

PHASES = ("forward GEMM", "backward GEMM", "element-wise", "local losses", "feedback solves",
          "optimiser", "other")


def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _dense_flops(layer, args, result, backward):
    if not backward:
        x = args[0]
        return 2 * x.size * layer.out_features
    dy = args[0]
    need_dx = args[1] if len(args) > 1 else True
    n = dy.size // layer.out_features
    return 2 * n * layer.in_features * layer.out_features * (2 if need_dx and result is not None else 1)


def _conv_flops(layer, args, result, backward):
    kh, kw = layer.kernel_size
    if not backward:
        y = result
        return 2 * y.size * layer.in_channels * kh * kw
    dy = args[0]
    return 2 * dy.size * layer.in_channels * kh * kw * (2 if result is not None else 1)


def _feedback_flops(fb, args, fit):
    # fit: Y^T Y (n q^2), Y^T A (n q d), the solve (q^2 d); predict: Y W (n q d)
    n, q = args[0].shape
    d = fb.n_units
    return 2 * n * q * q + 2 * n * q * d + 2 * q * q * d if fit else 2 * n * q * d


class PhaseClock:
    """Exclusive time and work per phase while active (see module docstring); ``reset`` between steps."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.flops = dict.fromkeys(PHASES, 0)
        self.bytes = dict.fromkeys(PHASES, 0)
        self.by_name = {}  # "Class.method" -> exclusive seconds
        self._stack = []

    def reset(self):
        self.__init__()

    def _wrap(self, fn, phase, work=None, label=None):
        clock = self
        label = label or fn.__qualname__

        def wrapped(*args, **kwargs):
            clock._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = clock._stack.pop()
                clock.seconds[phase] += elapsed - children
                clock.by_name[label] = clock.by_name.get(label, 0.0) + elapsed - children
                if clock._stack:
                    clock._stack[-1] += elapsed
            if work is not None:
                kind, amount = work(args, kwargs, result)
                (clock.flops if kind == "flops" else clock.bytes)[phase] += amount
            return result
        return wrapped

    @contextmanager
    def active(self):
        """Patch the step's building blocks while the block runs; always restores them."""
        patches = []

        def patch(owner, name, phase, work=None):
            orig = owner.__dict__[name]
            patches.append((owner, name, orig))
            label = f"{owner.__name__}.{name}"
            setattr(owner, name, self._wrap(orig, phase, work, label))

        def gemm(flops_fn, backward):
            return lambda a, k, r: ("flops", flops_fn(a[0], a[1:], r, backward))

        def traffic(a, k, r):
            return "bytes", _nbytes(a) + _nbytes(tuple(k.values())) + _nbytes(r)

        patch(dense.Dense, "forward", "forward GEMM", gemm(_dense_flops, False))
        patch(dense.Dense, "backward", "backward GEMM", gemm(_dense_flops, True))
        patch(conv.Conv2d, "forward", "forward GEMM", gemm(_conv_flops, False))
        patch(conv.Conv2d, "backward", "backward GEMM", gemm(_conv_flops, True))
        for cls in _layer_classes():
            if cls in (dense.Dense, conv.Conv2d):
                continue
            for name in ("forward", "backward"):
                if name in cls.__dict__:
                    is_container = hasattr(cls, "layers") or cls.__name__ in ("Sequential", "Residual")
                    patch(cls, name, "other" if is_container else "element-wise", None if is_container else traffic)
        for mod in (loss_kernels, loss_local):
            for name in ("kl_ef_gradients", "bernoulli_eq8", "ef_gradients"):
                if name in mod.__dict__:
                    patch(mod, name, "local losses", traffic)
        patch(loss_output, "softmax_cross_entropy", "element-wise", traffic)
        patch(feedback.LinearFeedback, "fit", "feedback solves",
              lambda a, k, r: ("flops", _feedback_flops(a[0], a[1:], True)))
        patch(feedback.LinearFeedback, "predict", "feedback solves",
              lambda a, k, r: ("flops", _feedback_flops(a[0], a[1:], False)))
        # words moved per parameter: Adam p, m, v read and written + g read = 7; SGD momentum 5; SGD 3
        patch(optim.Adam, "step", "optimiser", lambda a, k, r: ("bytes", 7 * _param_bytes(a[0])))
        patch(optim.SGD, "step", "optimiser",
              lambda a, k, r: ("bytes", (5 if a[0].momentum else 3) * _param_bytes(a[0])))
        rebound = _rebind_imported_names(patches)
        try:
            yield self
        finally:
            for mod, name, orig in rebound:
                setattr(mod, name, orig)
            for owner, name, orig in reversed(patches):
                setattr(owner, name, orig)


def _param_bytes(opt):
    return sum(p.nbytes for p in opt._params.values())


def _layer_classes():
    seen, todo = [], [Layer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


_IMPORTERS = ("bll_ref.methods.learner", "bll_ref.methods.backprop", "bll_ref.methods.feedback_alignment",
              "bll_ref.methods.common")


def _rebind_imported_names(patches):
    """Modules that did ``from ..losses.output import softmax_cross_entropy`` hold the original
    function object: point their name at the wrapper. Returns [(module, name, original)] to undo."""
    import sys
    rebound = []
    for owner, name, orig in patches:
        if not isinstance(owner, type(np)):
            continue
        for modname in _IMPORTERS:
            mod = sys.modules.get(modname)
            if mod is not None and mod.__dict__.get(name) is orig:
                setattr(mod, name, owner.__dict__[name])
                rebound.append((mod, name, orig))
    return rebound


@njit(cache=True, error_model="numpy")
def _axpy(a, b, s):
    for i in range(a.size):
        a[i] += s * b[i]


MEMORY_ELEMENTS = 1 << 24  # 64 MB float32 arrays: the memory (not cache) bandwidth


def update_bandwidth(n=1 << 20, repeats=30):
    """Bytes/s of the in-place update a += s*b on float32 arrays of ``n`` elements (12 bytes per
    element, all of them moved: read a and b, write a; 1M elements = 4 MB, a 1024x1024 weight
    matrix), one thread, median. In place like the optimisers, so no write-allocate traffic goes
    uncounted (STREAM's a = b + s*c reads a's lines too but counts only 12 of its 16 bytes)."""
    b = np.ones(n, np.float32)
    a = np.full(n, 2.0, np.float32)
    s = np.float32(1e-3)
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        _axpy(a, b, s)
        times.append(time.perf_counter() - t)
    return 12 * n / float(np.median(times[2:]))


def phase_table(step, repeats, gemm_rate, bandwidth, warmup=3):
    """Run ``step`` under a PhaseClock; per phase: ms per step (median over the steps, so one
    descheduled step does not skew a phase), limit ms, fraction of the limit; and per call.
    ``bandwidth``: bytes/s for every memory-bound phase, or a dict phase -> bytes/s."""
    if not isinstance(bandwidth, dict):
        bandwidth = dict.fromkeys(PHASES, bandwidth)
    for _ in range(warmup):
        step()
    clock = PhaseClock()
    per_step = {ph: [] for ph in PHASES}
    totals, names = [], {}
    with clock.active():
        step()
        for _ in range(repeats):
            clock.reset()
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            totals.append(total)
            inner = sum(clock.seconds[p] for p in PHASES if p != "other")
            for ph in PHASES:
                per_step[ph].append(max(total - inner, 0.0) if ph == "other" else clock.seconds[ph])
            for k, v in clock.by_name.items():
                names.setdefault(k, []).append(v)
            work_flops, work_bytes = dict(clock.flops), dict(clock.bytes)
    rows = {}
    for ph in PHASES:
        s = float(np.median(per_step[ph]))
        limit = work_flops[ph] / gemm_rate + work_bytes[ph] / bandwidth[ph]
        rows[ph] = {"ms": 1e3 * s, "limit_ms": 1e3 * limit, "fraction": (limit / s) if s > 0 and limit else None,
                    "gflop": work_flops[ph] / 1e9, "mbytes": work_bytes[ph] / 1e6}
    by_name = {k: 1e3 * float(np.median(v)) for k, v in sorted(names.items(), key=lambda kv: -np.median(kv[1]))}
    return float(np.median(totals)), rows, by_name
