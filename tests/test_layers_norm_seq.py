"""BatchNorm, LayerNorm, Embedding, PositionalEncoding, SelfAttention: gradients, modes, errors."""
import json

import numpy as np
import pytest

from bll_ref.gradcheck import check_layer, numeric_gradient
from bll_ref.layers import (BatchNorm, Embedding, LayerNorm, PositionalEncoding, SelfAttention,
                            layer_from_config)

TOL = 1e-6
F64 = np.float64


def assert_grads_ok(errors):
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative gradient errors above {TOL}: {bad} (all: {errors})"


def randomise_params(layer, rng, scale=0.5):
    """Non-trivial gamma/beta etc. so gradient checks do not sit at the identity initialisation."""
    for v in layer.params.values():
        v[...] = v + scale * rng.standard_normal(v.shape)


# --- BatchNorm -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("image", [False, True])
def test_batchnorm_train_gradients(seed, image):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(1, 4))
    # batch size 1 is legal for images (H*W values per channel), not for (N, C)
    N = int(rng.integers(1, 4)) if image else int(rng.integers(2, 6))
    shape = (N, C, int(rng.integers(2, 4)), int(rng.integers(2, 4))) if image else (N, C)
    if seed == 0 and image:
        shape = (1,) + shape[1:]
    bn = BatchNorm(C, dtype=F64)
    randomise_params(bn, rng)
    x = 2.0 * rng.standard_normal(shape) + 0.5
    assert_grads_ok(check_layer(bn, x, rng=seed))


@pytest.mark.parametrize("image", [False, True])
def test_batchnorm_eval_gradients_via_frozen_statistics(image):
    """Eval math = frozen mode (train=True, use_batch_stats=False); check that mode's backward."""
    rng = np.random.default_rng(7)
    C = 3
    shape = (4, C, 3, 2) if image else (5, C)
    bn = BatchNorm(C, momentum=0.3, dtype=F64)
    randomise_params(bn, rng)
    for _ in range(4):  # move the running statistics away from (0, 1)
        bn.forward(3.0 * rng.standard_normal(shape) + 1.0, train=True)
    running = {k: v.copy() for k, v in bn.buffers.items()}

    x = rng.standard_normal((1,) + shape[1:])  # batch size 1 is fine in eval
    np.testing.assert_array_equal(bn.forward(x, train=False),
                                  bn.forward(x, train=True, use_batch_stats=False))
    assert_grads_ok(check_layer(bn, x, rng=1, forward_kwargs={"use_batch_stats": False}))
    for k, v in bn.buffers.items():  # neither eval nor frozen forwards touch the statistics
        np.testing.assert_array_equal(v, running[k])

    # and the eval-mode dx is the closed form dy * gamma / sqrt(running_var + eps)
    bshape = (1, C, 1, 1) if image else (1, C)
    bn.forward(x, train=True, use_batch_stats=False)
    dy = rng.standard_normal(x.shape)
    want = dy * (bn.params["gamma"] / np.sqrt(running["running_var"] + bn.eps)).reshape(bshape)
    np.testing.assert_allclose(bn.backward(dy), want, rtol=1e-12)


def test_batchnorm_eval_forward_uses_running_statistics():
    rng = np.random.default_rng(3)
    bn = BatchNorm(2, eps=1e-3, dtype=F64)
    randomise_params(bn, rng)
    bn.buffers["running_mean"][...] = [0.5, -1.0]
    bn.buffers["running_var"][...] = [4.0, 0.25]
    x = rng.standard_normal((3, 2, 2, 2))
    g, b = bn.params["gamma"], bn.params["beta"]
    want = np.empty_like(x)
    for c in range(2):
        want[:, c] = g[c] * (x[:, c] - bn.buffers["running_mean"][c]) \
            / np.sqrt(bn.buffers["running_var"][c] + 1e-3) + b[c]
    np.testing.assert_allclose(bn.forward(x, train=False), want, rtol=1e-12)


