"""numba.cuda twins of the Numba CPU kernels, for CuPy arrays (the optional ``[cuda]`` extra).

Each module here mirrors a CPU kernel module function for function (same names, argument order
and semantics); ``bll_ref.backend.gpu_module(name)`` imports one on first use, so a CPU-only
install never needs numba-cuda. ``layer_kernels``: the layers' kernels (``layers/kernels.py``),
gathered from ``conv_kernels`` (im2col, col2im, conv layouts, max pooling; and the launch
machinery they share) and ``norm_kernels`` (LeakyReLU, LayerNorm, BatchNorm); ``optim_kernels``:
Adam / SGD (``optim.py``); ``loss_kernels``: the device code of the local losses and the softmax
cross-entropy, launched by ``bll_ref.losses.cuda``; ``launch``: how every kernel here is launched
(compiled once per dtype, raw pointers, a cached launch configuration: ~18 us a call instead of
~128 us).
"""

__all__ = []
