"""End-to-end backpropagation (BP): the baseline every local rule is compared with."""
from __future__ import annotations

import numpy as np

from ..layers.base import load_state_dict as load_layer_state
from ..layers.base import state_dict as layer_state
from ..losses.output import softmax_cross_entropy
from ..optim import make_optimizer
from .common import Method

__all__ = ["Backprop"]


class Backprop(Method):
    """One optimiser over the whole model, softmax cross-entropy on the last block's output.

    The model's first layer skips its input gradient (nobody needs dL/dx of the data), as a
    careful BP implementation does; step-time comparisons with BLL stay fair.
    """

    name = "bp"

    def __init__(self, model, *, optimizer="adam", lr=1e-3, **opt_kw):
        super().__init__(model)
        self.optimizer = make_optimizer(optimizer, self.model, lr, **opt_kw)

    def _move(self, device):
        self.optimizer.to(device)

    def train_step(self, x, y):
        logits = self.model.forward(self._batch(x), train=True)
        loss, dz = softmax_cross_entropy(logits, y)
        self.model.backward(dz, need_dx=False)
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        """Model parameters and buffers, optimiser state (moments, step counter) and the epoch."""
        s = {f"model/{k}": v for k, v in layer_state(self.model).items()}
        s.update({f"opt/{k}": v for k, v in self.optimizer.state_dict().items()})
        s["epoch"] = np.int64(self.epoch)
        return s

    def load_state_dict(self, state):
        load_layer_state(self.model, {k[6:]: v for k, v in state.items() if k.startswith("model/")})
        self.optimizer.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")})
        self.epoch = int(state["epoch"])
