"""Layer protocol shared by every layer, block and model (docs/architecture.md, "The layer protocol").

    y  = layer.forward(x, train=True)   # caches what backward needs (only when train=True)
    dx = layer.backward(dy)             # returns dL/dx, overwrites layer.grads
    layer.params : dict[str, np.ndarray]  # updated in place by optimisers
    layer.grads  : dict[str, np.ndarray]  # same keys and shapes as params
    layer.buffers: dict[str, np.ndarray]  # non-trained state saved in checkpoints (BN statistics)
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import kernels as cpu_kernels

__all__ = ["Layer", "register", "layer_from_config", "as_rng", "SkipDraws", "as_float_dtype", "check_array",
           "kernels_for", "state_dict", "load_state_dict"]

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make a layer type rebuildable from its ``config()``."""
    _REGISTRY[cls.__name__] = cls
    return cls


def layer_from_config(cfg: dict):
    """Rebuild a layer (with fresh parameters) from ``layer.config()``."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"layer config must be a dict with a 'type' key, got {cfg!r}")
    kind = cfg["type"]
    if kind not in _REGISTRY:
        raise ValueError(f"unknown layer type {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_config(cfg)


def as_rng(rng) -> np.random.Generator:
    """Accept a Generator, an int seed or None (fresh entropy); never touches global state."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


class SkipDraws(np.random.Generator):
    """A generator whose ``uniform`` (every layer's initialiser: ``rng.uniform(-b, b, shape)
    .astype(dtype)``) makes the same draws from the same bit generator as ``rng``, so later
    draws are unchanged, but returns zeros that hold no memory until written (``np.zeros``: the
    pages come from the OS on first write). It notes where in the stream each array's draws
    began, so ``draw_into`` can give chosen arrays the values a real build gives them. An MPI
    rank builds the model with it and draws only the weights of the blocks it trains
    (``parallel.mpi``): the other blocks never occupy memory. Other draws are real."""

    CHUNK = 1 << 16

    def __init__(self, rng):
        super().__init__(as_rng(rng).bit_generator)
        self._undrawn = {}  # id(array) -> (array, bit generator state before its draws, low, high)

    def uniform(self, low=0.0, high=1.0, size=None):
        if size is None:
            return super().uniform(low, high)
        shape = (size,) if np.ndim(size) == 0 else tuple(size)
        start = self.bit_generator.state
        for i, c in _chunks(int(np.prod(shape)), self.CHUNK):  # draw by draw the same stream as one call of n
            super().uniform(low, high, c)
        return _Undrawn(shape, lambda a: self._undrawn.__setitem__(id(a), (a, start, low, high)))

    def draw_into(self, arrays) -> int:
        """Write into every array of ``arrays`` that this generator returned as zeros the values
        a real build gives it (``uniform(low, high, shape).astype(dtype)``, bit for bit), chunk by
        chunk, so no float64 copy of the whole array is made; other arrays are left alone.
        Returns how many arrays were drawn."""
        drawn = 0
        for a in arrays:
            a0, start, low, high = self._undrawn.pop(id(a), (None,) * 4)
            if a0 is not a:
                continue
            bits = type(self.bit_generator)()
            bits.state = start
            g, flat = np.random.Generator(bits), a.reshape(-1)  # a view: np.zeros is C-contiguous
            for i, c in _chunks(flat.size, self.CHUNK):
                flat[i:i + c] = g.uniform(low, high, c)
            drawn += 1
        return drawn

    def forget(self):
        """Drop the notes (and with them this generator's references to the arrays it returned)."""
        self._undrawn.clear()


def _chunks(n, size):
    """(start, length) of consecutive pieces of at most ``size`` covering 0..n."""
    return [(i, min(size, n - i)) for i in range(0, n, size)]


class _Undrawn:
    """What ``SkipDraws.uniform`` returns: ``astype(dtype)`` gives ``np.zeros(shape, dtype)``,
    which ``note`` records for ``SkipDraws.draw_into``."""

    def __init__(self, shape, note):
        self.shape, self.note = shape, note

    def astype(self, dtype):
        a = np.zeros(self.shape, dtype)
        self.note(a)
        return a


def as_float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_array(x, who: str, *, ndim=None, tail=None, dtype=None, floating=True) -> np.ndarray:
    """Validate a layer input; raise ValueError naming what was expected and what arrived.

    ndim  : int or tuple of allowed ranks
    tail  : expected trailing shape (None entries are free), e.g. (None, 28, 28)
    dtype : exact dtype required (parametric layers); else any float when ``floating``
    """
    if not isinstance(x, np.ndarray) and not backend.is_device_array(x):
        raise ValueError(f"{who} expects a numpy array, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{who} expects a {' or '.join(map(str, allowed))}-d input, "
                             f"got shape {x.shape}")
    if tail is not None:
        got = x.shape[x.ndim - len(tail):] if x.ndim >= len(tail) else x.shape
        if len(got) != len(tail) or any(t is not None and t != g for t, g in zip(tail, got)):
            want = "(N, " + ", ".join("*" if t is None else str(t) for t in tail) + ")"
            raise ValueError(f"{who} expects shape {want}, got {x.shape}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{who} expects a non-empty batch, got shape {x.shape}")
    if dtype is not None:
        if x.dtype != dtype:
            raise ValueError(f"{who} expects dtype {np.dtype(dtype)}, got {x.dtype}")
    elif floating and x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{who} expects float32 or float64 input, got {x.dtype}")
    return x


