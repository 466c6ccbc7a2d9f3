"""Exporters of trained bll_ref models.

``exporters.hdf5``         one HDF5 file with float weights, integer codes, calibration data and
                           traces (format in docs/hdf5-format.md); ``hdf5_layout`` (names and
                           attributes of the file) and ``hdf5_read`` (the one reader) serve it
``exporters.nir``          the float network as a NIR graph file
``exporters.c_header``     C header + C99 golden model + test program (``c_golden`` writes the
                           per-record C code)
``exporters.cli``          the ``bll-ref export`` / ``verify`` / ``nir`` / ``c-header`` commands

Every exporter reads the model through ``bll_ref.fixedpoint`` (records, the model walk) and
writes through ``bll_ref.fileio`` (atomic files, JSON).
"""
from .hdf5 import FORMAT, FORMAT_VERSION, ExportedModel, ExportFormatError, export, read, validate, verify, write

from .c_header import compile_c, find_c_compiler, write_c
from .nir import to_nir_dict, write_nir

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedModel", "ExportFormatError", "export", "write", "read",
           "validate", "verify", "write_nir", "to_nir_dict", "write_c", "compile_c", "find_c_compiler"]
