"""bll_ref: a NumPy reference implementation of Block-Local Learning (BLL).

Public entry points (see README.md):

* ``bll_ref.layers``     hand-written layers (forward/backward), ``Sequential`` blocks
* ``bll_ref.models``     model builders returning lists of blocks (mlp, cnn, resnet, transformer)
* ``bll_ref.losses``     exponential families, the paper's local estimators, Numba kernels, output losses
* ``bll_ref.feedback``   closed-form / trained / twin feedback networks
* ``bll_ref.methods``    BLL (block learners), Backprop, FeedbackAlignment, ``make`` and the training loop ``fit``
* ``bll_ref.parallel``   schedules running block learners: sequential, threads, MPI
* ``bll_ref.runstate``   resumable per-epoch state of a run
* ``bll_ref.report``     learning-curve and diagnostics figures of run directories
* ``bll_ref.optim``      SGD, Adam
* ``bll_ref.data``       Fashion-MNIST IDX reader, batches, synthetic tasks
* ``bll_ref.fixedpoint`` Q formats and integer reference inference
* ``bll_ref.checkpoint`` .npz checkpoints (no pickle)
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys


def _check_numba_threads():
    """``NUMBA_NUM_THREADS`` <= 0 makes ``import numba`` raise ValueError (a traceback before any
    command runs); Numba itself ignores a non-number with a warning, so a count < 1 is ignored the
    same way, and said."""
    v = _os.environ.get("NUMBA_NUM_THREADS")
    try:
        bad = v is not None and int(v) < 1
    except ValueError:
        bad = False  # not a number: Numba warns and uses its default
    if bad:
        del _os.environ["NUMBA_NUM_THREADS"]
        print(f"bll_ref: warning: NUMBA_NUM_THREADS={v} is not a number of threads >= 1; ignored "
              f"(Numba uses its default, {_os.cpu_count()} on this machine)", file=_sys.stderr)


def _guard_numba_cache():
    """A damaged Numba cache file (``cache=True`` kernels: ``__pycache__/*.nbi|*.nbc`` or
    ``$NUMBA_CACHE_DIR``) made the first kernel call raise UnpicklingError. Such a file is now
    removed, said in one line, and the kernel compiled again (a cache miss). Numba's
    ``IndexDataCacheFile`` is internal: where it has changed, nothing is patched."""
    try:
        from numba.core import caching
    except ImportError:  # numba missing: the kernels' own imports say so
        return
    cls = getattr(caching, "IndexDataCacheFile", None)
    if cls is None or getattr(cls, "_bll_ref_guarded", False) or not all(
            hasattr(cls, m) for m in ("_load_index", "_load_data", "_data_path")):
        return
    load_index, load_data = cls._load_index, cls._load_data

    def _damaged(path, e):
        try:
            _os.remove(path)
            what = "removed it, compiling again"
        except OSError as err:
            what = f"could not remove it ({err.strerror}); compiling without it"
        print(f"bll_ref: warning: Numba cache file {path} is damaged ({type(e).__name__}: {e}); {what}",
              file=_sys.stderr)

    def _load_index(self):
        try:
            return load_index(self)
        except (OSError, MemoryError):
            raise
        except Exception as e:  # UnpicklingError, EOFError, ValueError, ... of a damaged index
            _damaged(self._index_path, e)
            return {}

    def _load_data(self, name):
        try:
            return load_data(self, name)
        except (OSError, MemoryError):
            raise
        except Exception as e:  # a damaged data file: a cache miss (load() returns None on OSError)
            _damaged(self._data_path(name), e)
            raise OSError(f"damaged Numba cache file {name}") from None

    cls._load_index, cls._load_data, cls._bll_ref_guarded = _load_index, _load_data, True


_check_numba_threads()
_guard_numba_cache()

from . import checkpoint, data, feedback, fixedpoint, layers, losses, methods, models, optim, parallel, runstate  # noqa: E402

__all__ = ["checkpoint", "data", "feedback", "fixedpoint", "layers", "losses", "methods", "models", "optim",
           "parallel", "runstate", "__version__"]
