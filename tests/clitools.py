"""What the command-line tests share: a tiny training run's options and an in-process bll-ref."""
from bll_ref.cli import main

TINY = ["--data", "synthetic", "--sizes", "784,16,10", "--activation", "relu", "--limit-train", "300",
        "--limit-test", "100", "--epochs", "1"]


def cli(capsys, *argv):
    """Run bll-ref in-process -> (exit code, stdout, stderr); a bad-input error is one line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1, err
    return rc, out, err


def train_and_export(d):
    """A tiny BLL run on the synthetic task under ``d``: (run dir, checkpoint path, exported .h5)."""
    assert main(["train", *TINY, "--out", str(d / "run")]) == 0
    ck = d / "run" / "checkpoint.npz"
    h5 = d / "m.h5"
    assert main(["export", str(ck), "--out", str(h5), "--calibration", "64", "--traces", "4"]) == 0
    return d / "run", ck, h5