class Layer:
    """Base class: empty params/grads/buffers, cache handling, config round trip."""

    #: True when ``backward(dy, need_dx=False)`` can skip the input gradient (Dense, Conv2d, Sequential)
    takes_need_dx = False

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self._cache = None

    # --- protocol -----------------------------------------------------------------------------
    def forward(self, x, train: bool = True):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x, train: bool = True):
        """``layer(x)`` is ``layer.forward(x)`` of the subclass (a class-level alias would bind the
        abstract method above)."""
        return self.forward(x, train=train)

    def _cached(self):
        """The cache saved by the last forward(train=True); RuntimeError if there is none."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward(x, train=True)")
        return self._cache

    def _check_dy(self, dy, shape):
        is_array = isinstance(dy, np.ndarray) or backend.is_device_array(dy)
        if not is_array or dy.shape != tuple(shape):
            got = dy.shape if is_array else type(dy).__name__
            raise ValueError(f"{type(self).__name__}.backward expects dy of shape {tuple(shape)}, got {got}")
        return dy

    # --- serialisation -------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        """Constructor keyword arguments (JSON-serialisable)."""
        return {}

    def config(self) -> dict:
        return {"type": type(self).__name__, **self.hyperparameters()}

    @classmethod
    def from_config(cls, cfg: dict):
        kw = {k: v for k, v in cfg.items() if k != "type"}
        return cls(**kw)

    def zero_grads(self):
        self.grads = {k: backend.array_module(v).zeros(v.shape, v.dtype) for k, v in self.params.items()}

    #: False for a layer type with no GPU path: ``to("cuda")`` refuses it by name (every built-in
    #: layer has one; a layer written with NumPy calls on its input would not).
    runs_on_gpu = True

    def children(self):
        """The layers inside this one (containers: their layers; a plain layer: none)."""
        return ()

    def refuse_host_only(self):
        """DeviceError naming the first layer, this one or inside it, with no GPU path: asked
        before anything moves, so a refused model is not left half on the GPU."""
        if not self.runs_on_gpu:
            raise backend.DeviceError(f"{type(self).__name__} has no GPU path; train this model "
                                      "with --device cpu")
        for child in self.children():
            child.refuse_host_only()

    def to(self, device):
        """Move parameters and buffers to ``device`` ('cpu' or 'cuda'), in place; returns self.
        The dicts keep their identity, so an optimiser built before the move steps the moved
        arrays once it is moved too (``optim.move_optimizer``). Gradients and the cache are
        dropped (the next forward/backward makes them on the new device)."""
        if device == "cuda":
            self.refuse_host_only()
        for d in (self.params, self.buffers):
            for k, v in d.items():
                d[k] = backend.to_device(v, device)
        self.grads, self._cache = {}, None
        return self

    def __repr__(self):
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"


def kernels_for(x):
    """The kernel set that takes ``x``: the Numba CPU kernels (``layers/kernels.py``) for NumPy
    arrays, their numba.cuda twins (``bll_ref/gpu/layer_kernels.py``, same names and
    signatures) for CuPy arrays."""
    return backend.gpu_module("layer_kernels") if backend.is_device_array(x) else cpu_kernels


def state_dict(layer) -> dict[str, np.ndarray]:
    """Host copies of every parameter and buffer, keyed ``params/<key>`` and ``buffers/<key>``
    (NumPy also for a model on the GPU: checkpoints are always host arrays)."""
    out = {f"params/{k}": np.array(backend.asnumpy(v)) for k, v in layer.params.items()}
    out.update({f"buffers/{k}": np.array(backend.asnumpy(v)) for k, v in layer.buffers.items()})
    return out


def load_state_dict(layer, state: dict):
    """Copy arrays from ``state`` into the layer in place; every key must match in shape and dtype."""
    own = {f"params/{k}": v for k, v in layer.params.items()}
    own.update({f"buffers/{k}": v for k, v in layer.buffers.items()})
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, dst in own.items():
        src = np.asarray(backend.asnumpy(state[k]))
        if src.shape != dst.shape:
            raise ValueError(f"state {k}: expected shape {dst.shape}, got {src.shape}")
        if backend.is_device_array(dst):
            dst[...] = backend.array_module(dst).asarray(src.astype(dst.dtype, copy=False))
        else:
            np.copyto(dst, src.astype(dst.dtype, copy=False))
