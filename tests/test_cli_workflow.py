"""The README's hardware workflow through the CLI: train -> export -> verify -> nir -> c-header."""
import pytest

from bll_ref.cli import main


def test_train_export_verify_nir_c(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "bll", "--data", "synthetic", "--sizes", "784,16,10",
                 "--activation", "relu", "--epochs", "1", "--limit-train", "300", "--limit-test", "100",
                 "--out", str(run)]) == 0
    ck = str(run / "checkpoint.npz")
    h5 = str(tmp_path / "m.h5")
    assert main(["export", ck, "--out", h5, "--width", "8", "--calibration", "64", "--traces", "8"]) == 0
    assert main(["verify", h5, "--limit-test", "50"]) == 0
    assert main(["nir", ck, "--out", str(tmp_path / "m.nir")]) == 0
    out = capsys.readouterr().out
    assert "OK: integer inference" in out and "m.nir" in out
    nir = pytest.importorskip("nir", reason="nir not installed: NIR read-back not checked")
    assert "input" in nir.read(str(tmp_path / "m.nir")).nodes
    from exporters import find_c_compiler
    args = ["c-header", h5, "--out-dir", str(tmp_path / "c"), "--vectors", "3"]
    if find_c_compiler() is not None:
        args.append("--compile")
    assert main(args) == 0
    assert (tmp_path / "c" / "bll_model.h").exists()
    if find_c_compiler() is None:
        pytest.skip("no C compiler: golden model written but not compiled")
    assert "matches the stored traces" in capsys.readouterr().out


def test_bad_command_line_input_gives_clear_errors(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "nope"])
