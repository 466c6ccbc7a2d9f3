"""The pieces an MPI rank 0 writes a run from without holding the whole model (parallel/epoch_end.py):
a checkpoint written entry by entry from per-block parts, state files from a stream of parts, and
the diagnostics of consecutive groups of blocks. Each is checked against the whole-model path it
replaces, on one process (the MPI runs themselves: test_parallel*.py)."""
import json
import os

import numpy as np
import pytest

from bll_ref import checkpoint, data, models, runstate
from bll_ref.fileio import write_npz
from bll_ref.layers import Sequential, state_dict
from bll_ref.loop import fit
from bll_ref.methods import make


def _cnn_bll():
    x, y = data.synthetic_images(96, n_classes=4, size=12, rng=3)
    blocks = models.cnn(image_size=12, channels=(4, 8, 8), n_classes=4, rng=1)  # BatchNorm: buffers too
    m = make("bll", blocks, sample_input=x[:4], n_classes=4)
    fit(m, {"x_train": x[:64], "y_train": y[:64], "x_test": x[64:], "y_test": y[64:]}, epochs=1, batch_size=16,
        rng=5, log=None)
    return m, x[64:], y[64:]


@pytest.fixture(scope="module")
def trained():
    return _cnn_bll()


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_block_entries_in_block_order_are_the_whole_models_entries(name):
    blocks = models.mlp((32, 24, 20, 4), rng=0) if name == "mlp" else models.build(name, rng=0)
    whole = list(state_dict(Sequential(*blocks)))
    params, buffers = [], []
    for k, block in enumerate(blocks):
        p, b = checkpoint.block_entries(k, block)
        params += list(p)
        buffers += list(b)
    assert params + buffers == [f"model/{n}" for n in whole]
    if name != "mlp":
        assert buffers  # BatchNorm's running statistics are in the comparison


def test_checkpoint_from_streamed_parts_has_the_same_bytes_as_the_whole_models(trained, tmp_path):
    """Rank 0's order: every block's params as its stage arrives, then the buffers, the heads and
    the feedback weights it kept; the same file, byte for byte, as checkpoint.save of the model."""
    m, _, _ = trained
    meta = {"method": "bll", "test_acc": [0.5]}
    whole = checkpoint.save(tmp_path / "whole.npz", m.model, meta, m.aux_state())
    params, kept = [], [[], [], []]
    for k, learner in enumerate(m.learners):
        p, b = checkpoint.block_entries(k, m.model.layers[k])
        params += p.items()
        kept[0] += b.items()
        if k < len(m.learners) - 1:
            kept[1] += [(f"aux/{n}", v) for n, v in learner.head_aux().items()]
            kept[2] += [(f"aux/{n}", v) for n, v in learner.feedback_aux().items()]
    assert kept[1] and kept[2]
    streamed = checkpoint.save_entries(tmp_path / "streamed.npz", m.model.config(),
                                       iter(params + kept[0] + kept[1] + kept[2]), meta)
    with open(whole, "rb") as a, open(streamed, "rb") as b:
        assert a.read() == b.read()
    model, got_meta, aux = checkpoint.load(streamed)
    assert got_meta == meta and set(aux) == set(m.aux_state())


def test_a_stream_that_fails_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "c.npz"
    write_npz(path, {"a": np.arange(3)})
    before = path.read_bytes()

    def entries():
        yield "a", np.zeros(5)
        raise RuntimeError("the rank sending the next stage died")
    with pytest.raises(RuntimeError, match="died"):
        write_npz(path, entries())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.npz"]


def test_state_files_from_parts_equal_the_methods_own_and_a_missing_part_is_refused(trained, tmp_path):
    m, _, _ = trained
    runstate.save(tmp_path / "own", m, 1, {"x": 1}, {"h": 1})
    parts = [(f"learner{l.k}", l.state_dict()) for l in m.learners]
    runstate.save(tmp_path / "parts", m, 1, {"x": 1}, {"h": 1}, parts=iter(parts))
    for f in sorted(os.listdir(tmp_path / "own")):
        assert (tmp_path / "own" / f).read_bytes() == (tmp_path / "parts" / f).read_bytes(), f
    with pytest.raises(RuntimeError, match="not the model's"):
        runstate.save(tmp_path / "parts", m, 2, {"x": 2}, {"h": 2}, parts=iter(parts[:-1]))
    with open(tmp_path / "parts" / runstate.TRAINER) as f:
        assert json.load(f)["epoch"] == 1  # the last complete epoch is still the one to resume


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_diagnostics_of_consecutive_groups_make_the_whole_record(trained, cut):
    m, x, y = trained
    first, h = m.block_diagnostics(range(cut), x, y)
    rest, _ = m.block_diagnostics(range(cut, len(m.learners)), np.asarray(h), y)
    assert m.diagnostics_record(first + rest, m.out_loss()) == m.epoch_diagnostics(x, y)
    assert len(first + rest) == len(m.learners) - 1


def test_an_aborting_process_removes_the_temporaries_it_is_writing(tmp_path):
    """MPI Abort ends a rank without unwinding: the rank first removes what it was writing."""
    from bll_ref.fileio import atomic_path, remove_partial_files
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "checkpoint.npz") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            remove_partial_files()
            assert not os.path.exists(tmp)
            open(tmp, "rb")  # what the abort leaves: nothing
    assert os.listdir(tmp_path) == []
