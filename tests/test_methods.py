"""Training methods: BP, FA and BLL on small synthetic tasks; block isolation; reproducibility."""
import json

import numpy as np
import pytest

from bll_ref import checkpoint, data, models
from bll_ref.feedback import LinearFeedback
from bll_ref.methods.backprop import Backprop
from bll_ref.methods.bll import BLL, between_class_fraction
from bll_ref.loop import fit
from bll_ref.methods.common import evaluate
from bll_ref.methods.feedback_alignment import FeedbackAlignment
from bll_ref.methods.learner import backward_block, forward_block


def _task(n=1200, n_features=20, n_classes=4, seed=0):
    x, y = data.synthetic_classification(n, n_features=n_features, n_classes=n_classes, rng=seed)
    k = int(0.8 * n)
    return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:]}


def _mlp(seed=0, act="leaky_relu", sizes=(20, 32, 32, 32, 4), dtype=np.float32):
    return models.mlp(sizes, activation_name=act, rng=seed, dtype=dtype)


def _snapshot(blocks):
    return [{k: v.copy() for k, v in b.params.items()} for b in blocks]


def _changed(before, blocks):
    return [any(not np.array_equal(before[i][k], v) for k, v in b.params.items()) for i, b in enumerate(blocks)]


def test_bp_seeded_runs_are_bitwise_reproducible():
    d = _task()
    runs = []
    for _ in range(2):
        m = Backprop(_mlp(seed=3))
        fit(m, d, epochs=1, batch_size=32, rng=7, log=None)
        runs.append(_snapshot(m.model))
    for a, b in zip(*runs):
        for k in a:
            assert np.array_equal(a[k], b[k])


def test_fit_names_the_evaluation_set_in_its_epoch_line():
    """eval_name says what x_test holds (e.g. held-out training images); the default stays "test"."""
    d = _task()
    for name, want in ((None, "test accuracy"), ("val", "val accuracy")):
        lines = []
        fit(Backprop(_mlp(seed=3)), d, epochs=1, batch_size=32, rng=7, log=lines.append,
            **({} if name is None else {"eval_name": name}))
        done = [line for line in lines if "done in" in line]
        assert len(done) == 1 and want in done[0]
        assert name is None or "test accuracy" not in done[0]


def test_bll_seeded_runs_are_bitwise_reproducible():
    d = _task()
    runs = []
    for _ in range(2):
        m = BLL(_mlp(seed=3), n_classes=4, sample_input=d["x_train"][:4], rng=5)
        fit(m, d, epochs=1, batch_size=32, rng=7, log=None)
        runs.append(_snapshot(m.model))
    for a, b in zip(*runs):
        for k in a:
            assert np.array_equal(a[k], b[k])


@pytest.mark.parametrize("method", ["bp", "fa"])
def test_global_methods_learn(method):
    d = _task()
    blocks = _mlp()
    m = Backprop(blocks) if method == "bp" else FeedbackAlignment(blocks, rng=1)
    # FA first has to align the forward weights with its random feedback: it needs more epochs
    h = fit(m, d, epochs=4 if method == "bp" else 8, batch_size=32, rng=0, log=None)
    assert h["test_acc"][-1] > 0.85  # chance is 0.25


def test_fa_uses_fixed_random_backward_matrices():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 20)).astype(np.float32), rng.integers(0, 4, 8)
    fa, bp = FeedbackAlignment(_mlp(), rng=1), Backprop(_mlp())
    fa.model.forward(x), bp.model.forward(x)
    dz = rng.standard_normal((8, 4)).astype(np.float32)
    dx_fa, dx_bp = fa.backward(dz, layer=fa.model[-1]), bp.model[-1].backward(dz)
    assert all("backward" not in vars(l) for l in fa.model[-1])  # FA leaves the model's layers alone
    np.testing.assert_array_equal(fa.model[-1].grads["0.W"], bp.model[-1].grads["0.W"])  # same weight grads
    np.testing.assert_allclose(dx_fa, dz @ fa.feedback[-1].T, rtol=1e-6)
    assert not np.allclose(dx_fa, dx_bp)


BLL_VARIANTS = [
    dict(),  # default recipe
    dict(variational="none"),
    dict(variational="gauss"),
    dict(variational="eq8", feedback="trained", tau=0.5, head=False, act="sigmoid"),
    dict(variational="eq8", feedback="twin", tau=0.5),
    dict(variational="bernoulli_kl", feedback="trained"),
    dict(variational="eq8", feedback="closed", eq8_terms=("forward",)),
    dict(span=2),
]


