"""numba.cuda twins of ``bll_ref.layers.kernels``: same function names, argument order and
semantics, on device arrays (CuPy in production, numba's own device arrays in the simulator
tests), writing into the preallocated outputs. A layer picks the module by its input's type
(``K = kernels_for(x)``), so its call sites are the same on both devices.

Launching (why the kernels take pointers): numba's ordinary ``kernel[grid, block, stream](cupy,
...)`` cost ~128 us of host time per call on an H200 machine with numba-cuda 0.30.4 (numba types
and re-wraps every CuPy argument through DLPack on each call; ``bll_ref.gpu.launch`` has the
details), and a BLL training step calls dozens of these kernels. So every kernel here takes raw
device pointers (``CPointer`` parameters) plus the dimensions it needs as int64 (flat C-order
indexing inside), is compiled once per dtype combination for an explicit signature, and is
launched through :class:`bll_ref.gpu.launch.KernelLauncher` (``cuda.core.launch`` with a cached
launch configuration and stream): ~18 us per call on the same machine. Every array argument must
therefore be C-contiguous (ValueError naming it otherwise, never a silent copy); the layers pass
contiguous arrays (``ascontiguousarray`` inputs, fresh ``empty`` outputs, leading-axis slices of
those; the one exception would be Conv2d's ``dy.reshape(n, O, -1)``, a view when the incoming
dy is a strided array that reshapes without a copy). A CuPy view's address is its first
element (``data.ptr`` includes the offset), so ``y[s:e]`` is written in place. Masks are bool
arrays, read and written as bytes (0 / 1).

How each pass maps onto the GPU:

* **elementwise** (im2col, conv output / GEMM layouts, LeakyReLU, BatchNorm apply and dx, max
  pool forward): one thread per output element in a grid-stride loop, ``THREADS`` per block.
* **gathers instead of scatters** (col2im, max pool backward): each output element adds its own
  contributions in the CPU kernel's order, starting from 0, so the result is deterministic and
  equals the CPU kernel bit for bit; no atomics.
* **reductions** (LayerNorm rows, BatchNorm per-channel statistics and dgamma / dbeta, the conv
  bias gradient): one block per row or channel; thread t adds elements t, t + T, ... in
  float64, then a shared-memory tree adds the T partials in a fixed order. Deterministic; equal
  to the CPU kernel's float64 sums within rounding (the order of additions differs).

Arithmetic in the array dtype where the CPU kernel uses it (``like(p, v)``: v rounded to the
element type of pointer p, as ``x.dtype.type(v)`` on the CPU). Semantic differences from the CPU
kernels: only in the last bits, from the order of the float64 sums above and from NVVM
contracting a multiply and an add into one FMA (e.g. BatchNorm's ``xhat * gamma + beta``); on an
H200 at most 2e-15 (float64) and 1.5e-7 (float32) relative to the largest output (measured with
the earlier, array-argument version of these kernels). Copies, selects, col2im and max pooling
are exact.

Kernels launch on CuPy's current stream for CuPy arrays, so they run in order with CuPy's own
work; numba's device arrays (the simulator) use the default stream. ``PTX_SIGNATURES`` lists,
for every ``@cuda.jit`` kernel, the signatures it is compiled for (keyed by the dtypes of its
arrays); the tests compile each to PTX on a machine without a GPU, which catches what the
simulator accepts and NVVM rejects (e.g. builtin ``max`` / ``min``: these kernels use
conditional expressions instead). Device helpers are ``inline="always"``: compiling a separate
device function for PTX would try to initialise the driver.

This module is the public face: the kernels and their wrappers live in
:mod:`bll_ref.gpu.conv_kernels` (im2col, col2im, the conv layouts, MaxPool2d; also the launch
machinery) and :mod:`bll_ref.gpu.norm_kernels` (LeakyReLU, LayerNorm, BatchNorm), and
``PTX_SIGNATURES`` here merges theirs. ``THREADS``, ``REDUCE_THREADS`` and ``MAX_BLOCKS`` are
re-exported for reading; the launches read them from ``conv_kernels``, so set them there.
"""
from __future__ import annotations

from . import conv_kernels, norm_kernels
from .conv_kernels import (MAX_BLOCKS, REDUCE_THREADS, THREADS, col2im_kernel, conv_dy_kernel, conv_out_kernel,
                           im2col_kernel, max_pool_backward_kernel, max_pool_forward_kernel)
from .norm_kernels import (batch_norm_apply_kernel, batch_norm_backward_kernel, batch_norm_stats_kernel,
                           layer_norm_backward_kernel, layer_norm_forward_kernel, leaky_relu_backward_kernel,
                           leaky_relu_forward_kernel)

__all__ = ["im2col_kernel", "col2im_kernel", "conv_out_kernel", "conv_dy_kernel",
           "leaky_relu_forward_kernel", "leaky_relu_backward_kernel",
           "layer_norm_forward_kernel", "layer_norm_backward_kernel",
           "batch_norm_stats_kernel", "batch_norm_apply_kernel", "batch_norm_backward_kernel",
           "max_pool_forward_kernel", "max_pool_backward_kernel",
           "THREADS", "REDUCE_THREADS", "MAX_BLOCKS", "PTX_SIGNATURES"]

#: Every layer kernel (of ``conv_kernels`` and ``norm_kernels``): {kernel name: {key: argument
#: types}} for ``numba.cuda.compile_ptx``.
PTX_SIGNATURES = {**conv_kernels.PTX_SIGNATURES, **norm_kernels.PTX_SIGNATURES}
if len(PTX_SIGNATURES) != len(conv_kernels.PTX_SIGNATURES) + len(norm_kernels.PTX_SIGNATURES):  # pragma: no cover
    raise RuntimeError("conv_kernels and norm_kernels have a kernel name in common")
