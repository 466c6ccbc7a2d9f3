"""Model builders. Each returns a list of blocks (one ``Sequential`` per block) so that training
methods can split the model: BP chains them, BLL trains each block from its own local loss.

Block convention used by BLL: a block's *natural parameters* a_k are the input of its trailing
activation (the pre-activation, Eq. 3/9: alpha = S(a)); the block output h_k = act(a_k) goes to
the next block. A block with no trailing activation has a_k = h_k.
"""
from __future__ import annotations

import numpy as np

from .layers import (AvgPool2d, BatchNorm, Conv2d, Dense, Embedding, Flatten, LayerNorm, LeakyReLU,
                     MaxPool2d, PositionalEncoding, ReLU, Residual, SelfAttention, Sequential,
                     Sigmoid, Tanh)
from .layers.base import as_rng
from .memory import check_fits

__all__ = ["mlp", "cnn", "resnet", "resnet18", "resnet18_size", "transformer", "activation", "build", "MODELS",
           "IMAGE_MODELS", "takes_images", "parse_sizes"]

_ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def mlp(sizes=(784, 1024, 1024, 1024, 10), *, activation_name="leaky_relu", rng=0, dtype=np.float32):
    """[Dense+act] per hidden layer, then Dense: len(sizes) - 1 blocks (the peer's 4-block MLP)."""
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least input and output sizes, got {sizes}")
    for s in sizes:  # 16.5 would build 16 units; True would build 1
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"mlp sizes must be whole numbers of units >= 1, got {s!r} in {tuple(sizes)}")
    sizes = tuple(int(s) for s in sizes)
    rng = as_rng(rng)
    blocks = [Sequential(Dense(i, o, rng=rng, dtype=dtype), activation(activation_name))
              for i, o in zip(sizes[:-2], sizes[1:-1])]
    blocks.append(Sequential(Dense(sizes[-2], sizes[-1], rng=rng, dtype=dtype)))
    return blocks


def cnn(*, in_channels=1, image_size=28, channels=(32, 64, 128), n_classes=10, batchnorm=True,
        activation_name="relu", rng=0, dtype=np.float32):
    """Conv3x3(+BN)+act+MaxPool2 per block (one block per entry of ``channels``), then a linear
    classifier block. For 28x28 inputs and the default widths: 4 blocks."""
    rng = as_rng(rng)
    blocks, c, s = [], in_channels, image_size
    for i, co in enumerate(channels):
        layers = [Conv2d(c, co, 3, padding=1, rng=rng, dtype=dtype)]
        if batchnorm:
            layers.append(BatchNorm(co, dtype=dtype))
        if s >= 2:
            layers.append(MaxPool2d(2))
            s //= 2
        layers.append(activation(activation_name))  # act last: a_k = pooled pre-activation
        blocks.append(Sequential(*layers))
        c = co
    blocks.append(Sequential(Flatten(), Dense(c * s * s, n_classes, rng=rng, dtype=dtype)))
    return blocks