@pytest.mark.parametrize("opts", BLL_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_one_bll_step_changes_only_its_own_block(opts):
    """Perturb only block k's local loss signal: with span=1 no other block may change; all
    blocks change in a full step (each from its own loss)."""
    opts = dict(opts)
    act = opts.pop("act", "leaky_relu")
    d = _task(n=64)
    m = BLL(_mlp(act=act), n_classes=4, sample_input=d["x_train"][:4], **opts)
    x, y = d["x_train"][:32], d["y_train"][:32]
    # update learner k alone (after every learner's forward), the others must stay untouched
    for k in range(len(m.blocks)):
        before = _snapshot(m.blocks)
        Y = m.one_hot(y)
        b_fb = m.twin.predict_all(Y) if m.twin is not None else [None] * len(m.blocks)
        h = x
        for learner in m.learners:
            h = learner.forward(h)
        m.learners[k].update(y, Y, b_fb[k] if k < len(m.blocks) - 1 else None)
        changed = _changed(before, m.blocks)
        assert changed[k], f"block {k} did not change"
        assert sum(changed) == 1, f"step of block {k} changed blocks {np.flatnonzero(changed)}"


def test_learner_update_needs_a_forward_first():
    d = _task(n=64)
    m = BLL(_mlp(), n_classes=4, sample_input=d["x_train"][:4])
    with pytest.raises(RuntimeError, match="forward"):
        m.learners[0].update(d["y_train"][:8], m.one_hot(d["y_train"][:8]))


def test_span2_step_reaches_exactly_one_neighbour():
    d = _task(n=64)
    m = BLL(_mlp(), n_classes=4, sample_input=d["x_train"][:4], span=2)
    x, y = d["x_train"][:32], d["y_train"][:32]
    Y = m.one_hot(y)
    h = x
    for learner in m.learners:
        h = learner.forward(h)
    before = _snapshot(m.blocks)
    k = 2
    from_above = m.learners[k].update(y, Y)
    assert from_above is not None and from_above.shape == (32, 32)
    assert _changed(before, m.blocks) == [False, False, True, False]
    m.learners[k - 1].update(y, Y, None, from_above)
    assert _changed(before, m.blocks) == [False, True, True, False]


def test_span2_gradient_equals_own_plus_neighbour_loss():
    """BLL(2): block k-1's gradient = grad of its own loss + grad of block k's loss w.r.t. its params."""
    d = _task(n=64)
    kw = dict(n_classes=4, variational="none", optimizer="sgd", lr=1.0)
    m2 = BLL(_mlp(dtype=np.float64), sample_input=d["x_train"][:4].astype(np.float64), span=2, **kw)
    m1 = BLL(_mlp(dtype=np.float64), sample_input=d["x_train"][:4].astype(np.float64), span=1, **kw)
    x, y = d["x_train"][:16].astype(np.float64), d["y_train"][:16]
    w0 = m2.blocks[1].params["0.W"].copy()
    m2.train_step(x, y)
    m1.train_step(x, y)
    delta2, delta1 = w0 - m2.blocks[1].params["0.W"], w0 - m1.blocks[1].params["0.W"]
    # the difference is block 3's head loss backpropagated into block 2: compute it independently
    ref = BLL(_mlp(dtype=np.float64), sample_input=x[:4], span=1, **kw)
    h1 = ref.blocks[0].forward(x, train=True)
    h2 = ref.blocks[1].forward(h1, train=True)
    h3 = ref.blocks[2].forward(h2, train=True)
    from bll_ref.losses.output import softmax_cross_entropy
    head = ref.learners[2].head
    _, dl = softmax_cross_entropy(head.forward(h3, train=True), y)
    dh2 = ref.blocks[2].backward(head.backward(dl))
    ref.blocks[1].backward(dh2)
    np.testing.assert_allclose(delta2 - delta1, ref.blocks[1].grads["0.W"], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(), dict(variational="eq8", feedback="trained", tau=0.5)],
                         ids=["default", "eq8"])