def test_batchnorm_running_stats_match_hand_computation():
    rng = np.random.default_rng(11)
    mom, C = 0.25, 3
    bn = BatchNorm(C, momentum=mom, dtype=F64)
    rm, rv = np.zeros(C), np.ones(C)
    for shape in [(4, C, 2, 3), (2, C, 3, 3), (5, C, 1, 2)]:
        x = 2.0 * rng.standard_normal(shape) + rng.standard_normal((1, C, 1, 1))
        y = bn.forward(x, train=True)
        per_channel = x.transpose(1, 0, 2, 3).reshape(C, -1)
        mean, m = per_channel.mean(axis=1), per_channel.shape[1]
        unbiased = ((per_channel - mean[:, None]) ** 2).sum(axis=1) / (m - 1)
        rm = (1 - mom) * rm + mom * mean
        rv = (1 - mom) * rv + mom * unbiased
        np.testing.assert_allclose(bn.buffers["running_mean"], rm, rtol=1e-12)
        np.testing.assert_allclose(bn.buffers["running_var"], rv, rtol=1e-12)
        # train output is normalised with the biased batch variance (gamma=1, beta=0)
        yc = y.transpose(1, 0, 2, 3).reshape(C, -1)
        np.testing.assert_allclose(yc.mean(axis=1), 0.0, atol=1e-12)
        np.testing.assert_allclose(yc.var(axis=1), per_channel.var(axis=1)
                                   / (per_channel.var(axis=1) + bn.eps), rtol=1e-10)
    # (N, C) input: statistics over the batch axis only
    x = rng.standard_normal((6, C))
    bn.forward(x, train=True)
    np.testing.assert_allclose(bn.buffers["running_mean"], (1 - mom) * rm + mom * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"],
                               (1 - mom) * rv + mom * x.var(0, ddof=1), rtol=1e-12)


def test_batchnorm_eval_forward_does_not_cache():
    bn = BatchNorm(2, dtype=F64)
    bn.forward(np.ones((3, 2)), train=False)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.ones((3, 2)))


def test_batchnorm_batch_stats_need_more_than_one_value():
    bn = BatchNorm(3, dtype=F64)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(np.ones((1, 3)), train=True)
    assert bn.forward(np.ones((1, 3)), train=False).shape == (1, 3)  # running stats are fine


# --- LayerNorm -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("seq", [False, True])
def test_layernorm_gradients(seed, affine, seq):
    rng = np.random.default_rng(100 + seed)
    # D >= 3: at D = 2 without affine the output is +-1 up to O(eps) and its gradient is noise
    D = int(rng.integers(3, 7))
    N = 1 if seed == 0 else int(rng.integers(1, 4))
    shape = (N, int(rng.integers(1, 4)), D) if seq else (N, D)
    ln = LayerNorm(D, affine=affine, dtype=F64)
    randomise_params(ln, rng)
    assert set(ln.params) == ({"gamma", "beta"} if affine else set())
    x = 1.5 * rng.standard_normal(shape) - 0.3
    errors = check_layer(ln, x, rng=seed)
    assert set(errors) == {"x"} | set(ln.params)
    assert_grads_ok(errors)


def test_layernorm_normalises_last_axis():
    rng = np.random.default_rng(5)
    x = 3.0 * rng.standard_normal((2, 4, 6)) + 2.0
    y = LayerNorm(6, affine=False, eps=1e-12, dtype=F64).forward(x, train=False)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-9)


# --- SelfAttention ---------------------------------------------------------------------------

def attention_reference(layer, x):
    """Per-sample, per-position loops: the textbook formula without batching tricks."""
    p, (N, T, D) = layer.params, x.shape
    y = np.empty_like(x)
    for n in range(N):
        Q, K, V = (x[n] @ p["W" + c] + p["b" + c] for c in "qkv")
        for t in range(T):
            keep = t + 1 if layer.causal else T
            s = np.array([Q[t] @ K[j] for j in range(keep)]) / np.sqrt(D)
            a = np.exp(s - s.max())
            a /= a.sum()
            y[n, t] = (a @ V[:keep]) @ p["Wo"] + p["bo"]
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,T,D", [(1, 1, 2), (1, 4, 3), (2, 3, 4), (3, 5, 2)])
def test_selfattention_gradients(causal, N, T, D):
    rng = np.random.default_rng(N * 100 + T * 10 + D)
    att = SelfAttention(D, causal=causal, rng=rng, dtype=F64)
    x = rng.standard_normal((N, T, D))
    np.testing.assert_allclose(att.forward(x, train=False), attention_reference(att, x), rtol=1e-10, atol=1e-12)
    errors = check_layer(att, x, rng=1)
    assert set(errors) == {"x", "Wq", "Wk", "Wv", "Wo", "bq", "bk", "bv", "bo"}
    # softmax ignores a per-row constant, and Q bk is constant along each row of the scores: the
    # true gradient of bk is exactly 0, so a relative error is meaningless; check it absolutely
    np.testing.assert_allclose(att.grads["bk"], 0.0, atol=1e-12)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    numeric = numeric_gradient(lambda: float(np.sum(att.forward(x) * dy)), att.params["bk"])
    np.testing.assert_allclose(numeric, 0.0, atol=1e-8)
    assert_grads_ok({k: v for k, v in errors.items() if k != "bk"})
    assert {k: v.shape for k, v in att.grads.items()} == {k: v.shape for k, v in att.params.items()}


