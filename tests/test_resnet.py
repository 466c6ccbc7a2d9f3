"""models.resnet18: the ResNet-18 layout in paper 001's 4 BLL blocks, its backward against central
finite differences (float64), checkpoints, and `bll-ref train --model resnet18` for bp, fa and bll."""
import json

import numpy as np
import pytest

from bll_ref import checkpoint, models
from bll_ref.cli import main as cli_main
from bll_ref.gradcheck import numeric_gradient, rel_error
from bll_ref.layers import (AvgPool2d, BatchNorm, Conv2d, Dense, ReLU, Residual, Sequential,
                            layer_from_config, load_state_dict, state_dict)
from bll_ref.methods import make


def _weight_layers(layer):
    """Convs and Dense layers on the main path (projection shortcuts not counted, as in '18')."""
    if isinstance(layer, (Conv2d, Dense)):
        return 1
    if isinstance(layer, Residual):
        return _weight_layers(layer.body)
    if isinstance(layer, Sequential):
        return sum(_weight_layers(l) for l in layer.layers)
    return 0


def test_layout_is_resnet18_in_four_blocks_at_stage_boundaries():
    blocks = models.resnet18(width=4, rng=0)
    assert len(blocks) == 4
    assert [_weight_layers(b) for b in blocks] == [5, 4, 4, 5]  # 18 weight layers
    assert [sum(isinstance(l, Residual) for l in b) for b in blocks] == [2, 2, 2, 2]
    for b in blocks[:3]:
        assert isinstance(b[-1], ReLU) and isinstance(b[-2], Residual)  # a_k = the residual sum
    assert isinstance(blocks[3][-1], Dense) and isinstance(blocks[3][-3], AvgPool2d)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    shapes = []
    for b in blocks:
        x = b.forward(x, train=False)
        shapes.append(x.shape[1:])
    assert shapes == [(4, 28, 28), (8, 14, 14), (16, 7, 7), (10,)]
    # projections exactly where the shape changes: stages 2-4, first basic block
    proj = [[l.shortcut is not None for l in b if isinstance(l, Residual)] for b in blocks]
    assert proj == [[False, False], [True, False], [True, False], [True, False]]


def test_width_scales_channels_and_bad_width_is_refused():
    n = lambda w: sum(v.size for b in models.resnet18(width=w) for v in b.params.values())
    assert 3.5 < n(16) / n(8) < 4.1  # ~width^2
    assert isinstance(models.build("resnet18", width=2, rng=0)[0][1], BatchNorm)
    with pytest.raises(ValueError, match="width"):
        models.resnet18(width=0)
    with pytest.raises(ValueError, match="at least 8x8"):
        models.resnet18(image_size=4)


def test_whole_model_backward_matches_central_differences_float64():
    """Train-mode forward (BatchNorm batch statistics): dL/dx in full and a random sample of 6
    entries of every parameter, L = sum(y * dy) with a random dy."""
    rng = np.random.default_rng(0)
    model = Sequential(*models.resnet18(width=2, image_size=8, n_classes=3, rng=0, dtype=np.float64))
    x = rng.standard_normal((4, 1, 8, 8))
    y = model.forward(x, train=True)
    dy = rng.standard_normal(y.shape)
    dx = model.backward(dy)
    grads = {k: v.copy() for k, v in model.grads.items()}

    def loss():
        return float(np.sum(model.forward(x, train=True) * dy))

    assert rel_error(dx, numeric_gradient(loss, x)) < 1e-6
    checked = 0
    for name, p in model.params.items():
        flat = p.reshape(-1)
        for i in rng.choice(flat.size, min(6, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + 1e-6
            fp = loss()
            flat[i] = old - 1e-6
            fm = loss()
            flat[i] = old
            num, ana = (fp - fm) / 2e-6, grads[name].reshape(-1)[i]
            assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)), (name, i, num, ana)
            checked += 1
    assert checked > 100


