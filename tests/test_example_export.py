"""Smoke test: examples/export_to_hardware.py end to end at a reduced size."""
import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "export_to_hardware.py"


def _load():
    spec = importlib.util.spec_from_file_location("export_to_hardware", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_example_runs_and_everything_verifies(tmp_path, capsys, monkeypatch):
    # synthetic path (fast and deterministic): no $BLL_DATA and nothing at the default path
    monkeypatch.delenv("BLL_DATA", raising=False)
    monkeypatch.setattr("bll_ref.data.DEFAULT_FASHION_MNIST_PATH", str(tmp_path / "no-data"))
    rc = _load().main(["--epochs", "1", "--n-train", "600", "--n-test", "200", "--hidden", "16",
                       "--out-dir", str(tmp_path / "hw")])
    out = capsys.readouterr().out
    assert "synthetic" in out
    assert out.count("bit-exact") == 2, out
    assert (tmp_path / "hw" / "model-w8.h5").exists() and (tmp_path / "hw" / "model.nir").exists()
    from exporters.c_header import find_c_compiler
    if find_c_compiler() is None:
        pytest.skip("no C compiler: the golden-model step was skipped by the example")
    assert "match the Python traces" in out
    assert rc == 0
