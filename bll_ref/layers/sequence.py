"""Sequence layers on (N, T, D): token Embedding, PositionalEncoding, single-head SelfAttention.

Plain array code on either device: the array module follows the input (``xp``), so a model moved
with ``to("cuda")`` runs on CuPy; the NumPy path is the reference. The one place the GPU path
differs is Embedding's gradient (its docstring says why).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, as_float_dtype, as_rng, check_array, register

#: Elements of the one-hot matrix Embedding's GPU gradient builds at a time (bounds its memory).
ONE_HOT_ELEMENTS = 1 << 24

__all__ = ["Embedding", "PositionalEncoding", "SelfAttention", "sinusoidal_table", "ONE_HOT_ELEMENTS"]


@register
class Embedding(Layer):
    """y[n, t] = E[ids[n, t]].

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V; ids must lie in [0, V).
    dim : int
    rng : Generator | int | None
        E ~ N(0, 1) (PyTorch's nn.Embedding default).
    dtype : float32 | float64

    Notes
    -----
    Shapes: ids (N, T) integer -> y (N, T, dim); param E (V, dim). ``backward`` returns None
    (integer ids have no gradient) and scatters dy into grads["E"] (repeated ids add up).

    On the GPU the scatter is a product with the one-hot matrix of the ids, onehot^T dy, in
    chunks of rows: a scatter-add there would use float atomics, whose order (and so the last
    bits) changes from run to run. It costs V x N T x dim multiply-adds, which is small for the
    vocabularies of the sequence tasks here (tens of tokens); a vocabulary of thousands would want
    a sort-based kernel instead.
    """

    def __init__(self, num_embeddings, dim, *, rng=None, dtype=np.float32):
        super().__init__()
        if int(num_embeddings) < 1 or int(dim) < 1:
            raise ValueError(f"Embedding needs positive sizes, got {num_embeddings} x {dim}")
        self.num_embeddings, self.dim = int(num_embeddings), int(dim)
        self.dtype = as_float_dtype(dtype)
        self.params["E"] = as_rng(rng).standard_normal((self.num_embeddings, self.dim)).astype(self.dtype)

    def forward(self, ids, train=True):
        check_array(ids, "Embedding", ndim=2, floating=False)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Embedding expects integer token ids (N, T), got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_embeddings:
            raise ValueError(f"Embedding expects ids in [0, {self.num_embeddings}), "
                             f"got values in [{lo}, {hi}]")
        if train:
            self._cache = ids
        return self.params["E"][ids]

    def backward(self, dy):
        ids = self._cached()
        self._check_dy(dy, (*ids.shape, self.dim))
        xp = array_module(dy)
        if xp is np:
            gE = np.zeros_like(self.params["E"])
            np.add.at(gE, ids, dy)  # unbuffered: a token seen twice gets both contributions
        else:  # deterministic: a GEMM per chunk of rows, chunks added in order (class docstring)
            flat_ids, flat_dy = ids.reshape(-1), dy.reshape(-1, self.dim)
            tokens = xp.arange(self.num_embeddings)
            gE = xp.zeros_like(self.params["E"])
            rows = max(1, ONE_HOT_ELEMENTS // self.num_embeddings)
            for s in range(0, len(flat_ids), rows):
                onehot = (flat_ids[s:s + rows, None] == tokens[None, :]).astype(dy.dtype)
                gE += onehot.T @ flat_dy[s:s + rows]
        self.grads = {"E": gE}
        return None

    def hyperparameters(self):
        return {"num_embeddings": self.num_embeddings, "dim": self.dim, "dtype": self.dtype.name}


def sinusoidal_table(max_len, dim, dtype=np.float64) -> np.ndarray:
    """Vaswani et al. 2017, Sec. 3.5: P[t, 2i] = sin(t / 10000^(2i/dim)), P[t, 2i+1] = cos(...)."""
    t = np.arange(max_len, dtype=np.float64)[:, None]
    freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)
    P = np.zeros((max_len, dim), np.float64)
    P[:, 0::2] = np.sin(t * freq)
    P[:, 1::2] = np.cos(t * freq[: dim // 2])  # odd dim: one fewer cosine column
    return P.astype(dtype)


@register
class PositionalEncoding(Layer):
    """y[n, t] = x[n, t] + P[t] for t < T <= max_len.

    Parameters
    ----------
    max_len, dim : int
    learned : bool
        False: fixed sinusoidal table in ``buffers["P"]``, no params. True: ``params["P"]``
        ~ N(0, 0.02^2) (GPT-2's initialisation), trained.
    rng : Generator | int | None
        Only used when ``learned``.
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, T, dim) -> y (N, T, dim); P (max_len, dim).
    """

    def __init__(self, max_len, dim, *, learned=False, rng=None, dtype=np.float32):
        super().__init__()
        if int(max_len) < 1 or int(dim) < 1:
            raise ValueError(f"PositionalEncoding needs positive sizes, got {max_len} x {dim}")
        self.max_len, self.dim, self.learned = int(max_len), int(dim), bool(learned)
        self.dtype = as_float_dtype(dtype)
        if self.learned:
            self.params["P"] = (0.02 * as_rng(rng).standard_normal((self.max_len, self.dim))).astype(self.dtype)
        else:
            self.buffers["P"] = sinusoidal_table(self.max_len, self.dim, self.dtype)

    @property
    def table(self) -> np.ndarray:
        return self.params["P"] if self.learned else self.buffers["P"]

    def forward(self, x, train=True):
        check_array(x, "PositionalEncoding", ndim=3, tail=(None, self.dim), dtype=self.dtype)
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"PositionalEncoding expects at most max_len={self.max_len} positions, "
                             f"got T={T} (shape {x.shape})")
        if train:
            self._cache = x.shape
        return x + self.table[:T]

    def backward(self, dy):
        shape = self._cached()
        self._check_dy(dy, shape)
        if self.learned:
            gP = array_module(dy).zeros_like(self.params["P"])
            gP[: shape[1]] = dy.sum(axis=0)
            self.grads = {"P": gP}
        else:
            self.grads = {}
        return dy

    def hyperparameters(self):
        return {"max_len": self.max_len, "dim": self.dim, "learned": self.learned,
                "dtype": self.dtype.name}


@register
class SelfAttention(Layer):
    """Single-head scaled dot-product self-attention (Vaswani et al. 2017, Eq. 1).

        Q = x Wq + bq,  K = x Wk + bk,  V = x Wv + bv
        A = softmax(Q K^T / sqrt(dim))   (row-wise; causal: A[t, s] = 0 for s > t)
        y = (A V) Wo + bo

    Parameters
    ----------
    dim : int
    causal : bool
        Position t attends to positions <= t only.
    rng : Generator | int | None
        Weights and biases ~ U(-1/sqrt(dim), 1/sqrt(dim)) (nn.Linear's default, as ``Dense``).
    dtype : float32 | float64

    Notes
    -----
    Shapes: x (N, T, dim) -> y (N, T, dim); params ``W*`` (dim, dim) used as x @ W, ``b*`` (dim,).
    """

    _NAMES = ("q", "k", "v", "o")

    def __init__(self, dim, *, causal=False, rng=None, dtype=np.float32):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"SelfAttention needs dim >= 1, got {dim}")
        self.dim, self.causal, self.dtype = int(dim), bool(causal), as_float_dtype(dtype)
        rng = as_rng(rng)
        bound = 1.0 / np.sqrt(self.dim)
        for n in self._NAMES:
            self.params["W" + n] = rng.uniform(-bound, bound, (self.dim, self.dim)).astype(self.dtype)
        for n in self._NAMES:
            self.params["b" + n] = rng.uniform(-bound, bound, self.dim).astype(self.dtype)

    def forward(self, x, train=True):
        check_array(x, "SelfAttention", ndim=3, tail=(None, self.dim), dtype=self.dtype)
        p, xp = self.params, array_module(x)
        Q, K, V = (x @ p["W" + n] + p["b" + n] for n in "qkv")
        scale = x.dtype.type(1 / np.sqrt(self.dim))
        S = xp.matmul(Q, K.transpose(0, 2, 1)) * scale  # (N, T, T)
        if self.causal:
            T = x.shape[1]
            S = xp.where(xp.tri(T, dtype=bool), S, -np.inf)  # the diagonal keeps every row finite
        A = xp.exp(S - S.max(axis=-1, keepdims=True))  # stable softmax
        A /= A.sum(axis=-1, keepdims=True)
        H = xp.matmul(A, V)
        if train:
            self._cache = (x, Q, K, V, A, H)
        return H @ p["Wo"] + p["bo"]

    def backward(self, dy):
        x, Q, K, V, A, H = self._cached()
        self._check_dy(dy, x.shape)
        p, D, xp = self.params, self.dim, array_module(dy)
        scale = x.dtype.type(1 / np.sqrt(D))

        def flat(a):  # (N, T, D) -> (N*T, D) for the weight gradients
            return a.reshape(-1, D)

        dH = dy @ p["Wo"].T
        dA = xp.matmul(dH, V.transpose(0, 2, 1))
        dV = xp.matmul(A.transpose(0, 2, 1), dH)
        # softmax Jacobian row-wise: dS = A * (dA - sum_s dA A); masked entries have A = 0
        dS = A * (dA - (dA * A).sum(axis=-1, keepdims=True)) * scale
        dQ = xp.matmul(dS, K)
        dK = xp.matmul(dS.transpose(0, 2, 1), Q)
        g = {"Wo": flat(H).T @ flat(dy), "bo": flat(dy).sum(axis=0)}
        dx = xp.zeros_like(x)
        for n, d in (("q", dQ), ("k", dK), ("v", dV)):
            g["W" + n] = flat(x).T @ flat(d)
            g["b" + n] = flat(d).sum(axis=0)
            dx += d @ p["W" + n].T
        self.grads = {k: g[k] for k in p}  # same key order as params
        return dx

    def hyperparameters(self):
        return {"dim": self.dim, "causal": self.causal, "dtype": self.dtype.name}
