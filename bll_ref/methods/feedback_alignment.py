"""Feedback alignment (FA, Lillicrap et al. 2016): errors travel back through fixed random matrices.

Each Dense / Conv2d layer gets a fixed random matrix B of the shape of its weight W, drawn once
from W's own initial distribution. In the backward pass dL/dx is computed with B in place of W;
the weight gradient (x^T dy) is unchanged. Other layers (norms, attention) keep exact gradients.
"""
from __future__ import annotations

import numpy as np

from ..layers import Conv2d, Dense, Residual, Sequential
from ..layers.base import as_rng
from .backprop import Backprop


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


class _FABackward:
    """Wraps a layer's backward: swaps W for the fixed random B while dx is computed."""

    def __init__(self, layer, B):
        self.layer, self.B, self.inner = layer, B, layer.backward

    def __call__(self, dy, need_dx=True):
        W = self.layer.params["W"]
        self.layer.params["W"] = self.B
        try:
            return self.inner(dy, need_dx=need_dx)
        finally:
            self.layer.params["W"] = W


class FeedbackAlignment(Backprop):
    """Backprop's training step; only the backward matrices of Dense/Conv2d layers differ."""

    name = "fa"

    def __init__(self, model, *, optimizer="adam", lr=1e-3, rng=0, **opt_kw):
        super().__init__(model, optimizer=optimizer, lr=lr, **opt_kw)
        rng = as_rng(rng)
        self.feedback = []
        for layer in _weight_layers(self.model):
            W = layer.params["W"]
            fan_in = W.size // W.shape[-1] if isinstance(layer, Dense) else W[0].size
            bound = 1.0 / np.sqrt(fan_in)
            B = rng.uniform(-bound, bound, W.shape).astype(W.dtype)
            layer.backward = _FABackward(layer, B)
            self.feedback.append(B)
