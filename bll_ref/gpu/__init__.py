"""numba.cuda twins of the Numba CPU kernels, for CuPy arrays (the optional ``[cuda]`` extra).

Each module here mirrors a CPU kernel module function for function (same names, argument order
and semantics); ``bll_ref.backend.gpu_module(name)`` imports one on first use, so a CPU-only
install never needs numba-cuda. ``layer_kernels``: the layers' kernels (``layers/kernels.py``);
``optim_kernels``: Adam / SGD (``optim.py``); ``launch``: how every kernel here is launched (compiled
once per dtype, raw pointers, a cached launch configuration: ~18 us a call instead of ~128 us).
"""

__all__ = []
