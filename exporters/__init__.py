"""Exporters of trained bll_ref models.

* ``exporters.hdf5``: one HDF5 file with float weights, integer codes, calibration data and
  traces (format in docs/hdf5-format.md); ``hdf5_layout`` (names and attributes of the file) and
  ``hdf5_read`` (the one reader) serve it
* ``exporters.nir``: the float network as a NIR graph file
* ``exporters.c_header``: C header + C99 golden model + test program (``c_golden`` writes the
  per-record C code)
* ``exporters.from_checkpoint``: ``export_checkpoint``, a checkpoint file as ``bll-ref export``
  writes it (its data, its fine-tuned formats); ``input_kind``

The ``bll-ref export`` / ``verify`` / ``nir`` / ``c-header`` commands are in ``bll_ref.cli.export``;
nothing here imports a command line.

Every exporter reads the model through ``bll_ref.fixedpoint`` (records, the model walk) and
writes through ``bll_ref.fileio`` (atomic files, JSON).
"""
from .hdf5 import FORMAT, FORMAT_VERSION, ExportedModel, ExportFormatError, export, read, validate, verify, write

from .c_header import compile_c, find_c_compiler, write_c
from .from_checkpoint import export_checkpoint, input_kind
from .nir import to_nir_dict, write_nir

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedModel", "ExportFormatError", "export", "write", "read",
           "validate", "verify", "write_nir", "to_nir_dict", "write_c", "compile_c", "find_c_compiler",
           "export_checkpoint", "input_kind"]
