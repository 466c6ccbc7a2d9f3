"""bll_ref: a NumPy reference implementation of Block-Local Learning (BLL).

Public entry points (see README.md):

* ``bll_ref.layers``     hand-written layers (forward/backward), ``Sequential`` blocks
* ``bll_ref.models``     model builders returning lists of blocks (mlp, cnn, resnet, transformer, autoencoder)
* ``bll_ref.losses``     exponential families, the paper's local estimators, Numba kernels, output losses
* ``bll_ref.feedback``   closed-form / trained / twin feedback networks
* ``bll_ref.methods``    BLL, Backprop, FeedbackAlignment and the training loop ``fit``
* ``bll_ref.optim``      SGD, Adam, schedules
* ``bll_ref.data``       Fashion-MNIST IDX reader, batches, synthetic tasks
* ``bll_ref.fixedpoint`` Q formats and integer reference inference
* ``bll_ref.checkpoint`` .npz checkpoints (no pickle)
"""
__version__ = "0.1.0"

from . import checkpoint, data, feedback, fixedpoint, layers, losses, methods, models, optim  # noqa: E402

__all__ = ["checkpoint", "data", "feedback", "fixedpoint", "layers", "losses", "methods", "models", "optim",
           "__version__"]
