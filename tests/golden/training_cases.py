"""Small deterministic training runs whose final states are pinned by sha256 (training_hashes.json).

The hashes were first made with the code as it was before the block-learner refactor (issue 9), so
the test that re-runs these cases proved that the refactor kept every update bit for bit. They were
regenerated on purpose (issue 10) when the optimisers became float32 SIMD kernels and again when
LayerNorm, BatchNorm, MaxPool2d, the Conv2d bias sum (float64 sums) and chunked im2col became Numba kernels: each time every case's
final parameters agreed with the previous code's within 1e-6 relative, except the bias of a Conv2d
followed by BatchNorm and the BatchNorm running mean it feeds (the bias's true gradient is 0, so
Adam normalises float32 rounding noise into +-lr steps either way). Run this file as a script to print the hashes of the current code.
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from bll_ref import data, models
from bll_ref.layers import state_dict
from bll_ref.loop import fit
from bll_ref.methods import BLL, Backprop, FeedbackAlignment


def _mlp_data():
    x, y = data.synthetic_classification(448, n_features=64, n_classes=10, rng=7)
    return {"x_train": x[:384], "y_train": y[:384], "x_test": x[384:], "y_test": y[384:]}


def _img_data():
    x, y = data.synthetic_images(224, n_classes=4, size=12, rng=7)
    return {"x_train": x[:192], "y_train": y[:192], "x_test": x[192:], "y_test": y[192:]}


def _mlp(act="leaky_relu"):
    return models.mlp((64, 48, 40, 32, 10), activation_name=act, rng=3)


def _cnn():
    return models.cnn(image_size=12, channels=(4, 8), n_classes=4, rng=3)


CASES = {
    "bll_default": lambda d: BLL(_mlp(), sample_input=d["x_train"][:8]),
    "bll_head_only": lambda d: BLL(_mlp(), variational="none", sample_input=d["x_train"][:8]),
    "bll_eq8_trained": lambda d: BLL(_mlp("sigmoid"), variational="eq8", feedback="trained",
                                     sample_input=d["x_train"][:8]),
    "bll_kl_twin": lambda d: BLL(_mlp("sigmoid"), variational="bernoulli_kl", feedback="twin",
                                 sample_input=d["x_train"][:8]),
    "bll_span2": lambda d: BLL(_mlp(), span=2, sample_input=d["x_train"][:8]),
    "bll_gauss_decay_sgd": lambda d: BLL(_mlp(), variational="gauss", anneal=False, feedback_decay=0.9,
                                         optimizer="sgd", lr=0.01, sample_input=d["x_train"][:8]),
    "bll_cnn": lambda d: BLL(_cnn(), n_classes=4, sample_input=d["x_train"][:8]),
    "bp": lambda d: Backprop(_mlp()),
    "fa": lambda d: FeedbackAlignment(_mlp(), rng=5),
    "bp_cnn_sgd_momentum": lambda d: Backprop(_cnn(), optimizer="sgd", lr=0.05, momentum=0.9),
}


def dataset(case):
    return _img_data() if "cnn" in case else _mlp_data()


def digest(arrays: dict) -> dict:
    """name -> sha256 of dtype, shape and bytes."""
    out = {}
    for k in sorted(arrays):
        v = np.ascontiguousarray(arrays[k])
        h = hashlib.sha256(f"{v.dtype.str}{v.shape}".encode())
        h.update(v.tobytes())
        out[k] = h.hexdigest()
    return out


def run(case) -> dict:
    """Train ``case`` for 2 epochs of batch 32 (seed 11) and hash the model and auxiliary state."""
    d = dataset(case)
    method = CASES[case](d)
    fit(method, d, epochs=2, batch_size=32, rng=11, log=None)
    arrays = {f"model/{k}": v for k, v in state_dict(method.model).items()}
    if hasattr(method, "aux_state"):
        arrays.update({f"aux/{k}": v for k, v in method.aux_state().items()})
    return digest(arrays)


if __name__ == "__main__":
    json.dump({c: run(c) for c in CASES}, sys.stdout, indent=1, sort_keys=True)
