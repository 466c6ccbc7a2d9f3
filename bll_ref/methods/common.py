"""What every training method shares: the loop, evaluation, progress lines, history."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ..data import batches
from ..layers import Sequential


def as_model(blocks) -> Sequential:
    """A list of blocks (Sequentials) or a Sequential of blocks -> the model Sequential."""
    if isinstance(blocks, Sequential) and all(isinstance(b, Sequential) for b in blocks):
        return blocks
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, Sequential) for b in blocks):
        raise ValueError("a model is a non-empty list of blocks, each a Sequential")
    return Sequential(*blocks)


def predict(model, x, batch_size=1000):
    """Eval-mode forward in chunks -> output of the last block."""
    return np.concatenate([model.forward(x[i:i + batch_size], train=False)
                           for i in range(0, len(x), batch_size)])


def accuracy(logits, y) -> float:
    """Fraction of positions whose argmax equals the label (works for (N,C) and (N,T,C))."""
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def evaluate(model, x, y, batch_size=1000) -> float:
    return accuracy(predict(model, x, batch_size), y)


def write_json_atomic(path, obj):
    """Write JSON through a temporary file + rename: an interrupted write leaves the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Method:
    """Base of Backprop, FeedbackAlignment and BLL: ``train_step`` on one batch, hooks per epoch."""

    name = "method"

    def __init__(self, model):
        self.model = as_model(model)
        self.epoch = 0

    def on_epoch_start(self, epoch):
        self.epoch = epoch

    def train_step(self, x, y) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch_diagnostics(self, x, y) -> dict:
        return {}

    def predict(self, x, batch_size=1000):
        return predict(self.model, x, batch_size)


def fit(method, data, *, epochs, batch_size=128, rng=0, log=print, history_path=None,
        eval_batch=1000, diag_samples=2000):
    """Train ``method`` on ``data`` (dict x_train, y_train, x_test, y_test) for ``epochs``.

    Prints a progress line ~10 times per epoch (epoch, step, loss, samples/s) and the test
    accuracy after every epoch. Returns the history dict (also written to ``history_path``
    atomically after every epoch, so an interrupted run keeps what it finished).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    rng = np.random.default_rng(rng)
    x, y = data["x_train"], data["y_train"]
    steps = (len(x) + batch_size - 1) // batch_size
    every = max(1, steps // 10)
    history = {"method": method.name, "epochs": [], "test_acc": [], "train_loss": [],
               "epoch_seconds": [], "diagnostics": []}
    for epoch in range(epochs):
        method.on_epoch_start(epoch)
        t0 = time.perf_counter()
        losses = []
        for step, (xb, yb) in enumerate(batches(x, y, batch_size, rng=rng), 1):
            loss = method.train_step(xb, yb)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1} step {step}; "
                                         "lower the learning rate or check the inputs")
            losses.append(loss)
            if log and (step % every == 0 or step == steps):
                dt = time.perf_counter() - t0
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {np.mean(losses[-every:]):.4f} "
                    f"{step * batch_size / dt:,.0f} samples/s")
        seconds = time.perf_counter() - t0
        acc = evaluate(method.model, data["x_test"], data["y_test"], eval_batch)
        diag = method.epoch_diagnostics(data["x_test"][:diag_samples], data["y_test"][:diag_samples])
        history["epochs"].append(epoch + 1)
        history["test_acc"].append(acc)
        history["train_loss"].append(float(np.mean(losses)))
        history["epoch_seconds"].append(seconds)
        history["diagnostics"].append(diag)
        if log:
            log(f"epoch {epoch + 1}/{epochs} done in {seconds:.1f}s: train loss {np.mean(losses):.4f}, "
                f"test accuracy {100 * acc:.2f}%")
        if history_path:
            write_json_atomic(history_path, history)
    return history
