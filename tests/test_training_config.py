"""TrainConfig: every run option once, checked in one place before anything is built. The table of
which BLL option applies to which method and variant is written out here by hand (from the papers'
variants, not from the code's declarations), so a wrong declaration in terms.py / messages.py or a
missed refusal fails."""
import json

import numpy as np
import pytest

from bll_ref.loop import TIMING_FIELDS
from bll_ref.training import CONFIG_VERSION, TrainConfig, resume, train

# option -> a value that is valid on its own
VALUES = {"var_weight": 0.5, "tau": 1.0, "m": 0.5, "no_anneal": True, "eq8_terms": "forward", "l2": 2.0,
          "feedback_decay": 0.9, "feedback_lr": 1e-3, "feedback": "trained", "head_weight": 2.0, "span": 2}
TERM_TAKES = {"gauss_ln": {"var_weight", "tau", "m", "no_anneal"}, "gauss": {"var_weight", "tau", "m", "no_anneal"},
              "eq8": {"var_weight", "tau", "m", "eq8_terms"}, "bernoulli_kl": {"var_weight", "tau", "m"},
              "none": set(), "sim": {"var_weight"}}
USES_FEEDBACK = {"gauss_ln", "gauss", "eq8", "bernoulli_kl"}
SOURCE_TAKES = {"closed": {"l2", "feedback_decay"}, "trained": {"feedback_lr"}, "twin": {"feedback_lr"}}
EVERY_VARIANT = {"head_weight", "span"}


def _cases():
    for method in ("bp", "fa"):
        for opt in sorted(VALUES):
            yield method, None, None, opt, False
    for variational, takes in TERM_TAKES.items():
        sources = SOURCE_TAKES if variational in USES_FEEDBACK else {None: set()}
        for feedback, source_takes in sources.items():
            for opt in sorted(set(VALUES) - {"feedback"}):
                ok = opt in takes | source_takes | EVERY_VARIANT
                yield "bll", variational, feedback, opt, ok
            if feedback is None:  # a term without a feedback network refuses --feedback itself
                yield "bll", variational, None, "feedback", False


@pytest.mark.parametrize("method,variational,feedback,opt,applies", list(_cases()))
def test_inapplicable_options_are_refused_for_every_method_and_variant(method, variational, feedback, opt, applies):
    cfg = TrainConfig(method=method, variational=variational, feedback=feedback, data="synthetic")
    setattr(cfg, opt, VALUES[opt])
    if applies:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="appl"):
            cfg.validate()


def test_value_checks_name_the_option():
    for field, value, words in (("lr", 0.0, "--lr"), ("lr", float("nan"), "--lr"), ("epochs", 0, "--epochs"),
                                ("batch_size", 1.5, "--batch-size"), ("model", "vit", "--model"),
                                ("sizes", "784,x,10", "--sizes"), ("channels", 4, "--channels"),
                                ("parallel", "streams", "--device cuda"), ("m", 2.0, "--m")):
        with pytest.raises(ValueError, match=words):
            TrainConfig(**{field: value}).validate()


def test_config_round_trip_and_runs_saved_before_it():
    cfg = TrainConfig(method="fa", sizes="784,32,10", epochs=3, lr=5e-4, channels=None)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["config_version"] == CONFIG_VERSION and TrainConfig.from_dict(d) == cfg
    old = {k: v for k, v in d.items() if k not in ("config_version", "channels")}
    old.update(width=None, resume=None)      # the command line's options, as runs stored them before
    assert TrainConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({**d, "lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="config_version"):
        TrainConfig.from_dict({**d, "config_version": CONFIG_VERSION + 1})


def test_train_then_resume_equals_one_run(tmp_path):
    """The library API: two epochs, then resume to three, make the same updates as three at once."""
    common = dict(method="bll", sizes="784,16,16,10", data="synthetic", limit_train=256, limit_test=64,
                  batch_size=64, seed=3)
    whole = train(TrainConfig(**common, epochs=3, out=str(tmp_path / "whole")), log=None)
    train(TrainConfig(**common, epochs=2, out=str(tmp_path / "split")), log=None)
    split = resume(str(tmp_path / "split"), epochs=3, log=None)
    strip = lambda h: {k: v for k, v in h.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(split.history) == strip(whole.history)
    a, b = (np.load(tmp_path / r / "checkpoint.npz") for r in ("whole", "split"))
    assert all(np.array_equal(a[k], b[k]) for k in a.files if k.startswith("model/"))
    with pytest.raises(ValueError, match="--lr"):
        resume(str(tmp_path / "split"), lr=0.1, log=None)
