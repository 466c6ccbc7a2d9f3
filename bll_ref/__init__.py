"""bll_ref: a NumPy reference implementation of Block-Local Learning (BLL).

Public entry points (see README.md):

* ``bll_ref.layers``     hand-written layers (forward/backward), ``Sequential`` blocks
* ``bll_ref.models``     model builders returning lists of blocks (mlp, cnn, resnet, transformer)
* ``bll_ref.losses``     exponential families, the paper's local estimators, Numba kernels, output losses
* ``bll_ref.feedback``   closed-form / trained / twin feedback networks
* ``bll_ref.methods``    BLL (block learners), Backprop, FeedbackAlignment, ``make`` and the training loop ``fit``
* ``bll_ref.parallel``   schedules running block learners: sequential, threads, MPI
* ``bll_ref.runstate``   resumable per-epoch state of a run
* ``bll_ref.report``     learning-curve and diagnostics figures of run directories
* ``bll_ref.optim``      SGD, Adam
* ``bll_ref.data``       Fashion-MNIST IDX reader, batches, synthetic tasks
* ``bll_ref.fixedpoint`` Q formats and integer reference inference
* ``bll_ref.checkpoint`` .npz checkpoints (no pickle)
"""
__version__ = "0.1.0"

from . import checkpoint, data, feedback, fixedpoint, layers, losses, methods, models, optim, parallel, runstate  # noqa: E402

__all__ = ["checkpoint", "data", "feedback", "fixedpoint", "layers", "losses", "methods", "models", "optim",
           "parallel", "runstate", "__version__"]