def test_config_and_checkpoint_round_trip(tmp_path):
    blocks = models.resnet18(width=3, rng=1)
    model = Sequential(*blocks)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = model.forward(x, train=False)
    clone = layer_from_config(model.config())
    load_state_dict(clone, state_dict(model))
    np.testing.assert_array_equal(clone.forward(x, train=False), y)
    checkpoint.save(tmp_path / "c.npz", model, {"model": "resnet18"})
    loaded, meta, _ = checkpoint.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(loaded.forward(x, train=False), y)


@pytest.mark.parametrize("method,opts", [("bp", {}), ("fa", {}), ("bll", {}), ("bll", {"variational": "none"}),
                                         ("bll", {"variational": "sim"})])
def test_one_step_changes_every_block(method, opts):
    rng = np.random.default_rng(1)
    blocks = models.resnet18(width=2, image_size=12, n_classes=5, rng=0)
    x = rng.standard_normal((6, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    m = make(method, blocks, sample_input=x, **({"n_classes": 5, **opts} if method == "bll" else {}))
    before = [{k: v.copy() for k, v in b.params.items()} for b in blocks]
    assert np.isfinite(m.train_step(x, y))
    for b, old in zip(blocks, before):
        assert any(not np.array_equal(old[k], v) for k, v in b.params.items())


@pytest.mark.parametrize("method", ["bp", "fa", "bll"])
def test_cli_trains_resnet18(method, tmp_path):
    out = tmp_path / method
    assert cli_main(["train", "--method", method, "--model", "resnet18", "--channels", "2", "--data", "synthetic",
                     "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--batch-size", "32",
                     "--out", str(out)]) == 0
    h = json.loads((out / "history.json").read_text())
    assert len(h["test_acc"]) == len(h["test_top3"]) == len(h["train_acc"]) == 1
    _, meta, _ = checkpoint.load(out / "checkpoint.npz")
    assert meta["model"] == "resnet18" and meta["options"]["channels"] == 2


def test_train_width_is_a_deprecated_name_of_channels(tmp_path, capsys):
    """--width means bits in export and finetune-q; for train it still works, with a note."""
    out = tmp_path / "w"
    assert cli_main(["train", "--method", "bp", "--model", "resnet18", "--width", "2", "--data", "synthetic",
                     "--limit-train", "32", "--limit-test", "16", "--epochs", "1", "--batch-size", "16",
                     "--out", str(out)]) == 0
    assert "--width is deprecated" in capsys.readouterr().err
    _, meta, _ = checkpoint.load(out / "checkpoint.npz")
    assert meta["options"]["channels"] == 2


@pytest.mark.parametrize("flag", ["--channels", "--width"])
def test_cli_refuses_channels_for_other_models(flag, tmp_path, capsys):
    assert cli_main(["train", "--model", "cnn", flag, "8", "--data", "synthetic", "--limit-train", "32",
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--channels applies to --model resnet18" in err and "Traceback" not in err


def test_run_saved_before_width_existed_resumes(tmp_path):
    """trainer.json options of a run saved before the config (no config_version) and before --width
    (no width/channels) resume; the history, which then also lacks test_top3/train_acc for its
    first epoch, keeps growing per epoch."""
    out = tmp_path / "old"
    common = ["--data", "synthetic", "--limit-train", "64", "--limit-test", "32", "--sizes", "784,8,10",
              "--batch-size", "32"]
    assert cli_main(["train", "--method", "bll", "--epochs", "1", *common, "--out", str(out)]) == 0
    trainer = out / "state" / "trainer.json"
    t = json.loads(trainer.read_text())
    del t["options"]["channels"], t["options"]["config_version"]
    for key in ("test_top3", "train_acc"):
        del t["history"][key]
    trainer.write_text(json.dumps(t))
    assert cli_main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    h = json.loads((out / "history.json").read_text())
    assert h["epochs"] == [1, 2] and len(h["test_top3"]) == 1
