"""Feedback alignment (FA, Lillicrap et al. 2016): errors travel back through fixed random matrices.

Each Dense / Conv2d layer gets a fixed random matrix B of the shape of its weight W, drawn once
from W's own initial distribution. In the backward pass dL/dx is computed with B in place of W;
the weight gradient (x^T dy) is unchanged. Other layers (norms, attention) keep exact gradients.
The model's layers are never modified: the backward walk below hands B to each layer's backward.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..layers import Conv2d, Dense, Residual, Sequential
from ..layers.base import as_rng
from ..losses.output import softmax_cross_entropy
from .backprop import Backprop

__all__ = ["FeedbackAlignment", "fa_backward"]


def _weight_layers(layer):
    if isinstance(layer, (Dense, Conv2d)):
        yield layer
    elif isinstance(layer, Sequential):
        for l in layer:
            yield from _weight_layers(l)
    elif isinstance(layer, Residual):
        yield from _weight_layers(layer.body)
        if layer.shortcut is not None:
            yield from _weight_layers(layer.shortcut)


def fa_backward(layer, dy, feedback, need_dx=True):
    """Backward through ``layer`` with ``feedback[id(W-layer)]`` in place of every W in dL/dx.

    Same order of operations as the layers' own backward, so the weight gradients equal BP's for
    the same dy."""
    if isinstance(layer, (Dense, Conv2d)):
        return layer.backward(dy, need_dx=need_dx, dx_weight=feedback[id(layer)])
    if isinstance(layer, Sequential):
        for child in layer.layers[:0:-1]:
            dy = fa_backward(child, dy, feedback)
        return fa_backward(layer.layers[0], dy, feedback, need_dx)
    if isinstance(layer, Residual):
        layer._check_dy(dy, layer._cached())
        dx = fa_backward(layer.body, dy, feedback)
        return dx + (dy if layer.shortcut is None else fa_backward(layer.shortcut, dy, feedback))
    return layer.backward(dy)


class FeedbackAlignment(Backprop):
    """Backprop's training step; only the backward matrices of Dense/Conv2d layers differ.

    ``feedback``: the fixed random matrices B, one per Dense/Conv2d layer in model order.
    """

    name = "fa"

    def __init__(self, model, *, optimizer="adam", lr=1e-3, rng=0, **opt_kw):
        super().__init__(model, optimizer=optimizer, lr=lr, **opt_kw)
        rng = as_rng(rng)
        self.feedback, self._by_layer = [], {}
        for layer in _weight_layers(self.model):
            W = layer.params["W"]
            fan_in = W.size // W.shape[-1] if isinstance(layer, Dense) else W[0].size
            bound = 1.0 / np.sqrt(fan_in)
            B = rng.uniform(-bound, bound, W.shape).astype(W.dtype)
            self.feedback.append(B)
            self._by_layer[id(layer)] = B

    def backward(self, dy, layer=None, need_dx=True):
        """FA's backward through ``layer`` (default: the whole model) after its forward."""
        return fa_backward(self.model if layer is None else layer, dy, self._by_layer, need_dx)

    def _move(self, device):
        super()._move(device)
        for i, (layer, B) in enumerate(zip(_weight_layers(self.model), self.feedback)):
            self.feedback[i] = self._by_layer[id(layer)] = backend.to_device(B, device)

    def train_step(self, x, y):
        logits = self.model.forward(self._batch(x), train=True)
        loss, dz = softmax_cross_entropy(logits, y)
        self.backward(dz, need_dx=False)
        self.optimizer.step()
        return loss

    def aux_state(self) -> dict:
        """The fixed feedback matrices (so a checkpoint resumes the same FA run)."""
        return {f"fa_feedback{i}": backend.asnumpy(B) for i, B in enumerate(self.feedback)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **{f"aux/{k}": v for k, v in self.aux_state().items()}}

    def load_state_dict(self, state):
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("aux/")})
        for i, B in enumerate(self.feedback):
            src = backend.asnumpy(state[f"aux/fa_feedback{i}"])
            if backend.is_device_array(B):
                B[...] = backend.array_module(B).asarray(src)
            else:
                np.copyto(B, src)
