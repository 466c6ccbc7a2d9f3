"""Training methods sharing layers, optimisers and data: BLL, Backprop, FeedbackAlignment."""
from .backprop import Backprop
from .bll import BLL, between_class_fraction
from .common import Method, evaluate, fit, predict
from .feedback_alignment import FeedbackAlignment

__all__ = ["BLL", "Backprop", "FeedbackAlignment", "Method", "fit", "evaluate", "predict", "between_class_fraction"]
