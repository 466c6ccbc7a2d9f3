import os
import pathlib
import sys

import pytest

from exporters import firmware

# tests import helpers from tests/golden (e.g. ``from golden import training_cases``)
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def toolchain():
    """The ARM cross toolchain and QEMU for the firmware tests (exporters.firmware.find_toolchain);
    a skip without them, a failure when BLL_REQUIRE_FIRMWARE=1 (CI installs them)."""
    try:
        return firmware.find_toolchain()
    except firmware.ToolchainMissing as err:
        if os.environ.get("BLL_REQUIRE_FIRMWARE") == "1":
            pytest.fail(f"BLL_REQUIRE_FIRMWARE=1 but the firmware toolchain is missing: {err}")
        pytest.skip(f"firmware toolchain not installed ({err})")
