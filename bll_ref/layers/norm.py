"""PLACEHOLDER: being written (replace this whole file)."""
from .base import Layer


class BatchNorm(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("BatchNorm not written yet")


class LayerNorm(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("LayerNorm not written yet")
