"""What every training method shares: the Method base class, prediction and accuracy (the
training loop is ``bll_ref.loop.fit``)."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..layers import Sequential, as_sequential

__all__ = ["Method", "predict", "evaluate", "accuracy", "topk_accuracy", "as_model",
           "model_device"]


def as_model(blocks) -> Sequential:
    """A list of blocks (Sequentials) or a Sequential of blocks -> the model Sequential."""
    model = as_sequential(blocks, "a training method")
    if not model.layers or not all(isinstance(b, Sequential) for b in model.layers):
        raise ValueError("a model is a non-empty list of blocks, each a Sequential")
    return model


def model_device(model) -> str:
    """'cuda' when the model's parameters are on the GPU, else 'cpu'."""
    for v in model.params.values():
        return backend.device_of(v)
    return "cpu"


def predict(model, x, batch_size=1000, on_chunk=None):
    """Eval-mode forward in chunks -> output of the last block, always a host (NumPy) array;
    host inputs are moved chunk by chunk to the model's device. ``on_chunk()`` is called after
    every chunk (an MPI rank 0 tells the others it is alive)."""
    device = model_device(model)
    out = []
    for i in range(0, len(x), batch_size):
        out.append(backend.asnumpy(model.forward(backend.to_device(x[i:i + batch_size], device), train=False)))
        if on_chunk:
            on_chunk()
    return np.concatenate(out)


def accuracy(logits, y) -> float:
    """Fraction of positions whose argmax equals the label (works for (N,C) and (N,T,C))."""
    logits, y = backend.asnumpy(logits), backend.asnumpy(y)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def evaluate(model, x, y, batch_size=1000, on_chunk=None) -> float:
    return accuracy(predict(model, x, batch_size, on_chunk), y)


def topk_accuracy(logits, y, k) -> float:
    """Fraction of positions whose label is among the k largest logits (paper 001 Table 1's
    "top-3": the correct class among the 3 highest output activations). Ties at the k-th value
    count against the label only when k other classes beat it strictly."""
    logits = np.asarray(logits)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= {logits.shape[-1]} classes, got k={k}")
    true = np.take_along_axis(logits, np.asarray(y)[..., None], axis=-1)
    return float(np.mean((logits > true).sum(axis=-1) < k))


class Method:
    """Base of Backprop, FeedbackAlignment and BLL: ``train_step`` on one batch, hooks per epoch."""

    name = "method"

    #: where the model and everything it trains with live ('cpu' or 'cuda'); see ``to``
    device = "cpu"

    def __init__(self, model):
        self.model = as_model(model)
        self.epoch = 0

    def to(self, device):
        """Move the model, its optimisers and auxiliary networks to ``device`` ('cpu', 'cuda' or
        'auto'); returns self. ``train_step`` then takes host batches and moves them itself;
        ``state_dict`` and checkpoints stay host NumPy, so a run resumes on either device.
        DeviceError (a ValueError) when the device is not available."""
        device = backend.resolve_device(device)
        self.model.to(device)
        self._move(device)
        self.device = device
        return self

    def _move(self, device):  # pragma: no cover - abstract
        """Move what the method trains with besides the model (optimisers, heads, feedback)."""
        raise NotImplementedError

    def _batch(self, x):
        """A training batch on the method's device (no copy on the CPU)."""
        return x if self.device == "cpu" else backend.to_device(x, self.device)

    def on_epoch_start(self, epoch):
        self.epoch = epoch

    def train_step(self, x, y) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch_diagnostics(self, x, y) -> dict:
        return {}

    def aux_state(self) -> dict:
        """Arrays besides the model a checkpoint keeps (BLL heads and feedback, FA matrices)."""
        return {}

    def state_dict(self) -> dict:  # pragma: no cover - abstract
        """Everything needed to resume: parameters, buffers, optimiser state, auxiliary networks."""
        raise NotImplementedError

    def load_state_dict(self, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x, batch_size=1000):
        return predict(self.model, x, batch_size)
