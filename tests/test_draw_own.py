"""Every MPI rank builds the model and the method with ``SkipDraws`` (zeros that hold no memory) and
draws the initial weights of its own learners only (``parallel.shard.draw_own``): those get the
same bits as a real build, every other learner stays undrawn, and only the drawn blocks become
resident. (The MPI tests check the end: runs equal to sequential ones, bit for bit.)"""
import gc

import numpy as np
import pytest

from bll_ref import models
from bll_ref.layers.base import SkipDraws, state_dict
from bll_ref.memory import resident_bytes
from bll_ref.methods import make
from bll_ref.parallel.shard import draw_own

MODELS = {
    "mlp float32": lambda rng: models.mlp((30, 40, 20, 10), rng=rng),
    "mlp float64": lambda rng: models.mlp((30, 40, 20, 10), rng=rng, dtype=np.float64),
    "cnn": lambda rng: models.build("cnn", rng=rng),
    "resnet18": lambda rng: models.build("resnet18", rng=rng, width=4),
    "transformer": lambda rng: models.build("transformer", rng=rng),
}


def _states(blocks):
    return [state_dict(b) for b in blocks]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("name", MODELS)
def test_draw_into_gives_the_chosen_blocks_the_bits_of_a_real_build_and_leaves_the_others(name):
    real = _states(MODELS[name](7))
    untouched = _states(MODELS[name](SkipDraws(7)))
    assert any(not _same(r, u) for r, u in zip(real, untouched))  # the build with SkipDraws differs
    for k in range(len(real)):
        g = SkipDraws(7)
        blocks = MODELS[name](g)
        drawn = g.draw_into([a for a in blocks[k].params.values()])
        assert drawn == sum(not _same({p: real[k][p]}, {p: untouched[k][p]}) for p in real[k])
        for j, got in enumerate(_states(blocks)):
            assert _same(got, real[j] if j == k else untouched[j]), (name, k, j)


def test_draw_into_skips_arrays_it_did_not_return_and_forgets_on_request():
    g = SkipDraws(1)
    w = g.uniform(-1, 1, (5, 3)).astype(np.float32)
    assert g.draw_into([np.zeros((5, 3), np.float32)]) == 0 and not w.any()  # same shape, another array
    g.forget()
    assert g.draw_into([w]) == 0 and not w.any()
    g = SkipDraws(1)
    w = g.uniform(-1, 1, (5, 3)).astype(np.float32)
    assert g.draw_into([w, w]) == 1  # drawn once, then no longer noted
    assert np.array_equal(w, np.random.default_rng(1).uniform(-1, 1, (5, 3)).astype(np.float32))


def test_chunked_draws_equal_one_call():
    """Arrays longer than a chunk are drawn piece by piece, the same stream as one call."""
    g = SkipDraws(3)
    w = g.uniform(-0.5, 0.5, 3 * SkipDraws.CHUNK + 17).astype(np.float32)
    after = np.random.Generator(g.bit_generator).uniform(size=4)  # later draws are not shifted
    real = np.random.default_rng(3)
    assert g.draw_into([w]) == 1
    assert np.array_equal(w, real.uniform(-0.5, 0.5, 3 * SkipDraws.CHUNK + 17).astype(np.float32))
    assert np.array_equal(after, real.uniform(size=4))


def _method(rng_model, rng_method, kind):
    x = np.random.default_rng(0).random((8, 1, 28, 28) if kind == "cnn" else (8, 784)).astype(np.float32)
    blocks = models.build("cnn", rng=rng_model) if kind == "cnn" else models.mlp((784, 40, 30, 20, 10), rng=rng_model)
    return make("bll", blocks, sample_input=x, rng=rng_method, n_classes=10, feedback="trained")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_draw_own_gives_its_learners_block_head_and_feedback_and_no_other_learner_anything(kind):
    real = [l.state_dict() for l in _method(5, 5, kind).learners]
    untouched = [l.state_dict() for l in _method(SkipDraws(5), SkipDraws(5), kind).learners]
    for keep in ([0], [1, 2], [len(real) - 1]):
        draws = (SkipDraws(5), SkipDraws(5))
        method = _method(*draws, kind)
        draw_own(method, keep, draws)
        for k, learner in enumerate(method.learners):
            got = learner.state_dict()
            assert _same(got, real[k] if k in keep else untouched[k]), (kind, keep, k)
            if k in keep and k < len(real) - 1:  # a hidden learner: its head and feedback are drawn too
                weights = [key for key in got if key.startswith(("head/params", "feedback/params")) and key.endswith("W")]
                assert len(weights) == 2 and all(got[w].any() and not untouched[k][w].any() for w in weights)
        assert all(not g._undrawn for g in draws)  # the notes are dropped: released blocks can go


def test_only_the_drawn_block_becomes_resident():
    """A 4096-wide MLP built with SkipDraws: drawing its small last block costs a few MB, drawing a
    67 MB block costs that block and not the 134 MB of the whole model."""
    if resident_bytes() is None:
        pytest.skip("no /proc/self/statm here: resident memory cannot be observed")
    models.mlp((8, 8, 2), rng=SkipDraws(0))  # lazy imports outside the measurement
    gc.collect()
    g = SkipDraws(0)
    before = resident_bytes()
    big = models.mlp((4096, 4096, 4096, 10), rng=g)
    assert g.draw_into(list(big[2].params.values())) == 2
    small = resident_bytes() - before
    assert small < 20e6, f"{small / 1e6:.1f} MB resident after drawing a 0.2 MB block"
    assert g.draw_into(list(big[1].params.values())) == 2
    grown = resident_bytes() - before
    assert 55e6 < grown < 100e6, f"{grown / 1e6:.1f} MB resident after drawing one 67 MB block"
    assert big[1].params["0.W"].any() and not big[0].params["0.W"].any()
