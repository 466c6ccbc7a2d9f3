"""Pred-Sim (Nøkland & Eidnes 2019) as BLL's variational='sim': the similarity-matching loss and its
gradient against central finite differences in float64, hand-computed similarity matrices, and the
gradient the learner applies to its block."""
import numpy as np
import pytest

from bll_ref import models
from bll_ref.gradcheck import numeric_gradient, rel_error
from bll_ref.layers import Sequential
from bll_ref.losses import predsim
from bll_ref.methods import BLL, make
from bll_ref.methods.learner import forward_block


def _one_hot(y, c):
    return np.eye(c)[y]


@pytest.mark.parametrize("shape", [(7, 5, 3, 4), (7, 3, 4, 4), (7, 6, 1, 1), (7, 9), (7, 2, 5)])
def test_sim_loss_gradient_matches_central_differences(shape):
    """Std-pooled images (C > 3, HW > 1), flattened images (C <= 3 or 1x1), dense and 3-d features."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal(shape)
    Y = _one_hot(rng.integers(0, 4, shape[0]), 4)
    loss, g = predsim.sim_loss(h, Y)
    assert loss > 0 and g.shape == h.shape and g.dtype == np.float64
    num = numeric_gradient(lambda: predsim.sim_loss(h, Y)[0], h)
    assert rel_error(g, num) < 1e-6


def test_sim_loss_gradient_with_a_dead_channel_and_a_constant_row():
    """ReLU outputs: a channel that is 0 everywhere (std = sqrt(STD_EPS)) stays finite; a
    constant feature row (centred norm 0) has a finite gradient too."""
    rng = np.random.default_rng(1)
    h = np.maximum(rng.standard_normal((6, 5, 3, 3)), 0)
    h[:, 2] = 0.0
    Y = _one_hot(np.array([0, 1, 2, 0, 1, 2]), 3)
    loss, g = predsim.sim_loss(h, Y)
    assert np.isfinite(loss) and np.isfinite(g).all()
    assert rel_error(g, numeric_gradient(lambda: predsim.sim_loss(h, Y)[0], h)) < 1e-5
    flat = rng.standard_normal((5, 4))
    flat[3] = 2.5  # constant row
    loss, g = predsim.sim_loss(flat, _one_hot(np.array([0, 1, 0, 1, 2]), 3))
    assert np.isfinite(g).all()


def test_label_similarity_is_one_within_and_minus_one_over_c_minus_one_across_classes():
    """Centred one-hot rows: cos = 1 for the same class, -1/(C-1) for different classes."""
    y = np.array([0, 1, 1, 3, 0])
    S, _ = predsim.similarity_matrix(_one_hot(y, 4))
    want = np.where(y[:, None] == y[None, :], 1.0, -1.0 / 3)
    np.testing.assert_allclose(S, want, atol=1e-7)


def test_similarity_is_adjusted_cosine_and_std_pool_is_unbiased_std():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6))
    S, _ = predsim.similarity_matrix(x)
    xc = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(S, np.corrcoef(x), atol=1e-7)  # row-centred cosine = correlation
    np.testing.assert_allclose(np.diag(S), np.sum(xc * xc, 1) / (np.linalg.norm(xc, axis=1) + 1e-8) ** 2)
    h = rng.standard_normal((3, 5, 4, 2))
    s, _ = predsim.std_pool(h)
    np.testing.assert_allclose(s, h.reshape(3, 5, -1).std(axis=2, ddof=1), rtol=1e-7)


def test_loss_is_zero_when_features_are_the_labels():
    Y = _one_hot(np.array([0, 2, 1, 2, 0, 1]), 3)
    loss, g = predsim.sim_loss(Y.copy(), Y)
    assert loss < 1e-12 and np.abs(g).max() < 1e-6
    loss_shuffled, _ = predsim.sim_loss(Y[::-1].copy(), Y)
    assert loss_shuffled > 0.1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2 examples"):
        predsim.sim_loss(np.ones((1, 3)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="label rows"):
        predsim.sim_loss(np.ones((3, 3)), np.ones((2, 2)))


@pytest.mark.parametrize("builder", ["mlp", "cnn"])
def test_learner_applies_var_weight_times_the_sim_gradient_to_its_block(builder):
    """head=False: every hidden block's gradient (params put back to their pre-step values) equals the finite-difference gradient of
    var_weight * sim_loss(block output) w.r.t. that block's parameters (BatchNorm in train mode)."""
    rng = np.random.default_rng(3)
    if builder == "mlp":
        blocks = models.mlp((6, 5, 4, 3), activation_name="tanh", rng=0, dtype=np.float64)
        x = rng.standard_normal((8, 6))
    else:
        blocks = models.cnn(image_size=6, channels=(4, 5), n_classes=3, rng=0, dtype=np.float64)
        x = rng.standard_normal((8, 1, 6, 6))
    y = rng.integers(0, 3, 8)
    Y = _one_hot(y, 3)
    m = BLL(blocks, n_classes=3, variational="sim", head=False, var_weight=2.5, optimizer="sgd", lr=0.1,
            sample_input=x, use_kernels=False)
    before = [{n: p.copy() for n, p in b.params.items()} for b in blocks]
    m.train_step(x, y)
    for b, old in zip(blocks, before):
        for n, p in b.params.items():
            p[...] = old[n]
    h = x
    for k, block in enumerate(blocks[:-1]):
        analytic = {n: g.copy() for n, g in block.grads.items()}
        inp = h

        def loss():
            return 2.5 * predsim.sim_loss(forward_block(block, inp, True)[1], Y)[0]

        for name, p in block.params.items():  # atol: a conv bias before BatchNorm has gradient 0
            np.testing.assert_allclose(analytic[name], numeric_gradient(loss, p), rtol=1e-5, atol=1e-8,
                                       err_msg=f"block {k} {name}")
        assert max(np.abs(g).max() for g in analytic.values()) > 1e-4, k  # the term reaches the block
        h = forward_block(block, h, True)[1]  # the train-mode output the next learner saw


