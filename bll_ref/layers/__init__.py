"""Hand-written layers; every one follows the protocol in ``base.py`` (docs/architecture.md)."""
from .activation import Flatten, LeakyReLU, ReLU, Sigmoid, Tanh, sigmoid
from .base import Layer, layer_from_config, load_state_dict, state_dict
from .container import Residual, Sequential, as_sequential
from .conv import Conv2d
from .pool import AvgPool2d, MaxPool2d, Upsample2d
from .dense import Dense
from .norm import BatchNorm, LayerNorm
from .sequence import Embedding, PositionalEncoding, SelfAttention

__all__ = [
    "Layer", "Dense", "Conv2d", "MaxPool2d", "AvgPool2d", "Upsample2d", "BatchNorm", "LayerNorm",
    "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Flatten", "Residual", "Embedding", "SelfAttention",
    "PositionalEncoding", "Sequential", "as_sequential", "sigmoid", "layer_from_config", "state_dict", "load_state_dict",
]