def test_selfattention_causal_output_ignores_future_positions():
    rng = np.random.default_rng(2)
    att = SelfAttention(4, causal=True, rng=0, dtype=F64)
    x = rng.standard_normal((2, 6, 4))
    y = att.forward(x, train=False)
    for t in range(6):
        x2 = x.copy()
        x2[:, t + 1:] = 10.0 * rng.standard_normal(x2[:, t + 1:].shape)
        y2 = att.forward(x2, train=False)
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        if t < 5:  # sanity: the future did change something
            assert not np.allclose(y2[:, t + 1:], y[:, t + 1:])
    # without the mask, earlier positions do see later ones
    full = SelfAttention(4, causal=False, rng=0, dtype=F64)
    x2 = x.copy()
    x2[:, -1] += 1.0
    assert not np.allclose(full.forward(x2, train=False)[:, 0], full.forward(x, train=False)[:, 0])


def test_selfattention_softmax_is_stable_for_large_scores():
    att = SelfAttention(3, causal=True, rng=0, dtype=np.float32)
    x = np.full((1, 4, 3), 1e4, np.float32)
    x[0, ::2] *= -1
    y = att.forward(x)
    dx = att.backward(np.ones_like(y))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in att.grads.values())


# --- Embedding -------------------------------------------------------------------------------

def test_embedding_forward_and_gradient_equal_manual_scatter():
    rng = np.random.default_rng(4)
    emb = Embedding(7, 3, rng=0, dtype=F64)
    ids = np.array([[0, 3, 3, 6], [3, 1, 0, 0]])  # repeated ids must accumulate
    y = emb.forward(ids)
    assert y.shape == (2, 4, 3)
    np.testing.assert_array_equal(y, emb.params["E"][ids])
    dy = rng.standard_normal(y.shape)
    assert emb.backward(dy) is None
    manual = np.zeros((7, 3))
    for n in range(2):
        for t in range(4):
            manual[ids[n, t]] += dy[n, t]
    np.testing.assert_allclose(emb.grads["E"], manual, rtol=1e-15)
    np.testing.assert_array_equal(emb.grads["E"][[2, 4, 5]], 0.0)


@pytest.mark.parametrize("int_dtype", [np.int64, np.int32, np.uint8])
def test_embedding_gradcheck(int_dtype):
    rng = np.random.default_rng(6)
    emb = Embedding(5, 4, rng=rng, dtype=F64)
    ids = rng.integers(0, 5, (1, 6)).astype(int_dtype)
    errors = check_layer(emb, ids, rng=2)
    assert set(errors) == {"E"}
    assert_grads_ok(errors)


@pytest.mark.parametrize("ids, match", [
    (np.zeros((2, 3), np.float32), "integer token ids"),
    (np.array([[0, 5]]), r"ids in \[0, 5\), got values in \[0, 5\]"),
    (np.array([[-1, 2]]), r"ids in \[0, 5\), got values in \[-1, 2\]"),
    (np.zeros(4, np.int64), "2-d input, got shape"),
])
def test_embedding_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        Embedding(5, 2, rng=0).forward(ids)


# --- PositionalEncoding ----------------------------------------------------------------------

