"""Fixed-point (Q-format) quantisation, integer ops, and integer-only reference inference.

=================  ===============================================================================
module             what
=================  ===============================================================================
``qformat``        :class:`QFormat`, quantize / dequantize, round_shift / div_round / overflow /
                   requantize
                   (no layer knowledge)
``calibrate``      the Q format of a weight tensor or a batch of activations
``records``        one dataclass per record kind (dense, conv2d, scale, relu, ..., lut): validates
                   itself, runs itself in int64 arithmetic, and is plain data for exporters
``model``          :class:`IntegerModel`: the list of records, linked and run
``walk``           the one walk over a float model (flattening, BatchNorm folding), shared with
                   ``exporters.nir``
``compile``        :func:`compile_integer`: float model -> records -> IntegerModel
``learn``          on-device learning: the integer BLL update of Dense blocks and its checks
                   (docs/on-device-learning.md)
``learn_float``    the float twin of that update, the closed-form feedback table
=================  ===============================================================================

:meth:`IntegerModel.from_records` rebuilds the same bit-exact inference from the records' plain
data alone (what an exporter wrote).
"""
from .compile import compile_integer
from .model import IntegerModel
from .calibrate import calibrate_activation, calibrate_weight
from .qformat import (OVERFLOW_MODES, ROUNDING_MODES, QFormat, dequantize, div_round, overflow, quantize, requantize,
                      round_shift)
from .records import RECORD_KINDS, RECORD_TYPES, Record
from .walk import fold_batchnorm

__all__ = [
    "QFormat", "quantize", "dequantize", "round_shift", "div_round", "overflow", "requantize",
    "calibrate_weight", "calibrate_activation", "fold_batchnorm", "IntegerModel",
    "compile_integer", "ROUNDING_MODES", "OVERFLOW_MODES", "RECORD_KINDS", "RECORD_TYPES", "Record",
]