def test_bll_learns_without_collapse(opts):
    d = _task(n=2000)
    m = BLL(_mlp(), n_classes=4, sample_input=d["x_train"][:4], **opts)
    h = fit(m, d, epochs=4, batch_size=32, rng=0, log=None)
    assert h["test_acc"][-1] > 0.85  # chance 0.25
    diag = h["diagnostics"][-1]["blocks"]
    assert len(diag) == 3
    for blk in diag:
        assert blk["between_class_fraction"] > 0.2, blk  # a collapsed block sits near 0


def test_bll_trains_a_cnn_block_locally():
    x, y = data.synthetic_images(600, n_classes=4, size=12, rng=0)
    d = {"x_train": x[:500], "y_train": y[:500], "x_test": x[500:], "y_test": y[500:]}
    blocks = models.cnn(image_size=12, channels=(4, 8), n_classes=4, rng=0)
    m = BLL(blocks, n_classes=4, sample_input=x[:4])
    h = fit(m, d, epochs=3, batch_size=32, rng=0, log=None)
    assert h["test_acc"][-1] > 0.6


def test_between_class_fraction_extremes():
    y = np.repeat(np.arange(3), 10)
    assert between_class_fraction(np.eye(3)[y], y, 3) == pytest.approx(1.0)
    assert between_class_fraction(np.ones((30, 4)), y, 3) == 0.0


def test_linear_feedback_equals_lstsq_on_augmented_system():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 40)
    Y, A = data.one_hot(y, 5, dtype=np.float64), rng.standard_normal((40, 7))
    fb = LinearFeedback(5, 7, l2=0.3, dtype=np.float64).fit(Y, A)
    aug_x = np.vstack([Y, np.sqrt(0.3) * np.eye(5)])
    aug_a = np.vstack([A, np.zeros((5, 7))])
    ref = np.linalg.lstsq(aug_x, aug_a, rcond=None)[0]
    np.testing.assert_allclose(fb.W, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fb.predict(Y), Y @ ref, rtol=1e-10, atol=1e-12)


def test_linear_feedback_missing_class_in_batch():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 30)  # class 4 absent: YᵀY is singular without the ridge term
    Y, A = data.one_hot(y, 5, dtype=np.float64), rng.standard_normal((30, 3))
    fb = LinearFeedback(5, 3, l2=1.0, dtype=np.float64).fit(Y, A)
    assert np.all(np.isfinite(fb.W)) and np.allclose(fb.W[4], 0)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        LinearFeedback(5, 3, l2=0)


def test_linear_feedback_running_statistics_span_batches():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    Y, A = data.one_hot(y, 3, dtype=np.float64), rng.standard_normal((60, 4))
    fb = LinearFeedback(3, 4, l2=1.0, decay=0.5, dtype=np.float64)
    fb.fit(Y[:30], A[:30]).fit(Y[30:], A[30:])
    syy = 0.5 * Y[:30].T @ Y[:30] + Y[30:].T @ Y[30:]
    sya = 0.5 * Y[:30].T @ A[:30] + Y[30:].T @ A[30:]
    np.testing.assert_allclose(fb.W, np.linalg.solve(syy + np.eye(3), sya), rtol=1e-10)


def test_bll_rejects_bad_options():
    x = np.zeros((2, 20), np.float32)
    with pytest.raises(ValueError, match="variational"):
        BLL(_mlp(), sample_input=x, variational="foo")
    with pytest.raises(ValueError, match="span"):
        BLL(_mlp(), sample_input=x, span=3)
    with pytest.raises(ValueError, match="no signal"):
        BLL(_mlp(), sample_input=x, variational="none", head=False)


def test_checkpoint_round_trip_and_errors(tmp_path):
    d = _task(n=200)
    m = Backprop(models.cnn(in_channels=1, image_size=8, channels=(3,), n_classes=4, rng=0))
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    m.train_step(x, d["y_train"][:16])
    p = tmp_path / "ck.npz"
    checkpoint.save(p, m.model, {"note": "x"}, {"extra": np.arange(3)})
    model, meta, aux = checkpoint.load(p)
    np.testing.assert_array_equal(model.forward(x, train=False), m.model.forward(x, train=False))
    assert meta == {"note": "x"} and list(aux["extra"]) == [0, 1, 2]
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        checkpoint.load(p)


