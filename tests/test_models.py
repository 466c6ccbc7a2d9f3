"""Every model builder: block structure, output shapes, config round trip, and one step of BP and
BLL that changes every block."""
import numpy as np
import pytest

from bll_ref import models
from bll_ref.layers import Sequential, layer_from_config, load_state_dict, state_dict
from bll_ref.methods import make

CASES = {
    "mlp": (lambda: models.mlp((20, 16, 12, 5), rng=0), lambda r: r.standard_normal((6, 20)).astype(np.float32), 3),
    "cnn": (lambda: models.cnn(image_size=12, channels=(4, 6), n_classes=5, rng=0),
            lambda r: r.standard_normal((6, 1, 12, 12)).astype(np.float32), 3),
    "resnet": (lambda: models.resnet(image_size=12, widths=(4, 6), blocks_per_stage=1, n_classes=5, rng=0),
               lambda r: r.standard_normal((6, 1, 12, 12)).astype(np.float32), 3),
    "transformer": (lambda: models.transformer(vocab=5, length=7, dim=8, n_blocks=2, rng=0),
                    lambda r: r.integers(0, 5, (6, 7)), 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_shapes_and_config_round_trip(name):
    build, sample, n_blocks = CASES[name]
    blocks, x = build(), sample(np.random.default_rng(0))
    assert len(blocks) == n_blocks and all(isinstance(b, Sequential) for b in blocks)
    model = Sequential(*blocks)
    y = model.forward(x, train=False)
    assert y.shape == ((6, 7, 5) if name == "transformer" else (6, 5)) and np.isfinite(y).all()
    clone = layer_from_config(model.config())
    load_state_dict(clone, state_dict(model))
    np.testing.assert_array_equal(clone.forward(x, train=False), y)


@pytest.mark.parametrize("method", ["bp", "bll"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_step_changes_every_block(name, method):
    build, sample, _ = CASES[name]
    rng = np.random.default_rng(1)
    blocks, x = build(), sample(rng)
    y = rng.integers(0, 5, (6, 7) if name == "transformer" else 6)
    m = make(method, blocks, sample_input=x, n_classes=5) if method == "bll" else make(method, blocks)
    before = [{k: v.copy() for k, v in b.params.items()} for b in blocks]
    loss = m.train_step(x, y)
    assert np.isfinite(loss)
    for b, old in zip(blocks, before):
        assert any(not np.array_equal(old[k], v) for k, v in b.params.items())


def test_unknown_builder_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("autoencoder")
