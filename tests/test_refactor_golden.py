"""The block-learner refactor changed no update: 10 small training runs (BLL variants incl. span 2,
twin and trained feedback, a CNN, BP, FA) end with arrays whose sha256 equal the ones stored in
tests/golden/training_hashes.json, which were made with the code before the refactor.

The last bits of a float32 GEMM depend on which OpenBLAS kernels run (the CPU, or
OPENBLAS_CORETYPE where a machine sets it), so the hashes are kept per OpenBLAS architecture:
training_hashes.json for SkylakeX (where they were first made), training_hashes_blas.json for the
others, each made by running tests/golden/training_cases.py with the reference code (2bb99b9,
the pre-GPU main) under that architecture."""
import json
import pathlib

import numpy as np  # noqa: F401  (loads OpenBLAS, so threadpoolctl can name its architecture)
import pytest
import threadpoolctl

from golden import training_cases

_DIR = pathlib.Path(__file__).parent / "golden"
_ARCH = next((i.get("architecture") for i in threadpoolctl.threadpool_info()
              if i.get("internal_api") == "openblas"), None)
_BY_ARCH = {"SkylakeX": json.loads((_DIR / "training_hashes.json").read_text()),
            **json.loads((_DIR / "training_hashes_blas.json").read_text())}
GOLDEN = _BY_ARCH.get(_ARCH)
# New since the refactor, on purpose: FA's feedback matrices are now saved with the model.
NEW_KEYS = {"fa": {f"aux/fa_feedback{i}" for i in range(4)}}


@pytest.mark.parametrize("case", sorted(training_cases.CASES))
def test_training_is_bit_identical_to_pre_refactor_code(case):
    assert GOLDEN is not None, (f"no golden training hashes for OpenBLAS architecture {_ARCH!r} (have "
                                f"{sorted(_BY_ARCH)}): add them to tests/golden/training_hashes_blas.json, "
                                f"made with the reference code (git worktree of 2bb99b9) on this machine")
    got = training_cases.run(case)
    assert set(got) == set(GOLDEN[case]) | NEW_KEYS.get(case, set())
    differ = [k for k in GOLDEN[case] if got[k] != GOLDEN[case][k]]
    assert not differ, f"{case}: arrays differ from the pre-refactor run: {differ[:5]}"