def test_cli_train_eval_round_trip(tmp_path, capsys):
    from bll_ref.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--method", "bll", "--data", "synthetic", "--sizes", "784,32,10", "--epochs", "1",
               "--limit-train", "300", "--limit-test", "100", "--out", str(out)])
    assert rc == 0
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["test_acc"]) == 1 and len(hist["diagnostics"][0]["blocks"]) == 1
    assert main(["eval", str(out / "checkpoint.npz"), "--data", "synthetic", "--limit-test", "100"]) == 0
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("feedback", ["trained", "twin"])
def test_bll_optimizer_choice_reaches_feedback_and_heads(feedback):
    from bll_ref.optim import SGD
    m = BLL(_mlp(), n_classes=4, sample_input=np.zeros((2, 20), np.float32), variational="eq8",
            feedback=feedback, optimizer="sgd", lr=0.1)
    hidden = m.learners[:-1]
    opts = [l.feedback.opt for l in hidden] if feedback == "trained" else m.twin.opts
    assert all(isinstance(o, SGD) for o in opts + [l.head_opt for l in hidden] + [l.opt for l in m.learners])


@pytest.mark.parametrize("terms", [("forward",), ("posterior",), ("forward", "posterior")])
def test_eq8_terms_select_the_printed_terms(terms):
    """Eq. 8: g_a = (-(rho - alpha) [forward] + rho(1 - rho) b [posterior]) / N, selected by eq8_terms."""
    rng = np.random.default_rng(0)
    m = BLL(_mlp(dtype=np.float64), n_classes=4, sample_input=rng.standard_normal((2, 20)), variational="eq8",
            feedback="trained", m=0.5, eq8_terms=terms, use_kernels=False)
    a, b = rng.standard_normal((6, 32)), rng.standard_normal((6, 32))
    _, g_a, g_b, _ = m.learners[0].variational(a, None, b)
    S = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    rho, alpha = S(a + 0.5 * b), S(a)
    want = (-(rho - alpha) * ("forward" in terms) + rho * (1 - rho) * b * ("posterior" in terms)) / 6
    np.testing.assert_allclose(g_a, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_b, rho * (1 - rho) * b / 6, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="non-empty"):
        BLL(_mlp(), n_classes=4, sample_input=np.zeros((2, 20), np.float32), variational="eq8", eq8_terms=())


def test_default_recipe_block_gradient_equals_finite_differences():
    """The default local loss of a hidden block, w * 0.5 ||LN(a) - b||^2 / (N D) + w_h CE(head(h), y)
    with the feedback message b held fixed (it is solved, not differentiated), has exactly the
    gradient the block receives."""
    from bll_ref.gradcheck import numeric_gradient, rel_error
    from bll_ref.losses.output import softmax_cross_entropy
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((6, 20)), rng.integers(0, 4, 6)
    m = BLL(_mlp(dtype=np.float64, sizes=(20, 7, 5, 4)), n_classes=4, sample_input=x[:2], anneal=False,
            var_weight=0.7, head_weight=1.3)
    learner, Y = m.learners[0], data.one_hot(y, 4, dtype=np.float64)
    blk, head = learner.block, learner.head
    a, h = forward_block(blk, x, train=True)
    _, g_a, _, _ = learner.variational(a, Y, None)
    b = learner.feedback.predict(Y)
    _, dl = softmax_cross_entropy(head.forward(h, train=True), y)
    backward_block(blk, head.backward(dl * 1.3), g_a, need_dx=False)
    analytic = {k: v.copy() for k, v in blk.grads.items()}

    def loss():
        a, h = forward_block(blk, x, train=True)
        z = learner.norm.forward(a, train=True)
        var = 0.7 * 0.5 * ((z - b) ** 2).sum() / (len(x) * z.shape[1])
        return var + 1.3 * softmax_cross_entropy(head.forward(h, train=True), y)[0]

    for k, p in blk.params.items():
        assert rel_error(analytic[k], numeric_gradient(loss, p)) < 1e-6, k


def test_bll_state_round_trip_and_foreign_entries_refused():
    d = _task(n=64)
    a = BLL(_mlp(seed=1), n_classes=4, sample_input=d["x_train"][:4])
    fit(a, d, epochs=1, batch_size=32, rng=0, log=None)
    b = BLL(_mlp(seed=2), n_classes=4, sample_input=d["x_train"][:4], rng=9)
    b.load_state_dict(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    for bad in ({**sa, "learner9/epoch": np.int64(0)}, {**sa, "head0/W": np.zeros(1)}):
        with pytest.raises(ValueError, match="learner"):
            b.load_state_dict(bad)
