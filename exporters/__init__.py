"""Exporters of trained bll_ref models: one HDF5 file with float weights, integer codes,
calibration data and traces (``exporters.hdf5``, format in docs/hdf5-format.md), and the
``bll-ref export`` / ``bll-ref verify`` commands (``exporters.cli``)."""
from .hdf5 import FORMAT, FORMAT_VERSION, ExportedModel, ExportFormatError, export, read, validate, verify, write

from .c_header import compile_c, find_c_compiler, write_c
from .nir import to_nir_dict, write_nir

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedModel", "ExportFormatError", "export", "write", "read",
           "validate", "verify", "write_nir", "to_nir_dict", "write_c", "compile_c", "find_c_compiler"]
