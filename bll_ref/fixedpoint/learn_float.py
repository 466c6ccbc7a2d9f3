"""The float twin of the on-device update (:mod:`bll_ref.fixedpoint.learn`): the same blocks, local
errors and learning rates in float64 on the export's float weights, so the difference between the
two measures what the integer arithmetic loses; and the closed-form feedback message table.
"""
from __future__ import annotations

import numpy as np

from . import records as R

__all__ = ["FloatTwin", "fit_feedback", "float_forward"]


def fit_feedback(h, y, n_classes, *, l2=1.0) -> np.ndarray:
    """The closed-form linear feedback b = Y W_fb of DESIGN.md (``feedback.LinearFeedback.fit``
    without a bias): W_fb = argmin ||Y W - h||^2 + l2 ||W||^2.  For one-hot Y, Y^T Y is diagonal
    (the class counts), so W_fb[k] = sum of h over class k / (count_k + l2): the class means,
    shrunk towards 0.  h : (N, units) float; y : (N,) labels.  Returns (n_classes, units) float64."""
    h = np.asarray(h, np.float64).reshape(len(h), -1)
    y = np.asarray(y)
    if y.shape != (len(h),) or y.size == 0 or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"fit_feedback expects (N,) labels in 0..{n_classes - 1} for the {len(h)} rows of h")
    Y = np.eye(n_classes)[y]
    return (Y.T @ h) / (Y.sum(axis=0)[:, None] + l2)


def _dense_params(rec):
    if "W_float" not in rec.info or "c_float" not in rec.info:
        raise ValueError(f"record {rec.name!r} has no float weights (W_float, c_float) for the float twin")
    return np.array(rec.info["W_float"], np.float64), np.array(rec.info["c_float"], np.float64)


def float_forward(records, params, x) -> list:
    """Float64 forward of an MLP's records (input, dense, relu, leaky_relu, flatten) on float input
    ``x`` ``(N, *input_shape)``: one array per record.  ``params`` maps a dense record index to
    (W (in, out), c (out,)).  A dense record whose output format is unsigned clips at 0, as its
    integer codes do (the export folds the ReLU after it into that format)."""
    acts = [np.asarray(x, np.float64)]
    for i, rec in enumerate(records[1:], start=1):
        h = acts[rec.inputs[0]]
        if isinstance(rec, R.Dense):
            W, c = params[i]
            h = h.reshape(len(h), -1) @ W + c
            if not rec.out_fmt.signed:
                h = np.maximum(h, 0.0)
        elif isinstance(rec, R.ReLU):
            h = np.maximum(h, 0.0)
        elif isinstance(rec, R.LeakyReLU):
            h = np.where(h > 0, h, h * (rec.slope if rec.slope is not None else 0.01))
        elif isinstance(rec, R.Flatten):
            h = h.reshape(len(h), -1)
        else:
            raise ValueError(f"the float twin runs MLPs (dense, relu, leaky_relu, flatten); record {i} "
                             f"is {rec.kind}")
        acts.append(h)
    return acts


class FloatTwin:
    """The update of a :class:`~bll_ref.fixedpoint.learn.LearnSpec` in float64 (no rounding, no
    saturation): softmax cross-entropy e = softmax(z) - onehot, Gaussian e = h - b with the float
    message ``feedback[block]``; W -= 2**-s x^T e, c -= 2**-s e.

    im : the IntegerModel the plan was made for (its records' W_float / c_float are the start)
    spec : LearnSpec; feedback : dict block -> (n_classes, units) float message rows
    """

    def __init__(self, im, spec, feedback=None):
        self.records, self.spec = im.records, spec
        self.params = {i: _dense_params(r) for i, r in enumerate(self.records) if isinstance(r, R.Dense)}
        self.feedback = {r.record: np.asarray((feedback or {})[r.block], np.float64)
                         for r in spec.rules if r.kind == "gauss"}

    def logits(self, x) -> np.ndarray:
        return float_forward(self.records, self.params, x)[-1]

    def step(self, x, label) -> float:
        """One step on one sample x ``(1, *input_shape)``; returns the cross-entropy before the step."""
        acts = float_forward(self.records, self.params, x)
        z = acts[-1].reshape(-1)
        p = np.exp(z - z.max())
        p /= p.sum()
        loss = float(-np.log(max(p[label], 1e-300)))
        for rule in self.spec.rules:
            x_in = acts[rule.x_record].reshape(-1)
            if rule.kind == "softmax_ce":
                e = p.copy()
                e[label] -= 1.0
            else:
                e = acts[rule.record].reshape(-1) - self.feedback[rule.record][label]
            lr = 2.0 ** -rule.lr_shift
            W, c = self.params[rule.record]
            W -= lr * np.outer(x_in, e)
            c -= lr * e
        return loss
