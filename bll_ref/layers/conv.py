"""PLACEHOLDER: being written (replace this whole file)."""
from .base import Layer


class Conv2d(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("Conv2d not written yet")


class MaxPool2d(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("MaxPool2d not written yet")


class AvgPool2d(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("AvgPool2d not written yet")


class Upsample2d(Layer):
    def __init__(self, *a, **k):
        raise NotImplementedError("Upsample2d not written yet")