def _basic_block(cin, cout, stride, rng, dtype):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 projection when needed)."""
    body = Sequential(Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, rng=rng, dtype=dtype),
                      BatchNorm(cout, dtype=dtype), ReLU(),
                      Conv2d(cout, cout, 3, padding=1, bias=False, rng=rng, dtype=dtype),
                      BatchNorm(cout, dtype=dtype))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = Sequential(Conv2d(cin, cout, 1, stride=stride, bias=False, rng=rng, dtype=dtype),
                              BatchNorm(cout, dtype=dtype))
    return Residual(body, shortcut)


def resnet(*, in_channels=1, image_size=28, widths=(16, 32, 64), blocks_per_stage=2, n_classes=10,
           rng=0, dtype=np.float32):
    """Small ResNet-18-style network: stem conv, one BLL block per stage of ``blocks_per_stage``
    basic blocks (stride 2 from the second stage), then global average pool + linear classifier.
    ResNet-18 itself is widths (64, 128, 256, 512), 2 basic blocks per stage, 4 stages."""
    rng = as_rng(rng)
    blocks, c, s = [], widths[0], image_size
    for i, w in enumerate(widths):
        layers = []
        if i == 0:
            layers += [Conv2d(in_channels, w, 3, padding=1, bias=False, rng=rng, dtype=dtype),
                       BatchNorm(w, dtype=dtype), ReLU()]
        for j in range(blocks_per_stage):
            stride = 2 if (i > 0 and j == 0) else 1
            layers.append(_basic_block(c, w, stride, rng, dtype))
            c = w
            s = (s + stride - 1) // stride if stride == 2 else s
        layers.append(ReLU())
        blocks.append(Sequential(*layers))
    blocks.append(Sequential(AvgPool2d(s), Flatten(), Dense(c, n_classes, rng=rng, dtype=dtype)))
    return blocks


def resnet18(*, width=16, in_channels=1, image_size=28, n_classes=10, rng=0, dtype=np.float32):
    """ResNet-18 (He et al. 2016) adapted to small images, split into the 4 BLL blocks of paper 001.

    Layout: stem conv3x3(stride 1, no max-pool: 28x28 inputs, as CIFAR ResNets) + BN + ReLU, then
    4 stages of 2 basic blocks (conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU after the sum) with
    ``width * (1, 2, 4, 8)`` channels, stride 2 at the start of stages 2-4 (28 -> 28, 14, 7, 4),
    1x1 projection shortcuts where the shape changes, global average pool and a linear classifier.
    ``width=64`` is ResNet-18's own (64, 128, 256, 512); the default 16 fits 2 CPU cores.

    BLL blocks (paper 001, Sec. 4.1: "splits were introduced after residual layers ... group sizes
    (4,5,4,5) for ResNet-18"): one block per stage, i.e. two basic blocks per BLL block; the stem
    belongs to block 1 and the classifier to block 4. Counted in weight layers (the 18 of the name:
    stem conv, 16 convs of the basic blocks, classifier; projections not counted) that is (5,4,4,5).
    The paper's printed (4,5,4,5) has the same total and the same 2nd/3rd split (after layers 9 and
    13 = after stages 2 and 3), but a split after layer 4 would cut the second basic block in half,
    against "after residual layers"; its ResNet-50 groups (12,13,12,13) show the same one-layer
    shift against 4 bottlenecks per block (13,12,12,13). We split at the residual boundaries.

    Each hidden block ends with the ReLU after its last residual sum, so a_k (the natural
    parameters BLL's variational term sees) is that sum.
    """
    if int(width) < 1:
        raise ValueError(f"resnet18 width must be a positive number of channels, got {width}")
    if image_size < 8:
        raise ValueError(f"resnet18 needs images of at least 8x8 (3 stride-2 stages), got {image_size}")
    rng = as_rng(rng)
    width = int(width)
    blocks, c, s = [], width, image_size
    for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers = []
        if i == 0:
            layers += [Conv2d(in_channels, width, 3, padding=1, bias=False, rng=rng, dtype=dtype),
                       BatchNorm(width, dtype=dtype), ReLU()]
        for j in range(2):
            stride = 2 if (i > 0 and j == 0) else 1
            layers += [_basic_block(c, w, stride, rng, dtype), ReLU()]
            c, s = w, (s + 1) // 2 if stride == 2 else s
        if i == 3:
            layers += [AvgPool2d(s), Flatten(), Dense(c, n_classes, rng=rng, dtype=dtype)]
        blocks.append(Sequential(*layers))
    return blocks


def resnet18_size(width=16, *, in_channels=1, image_size=28, n_classes=10) -> tuple[int, int]:
    """(parameter and buffer elements, activation values per example) of ``resnet18(width=...)``,
    counted without building it, so that ``bll-ref train`` can refuse a width that cannot fit before
    allocating (``--width 2000`` ran until "out of memory"). The activation count is a lower bound:
    the output of every convolution (each is kept for the backward pass), no temporaries."""
    width = int(width)
    n, acts, c, s = 0, 0, width, image_size

    def conv_bn(cin, cout, k, s_out):
        nonlocal n, acts
        n += cin * cout * k * k + 4 * cout  # conv weight (no bias) + BatchNorm gamma, beta, mean, var
        acts += cout * s_out * s_out

    conv_bn(in_channels, width, 3, s)
    for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for j in range(2):
            stride = 2 if (i > 0 and j == 0) else 1
            s_out = (s + 1) // 2 if stride == 2 else s
            conv_bn(c, w, 3, s_out)
            conv_bn(w, w, 3, s_out)
            if stride != 1 or c != w:
                conv_bn(c, w, 1, s_out)
            c, s = w, s_out
    n += (c + 1) * n_classes
    return n, acts


def transformer(*, vocab=10, length=10, dim=32, n_blocks=5, n_classes=None, causal=False, rng=0,
                dtype=np.float32):
    """Sequence model of ``n_blocks`` BLL blocks, each: Residual(LN -> SelfAttention) ->
    Residual(LN -> Dense -> ReLU -> Dense); the first block also embeds tokens and positions,
    the last block ends with a token-wise linear read-out to ``n_classes`` (default ``vocab``).
    Input (N, T) int tokens, output (N, T, n_classes) logits (Sec. 4.2 of the main paper)."""
    rng = as_rng(rng)
    n_classes = vocab if n_classes is None else n_classes
    blocks = []
    for k in range(n_blocks):
        layers = []
        if k == 0:
            layers += [Embedding(vocab, dim, rng=rng, dtype=dtype), PositionalEncoding(length, dim, dtype=dtype)]
        layers += [Residual(Sequential(LayerNorm(dim, dtype=dtype), SelfAttention(dim, causal=causal, rng=rng, dtype=dtype))),
                   Residual(Sequential(LayerNorm(dim, dtype=dtype), Dense(dim, 2 * dim, rng=rng, dtype=dtype), ReLU(),
                                       Dense(2 * dim, dim, rng=rng, dtype=dtype)))]
        blocks.append(Sequential(*layers))
    blocks.append(Sequential(LayerNorm(dim, dtype=dtype), Dense(dim, n_classes, rng=rng, dtype=dtype)))
    return blocks


MODELS = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "resnet18": resnet18, "transformer": transformer}


def parse_sizes(text, dtype=np.float32):
    """The MLP widths of ``--sizes``: "784,256,10" -> (784, 256, 10); refused before allocation when
    parameters, gradients and two optimiser moments of that many weights cannot fit in memory."""
    try:
        sizes = tuple(int(s) for s in str(text).split(","))
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"--sizes needs at least two widths, each >= 1, got {text!r}")
    if sizes[0] != 784 or sizes[-1] != 10:
        raise ValueError(f"--sizes must start with 784 (28x28 input pixels) and end with 10 (classes), "
                         f"got {text!r}")
    n = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    # parameters, gradients and two optimiser moments per weight
    check_fits(4 * n * np.dtype(dtype).itemsize, f"--sizes {text} ({n:,} parameters)")
    return sizes


#: the models whose input is an image (N, 1, 28, 28); the others take flat vectors
IMAGE_MODELS = ("cnn", "resnet", "resnet18")


def takes_images(meta, config) -> bool:
    """Does the model of a checkpoint (its ``meta`` and ``model.config()``) take images? The name
    the run recorded decides; without one, a first layer that is a Conv2d."""
    if meta.get("model") in IMAGE_MODELS:
        return True
    if meta.get("model") == "mlp":
        return False
    while config.get("type") == "Sequential" and config.get("layers"):
        config = config["layers"][0]
    return config.get("type") == "Conv2d"


def build(name, **kw):
    """Model builder by name (used by the CLI and by checkpoints)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kw)
