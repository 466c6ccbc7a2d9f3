"""Training methods sharing layers, optimisers and data: BLL, Backprop, FeedbackAlignment.

Every method takes ``(model, *, optimizer="adam", lr=1e-3, **optimiser keywords)`` plus its own
options, trains with ``train_step(x, y)``, and has ``state_dict()`` / ``load_state_dict()`` holding
everything needed to resume (parameters, buffers, optimiser state, auxiliary networks).
"""
from .backprop import Backprop
from .bll import BLL, BLL_OPTIONS, between_class_fraction, check_options
from .common import Method, evaluate, predict
from .feedback_alignment import FeedbackAlignment
from .learner import HiddenLearner, OutputLearner

__all__ = ["BLL", "Backprop", "FeedbackAlignment", "Method", "HiddenLearner", "OutputLearner", "make", "METHODS",
           "check_options", "BLL_OPTIONS", "evaluate", "predict", "between_class_fraction"]

METHODS = {"bp": Backprop, "fa": FeedbackAlignment, "bll": BLL}


def make(name, model, *, sample_input=None, rng=0, **options):
    """The training method ``name`` ("bp", "fa" or "bll") over ``model`` (a list of blocks).

    ``options`` are the method's keywords (BLL: its local-rule options, see ``BLL``) and optimiser
    keywords (``momentum``, ``weight_decay``, ...). Options that do not apply raise ValueError.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    if name == "bll":
        return BLL(model, sample_input=sample_input, rng=rng, **options)
    bll_only = sorted(set(options) & set(BLL_OPTIONS))
    if bll_only:
        raise ValueError(f"{', '.join(bll_only)} apply to method 'bll' only, not {name!r}")
    return FeedbackAlignment(model, rng=rng, **options) if name == "fa" else Backprop(model, **options)