def test_predsim_defaults_no_feedback_and_refusals():
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    m = make("bll", models.mlp((6, 5, 4, 3), rng=0), sample_input=x, n_classes=3, variational="sim")
    assert m.rule.var_weight == 99.0 and m.rule.use_head
    assert all(l.feedback is None for l in m.learners[:-1]) and m.twin is None
    assert not any("feedback" in k for k in m.state_dict())
    for bad in (dict(feedback="closed"), dict(tau=1.0), dict(m=0.5), dict(anneal=False), dict(l2=1.0)):
        with pytest.raises(ValueError, match="does not apply"):
            make("bll", models.mlp((6, 5, 4, 3), rng=0), sample_input=x, variational="sim", **bad)


def test_similarity_term_alone_separates_classes_and_state_round_trips():
    """Sim only (head=False) on a separable toy task: the class separation of block 2's output rises
    from its initial value (0.69 here) to > 0.9 and the model classifies; the state reloads exactly."""
    from bll_ref.methods import between_class_fraction, evaluate
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((4, 10)) * 2
    y = rng.integers(0, 4, 512)
    x = (centres[y] + rng.standard_normal((512, 10))).astype(np.float32)
    m = make("bll", models.mlp((10, 16, 16, 4), rng=0), sample_input=x, n_classes=4, variational="sim",
             head=False, lr=1e-2)

    def separation():
        return between_class_fraction(Sequential(*m.blocks[:2]).forward(x, train=False), y, 4)

    start = separation()
    for _ in range(5):
        for i in range(0, 512, 32):
            m.train_step(x[i:i + 32], y[i:i + 32])
    assert start < 0.8 and separation() > 0.9
    assert evaluate(m.model, x, y) > 0.9
    clone = make("bll", models.mlp((10, 16, 16, 4), rng=1), sample_input=x, n_classes=4, variational="sim",
                 head=False, lr=1e-2)
    clone.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(Sequential(*clone.blocks).forward(x, train=False),
                                  Sequential(*m.blocks).forward(x, train=False))


def test_cli_trains_predsim_and_refuses_feedback_options(tmp_path, capsys):
    import json
    from bll_ref.cli import main as cli_main
    common = ["train", "--variational", "sim", "--data", "synthetic", "--limit-train", "64", "--limit-test", "32",
              "--sizes", "784,8,8,10", "--batch-size", "32", "--epochs", "1"]
    assert cli_main([*common, "--out", str(tmp_path / "ok")]) == 0
    h = json.loads((tmp_path / "ok" / "history.json").read_text())
    blocks = h["diagnostics"][-1]["blocks"]
    assert len(blocks) == 2 and all(b["var_loss"] > 0 and b["mean_abs_b"] == 0 for b in blocks)
    capsys.readouterr()
    assert cli_main([*common, "--feedback", "closed", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "feedback" in err[0] and "variational='sim'" in err[0]
