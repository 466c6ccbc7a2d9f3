"""The block-learner refactor changed no update: 10 small training runs (BLL variants incl. span 2,
twin and trained feedback, a CNN, BP, FA) end with arrays whose sha256 equal the ones stored in
tests/golden/training_hashes.json, which were made with the code before the refactor."""
import json
import pathlib

import pytest

from golden import training_cases

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "training_hashes.json").read_text())
# New since the refactor, on purpose: FA's feedback matrices are now saved with the model.
NEW_KEYS = {"fa": {f"aux/fa_feedback{i}" for i in range(4)}}


@pytest.mark.parametrize("case", sorted(training_cases.CASES))
def test_training_is_bit_identical_to_pre_refactor_code(case):
    got = training_cases.run(case)
    assert set(got) == set(GOLDEN[case]) | NEW_KEYS.get(case, set())
    differ = [k for k in GOLDEN[case] if got[k] != GOLDEN[case][k]]
    assert not differ, f"{case}: arrays differ from the pre-refactor run: {differ[:5]}"
