"""The timing tools of benchmarks/ (phase clock, bursts, GEMM-alone roofline) on a tiny MLP.

They are not timed here (speed is never asserted by a unit test); what is checked is that they
measure what they say: every phase is attributed, the work counted per phase is the model's,
the patches are undone, and a burst separates the first step from the rest.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from common import interleaved_bursts  # noqa: E402
from phases import PHASES, PhaseClock, phase_table  # noqa: E402

from bll_ref import models, optim  # noqa: E402
from bll_ref.layers import dense  # noqa: E402
from bll_ref.methods import make  # noqa: E402

SIZES = (12, 16, 16, 4)


def _step(kind):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, SIZES[0])).astype(np.float32), rng.integers(0, 4, 8)
    extra = {"n_classes": 4} if kind == "bll" else {}
    method = make(kind, models.mlp(SIZES, rng=0), sample_input=x, **extra)
    return method, (lambda: method.train_step(x, y))


@pytest.mark.parametrize("kind", ["bp", "bll"])
def test_phase_table_attributes_the_step_and_counts_the_models_work(kind):
    method, step = _step(kind)
    total, rows, by_name = phase_table(step, repeats=3, gemm_rate=1e11, bandwidth={p: 1e10 for p in PHASES})
    assert set(rows) == set(PHASES) and total > 0
    assert rows["forward GEMM"]["ms"] > 0 and rows["optimiser"]["ms"] > 0
    # forward GEMM FLOPs: 2 N in out per Dense of the model (BLL adds its local heads: at least that)
    model_fwd = sum(2 * 8 * i * o for i, o in zip(SIZES[:-1], SIZES[1:]))
    assert rows["forward GEMM"]["gflop"] * 1e9 >= model_fwd
    # optimiser bytes: 7 float32 words per Adam parameter, every optimiser of the method counted
    n_params = sum(p.size for p in method.model.params.values())
    assert rows["optimiser"]["mbytes"] * 1e6 >= 7 * 4 * n_params
    if kind == "bll":
        assert rows["local losses"]["ms"] > 0 and rows["feedback solves"]["ms"] > 0
    assert "Adam.step" in by_name
    # the patches are undone
    assert dense.Dense.forward.__qualname__ == "Dense.forward"
    assert optim.Adam.step.__qualname__ == "Adam.step"


def test_phase_clock_counts_exclusive_time_of_nested_calls():
    clock = PhaseClock()
    with clock.active():
        method, step = _step("bp")
        step()
    inner = sum(clock.seconds[p] for p in PHASES)
    assert all(v >= 0 for v in clock.seconds.values()) and inner > 0


def test_bursts_separate_the_first_step_of_each_round():
    calls = []

    def make_fn(name):
        def f():
            calls.append(name)
        return f
    warm, cold = interleaved_bursts({"a": make_fn("a"), "b": make_fn("b")}, repeats=2, burst=3, warmup=1)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert set(warm) == set(cold) == {"a", "b"}
    with pytest.raises(ValueError, match="burst"):
        interleaved_bursts({"a": make_fn("a")}, burst=1)
