"""The IDX file format (Fashion-MNIST's): read and write, with clear errors for broken files."""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from .memory import check_fits

__all__ = ["read_idx", "write_idx"]

# --------------------------------------------------------------------------- IDX format
# http://yann.lecun.com/exdb/mnist/ : magic = 0x00 0x00 <type code> <ndim>, then ndim
# big-endian uint32 sizes, then the data, big-endian, C order.
_IDX_TYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IDX_CODES = {(dt.kind, dt.itemsize): code for code, dt in _IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _idx_type_list() -> str:
    return ", ".join(f"0x{c:02X} ({dt.newbyteorder('=').name})" for c, dt in _IDX_TYPES.items())


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed; gzip is detected by its magic bytes 1f 8b).

    The header is read first and the payload only up to the size it declares (plus a little, to
    detect trailing bytes): a gzip bomb cannot make us inflate more than the declared array, and
    a header declaring more than this machine's memory is refused before reading.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    array : ndarray, shape = the dims in the header, dtype one of uint8, int8, int16, int32,
        float32, float64 (native byte order, writable, C-contiguous).

    Raises
    ------
    ValueError
        Corrupted gzip stream, bad magic, unknown type code, short header, a declared size larger
        than memory, or a payload whose size is not exactly prod(dims) * itemsize (truncated file
        or trailing bytes). The message names the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raw.seek(0)
            return _read_stream(path, raw)
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                return _read_stream(path, g)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupted gzip stream ({e}); re-download or re-extract the file") from None


_TRAILING_PROBE = 1 << 20  # bytes read past the declared payload to count trailing bytes


def _read_stream(path, f):
    head = f.read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: {len(head)} bytes is shorter than the 4-byte IDX magic; not an IDX file")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(f"{path}: not an IDX file: magic must start with 0x00 0x00, "
                         f"got 0x{head[0]:02X} 0x{head[1]:02X}")
    code, ndim = head[2], head[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; expected one of {_idx_type_list()}")
    header = 4 + 4 * ndim
    dim_bytes = f.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise ValueError(f"{path}: IDX header declares ndim={ndim} and needs {header} bytes, "
                         f"file has only {4 + len(dim_bytes)}")
    dims = tuple(int(d) for d in np.frombuffer(dim_bytes, dtype=">u4"))
    dtype = _IDX_TYPES[code]
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    check_fits(expected, f"{path}: its IDX header declares shape {dims} of {dtype.newbyteorder('=').name}, which")
    try:
        data = f.read(expected + _TRAILING_PROBE)
    except MemoryError:
        raise ValueError(f"{path}: its IDX header declares shape {dims} ({expected:,} bytes), more than the "
                         "free memory; the file is damaged, or free some memory") from None
    got = len(data)
    if got != expected:
        more = got == expected + _TRAILING_PROBE
        what = "truncated" if got < expected else f"{'more than ' * more}{got - expected} trailing bytes"
        raise ValueError(f"{path}: IDX header says shape {dims} of {dtype.newbyteorder('=').name}, "
                         f"i.e. {expected} payload bytes, got {'more than ' * more}{got} ({what})")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize)
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def write_idx(path, array, *, compress=None) -> None:
    """Write ``array`` as an IDX file.

    Parameters
    ----------
    path : str or os.PathLike
    array : array_like of dtype uint8, int8, int16, int32, float32 or float64, any shape
        with at most 255 axes, each shorter than 2**32.
    compress : bool or None
        gzip the file; None (default) means: when the name ends in ``.gz``. The gzip header
        carries no time stamp, so equal arrays give equal files.
    """
    path = os.fspath(path)
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise ValueError(f"write_idx: IDX has no type for dtype {array.dtype}; convert to one of "
                         "uint8, int8, int16, int32, float32, float64 first")
    if array.ndim > 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"write_idx: IDX holds at most 255 axes each < 2**32, got shape {array.shape}")
    header = bytes([0, 0, _IDX_CODES[key], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=_IDX_TYPES[_IDX_CODES[key]]).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    with open(path, "wb") as f:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
                g.write(header + payload)
        else:
            f.write(header + payload)