def test_positional_encoding_sinusoidal_values():
    pe = PositionalEncoding(10, 5, dtype=F64)
    assert pe.params == {} and set(pe.buffers) == {"P"}
    P = pe.buffers["P"]
    for t in (0, 3, 9):
        for i in range(5):
            angle = t / 10000 ** (2 * (i // 2) / 5)
            assert P[t, i] == pytest.approx(np.sin(angle) if i % 2 == 0 else np.cos(angle), abs=1e-15)
    x = np.random.default_rng(0).standard_normal((2, 4, 5))
    np.testing.assert_array_equal(pe.forward(x, train=False), x + P[:4])


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 4), (2, 6, 4)])
def test_positional_encoding_gradients(learned, shape):
    pe = PositionalEncoding(6, 4, learned=learned, rng=0, dtype=F64)
    x = np.random.default_rng(1).standard_normal(shape)
    errors = check_layer(pe, x, rng=3)
    assert set(errors) == ({"x", "P"} if learned else {"x"})
    assert_grads_ok(errors)
    if learned:  # rows beyond T get no gradient
        np.testing.assert_array_equal(pe.grads["P"][shape[1]:], 0.0)


def test_positional_encoding_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="max_len=4.*got T=5"):
        PositionalEncoding(4, 2).forward(np.zeros((1, 5, 2), np.float32))


# --- shared protocol: errors, dtypes, config -------------------------------------------------

def make_layers(dtype=np.float32):
    return {
        "bn": (BatchNorm(3, dtype=dtype), (4, 3, 2, 2)),
        "bn2d": (BatchNorm(3, dtype=dtype), (4, 3)),
        "ln": (LayerNorm(4, dtype=dtype), (2, 3, 4)),
        "ln_plain": (LayerNorm(4, affine=False, dtype=dtype), (2, 4)),
        "att": (SelfAttention(4, rng=0, dtype=dtype), (2, 3, 4)),
        "att_causal": (SelfAttention(4, causal=True, rng=0, dtype=dtype), (2, 3, 4)),
        "pe": (PositionalEncoding(5, 4, dtype=dtype), (2, 3, 4)),
        "pe_learned": (PositionalEncoding(5, 4, learned=True, rng=0, dtype=dtype), (2, 3, 4)),
    }


@pytest.mark.parametrize("name", list(make_layers()))
def test_wrong_shape_and_dtype_raise_value_error(name):
    layer, shape = make_layers()[name]
    x = np.zeros(shape, np.float32)
    bad_last = x[..., :-1] if x.ndim != 4 else x[:, :-1]
    with pytest.raises(ValueError, match=r"expects .*got .*\(") as e:
        layer.forward(bad_last)
    assert str(bad_last.shape) in str(e.value)
    with pytest.raises(ValueError, match="-d input, got shape"):
        layer.forward(np.zeros((5,), np.float32))
    with pytest.raises(ValueError, match="expects dtype float32, got float64"):
        layer.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="expects dtype float32, got int64"):
        layer.forward(x.astype(np.int64))
    layer.forward(x)
    dy_shape = (shape[0] + 1,) + shape[1:]
    with pytest.raises(ValueError, match="expects dy of shape"):
        layer.backward(np.zeros(dy_shape, np.float32))


@pytest.mark.parametrize("name", list(make_layers()) + ["emb"])
def test_backward_before_forward_raises_runtime_error(name):
    layer = Embedding(4, 2) if name == "emb" else make_layers()[name][0]
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros((2, 3, 4), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(make_layers()) + ["emb"])
def test_dtype_preserved_end_to_end_and_config_round_trip(name, dtype):
    if name == "emb":
        layer, x = Embedding(6, 4, rng=0, dtype=dtype), np.array([[1, 5, 0]])
    else:
        layer, shape = make_layers(dtype)[name]
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y = layer.forward(x)
    assert y.dtype == dtype
    dx = layer.backward(np.ones_like(y) * 0.5)
    if name != "emb":
        assert dx.dtype == dtype and dx.shape == x.shape
    assert {k: (v.shape, v.dtype) for k, v in layer.grads.items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.params.items()}
    assert all(v.dtype == dtype for v in layer.buffers.values())

    clone = layer_from_config(layer.config())
    assert type(clone) is type(layer)
    assert clone.config() == layer.config()
    assert {k: (v.shape, v.dtype) for k, v in clone.params.items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.params.items()}
    assert {k: (v.shape, v.dtype) for k, v in clone.buffers.items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.buffers.items()}
    assert json.loads(json.dumps(layer.config())) == layer.config()
