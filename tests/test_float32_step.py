"""A float32 training step stays in float32: no array of parameter size is promoted to float64.

NumPy promotes silently (a float64 scalar or array anywhere in an expression makes the result
float64, twice the memory traffic, half the SIMD lanes). A tracer watches every frame of bll_ref
code during one step — the arguments on entry, every local after each line, every return value —
and records float64 arrays at least as large as the smallest hidden weight matrix. Temporaries
that live and die inside one expression escape it, but a promotion that reaches a variable, an
argument or a return value (which is where it would cost a pass) does not.
"""
import os
import sys

import numpy as np
import pytest

import bll_ref
from bll_ref import data, models
from bll_ref.layers import Conv2d
from bll_ref.methods import make

BLL_DIR = os.path.dirname(os.path.abspath(bll_ref.__file__))


def _arrays(v, depth=0):
    if isinstance(v, np.ndarray):
        yield v
    elif depth < 2 and isinstance(v, (tuple, list)):
        for x in v:
            yield from _arrays(x, depth + 1)
    elif depth < 2 and isinstance(v, dict):
        for x in v.values():
            yield from _arrays(x, depth + 1)


def float64_arrays_during(fn, min_size):
    """[(function, variable, shape)] of float64 arrays with >= min_size elements seen while fn runs."""
    found = []

    def scan(frame, values):
        for name, v in values:
            for a in _arrays(v):
                if a.dtype == np.float64 and a.size >= min_size:
                    found.append((f"{os.path.relpath(frame.f_code.co_filename, BLL_DIR)}:"
                                  f"{frame.f_code.co_name}", name, a.shape))

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(BLL_DIR):
            return None
        if event in ("call", "line"):
            scan(frame, frame.f_locals.items())
        elif event == "return":
            scan(frame, [("<return>", arg)])
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return found


MLP_CASES = [("bp", {}), ("fa", {}), ("bll", {}), ("bll", {"variational": "none"}),
             ("bll", {"variational": "eq8", "feedback": "trained", "tau": 0.5}),
             ("bll", {"variational": "bernoulli_kl"}), ("bll", {"variational": "gauss"})]


@pytest.mark.parametrize("kind,opts", MLP_CASES, ids=[f"{k}-{o}" for k, o in MLP_CASES])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_float32_mlp_step_has_no_float64_array_of_parameter_size(kind, opts, optimizer):
    x, y = data.synthetic_classification(64, n_features=64, n_classes=10, rng=0)
    model = models.mlp((64, 48, 40, 32, 10), rng=0)
    min_size = min(b.params[k].size for b in model[:-1] for k in b.params if b.params[k].ndim == 2)
    assert x.dtype == np.float32
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    method = make(kind, model, sample_input=x[:8], optimizer=optimizer, **opts, **extra)
    method.train_step(x[:32], y[:32])  # first step allocates optimiser state etc.
    assert float64_arrays_during(lambda: method.train_step(x[32:], y[32:]), min_size) == []
    assert all(p.dtype == np.float32 for b in model for p in b.params.values())


@pytest.mark.parametrize("kind", ["bp", "bll"])
@pytest.mark.parametrize("channels", [(4, 8), (16, 16)])  # the second conv by im2col, by Winograd
def test_float32_cnn_step_has_no_float64_array_of_parameter_size(kind, channels):
    x, y = data.synthetic_images(32, n_classes=4, size=12, rng=0)
    model = models.cnn(image_size=12, channels=channels, n_classes=4, rng=0)
    assert model[1][0].winograd == (min(channels) >= Conv2d.WINOGRAD_MIN_CHANNELS)
    # the second conv's weight (288 or 2304); the feedback solve's (n_classes x n_classes) system is
    # factored in float64 on purpose (feedback.py) and is far smaller than any parameter
    min_size = model[1][0].params["W"].size
    method = make(kind, model, sample_input=x[:8])
    method.train_step(x[:16], y[:16])
    assert float64_arrays_during(lambda: method.train_step(x[16:], y[16:]), min_size) == []


def test_the_tracer_sees_a_float64_array():
    """The detector itself: feedback with decay keeps its running statistics in float64 by design
    (n_classes x n_units); the tracer must report them, and ignore them below the size cut."""
    from bll_ref.feedback import LinearFeedback
    rng = np.random.default_rng(0)
    Y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]
    A = rng.standard_normal((16, 200)).astype(np.float32)
    fb = LinearFeedback(10, 200, decay=0.5)
    found = float64_arrays_during(lambda: fb.fit(Y, A), 1000)
    assert any(name == "sya" and shape == (10, 200) for _, name, shape in found), found
    assert float64_arrays_during(lambda: fb.fit(Y, A), 2001) == []
