"""Exporters of trained bll_ref models: one HDF5 file with float weights, integer codes,
calibration data and traces (``exporters.hdf5``, format in docs/hdf5-format.md), and the
``bll-ref export`` / ``bll-ref verify`` commands (``exporters.cli``)."""
from .hdf5 import FORMAT, FORMAT_VERSION, ExportedModel, ExportFormatError, export, read, validate, verify, write

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedModel", "ExportFormatError", "export", "write", "read",
           "validate", "verify"]
