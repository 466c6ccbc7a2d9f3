"""Device plumbing that a CPU-only machine can check: the array module follows the arrays, the NumPy
path is the one the golden hashes pin (tests/test_refactor_golden.py), checkpoints and state are
host arrays, and asking for a GPU where there is none is one line and exit 2, never a traceback.
(The GPU path itself is checked on a GPU by benchmarks/gpu_check.py.)"""
import os
import subprocess
import sys

import numpy as np
import pytest

from bll_ref import backend, models
from bll_ref import layers as L
from bll_ref.layers import Dense, Layer, Sequential
from bll_ref.methods import make
from bll_ref.methods.common import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = backend._gpu_status()[0]
needs_no_gpu = pytest.mark.skipif(GPU, reason="checks the behaviour on a machine without a usable GPU")


def _cli(*argv, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "bll_ref.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_array_module_follows_the_arrays_on_the_host():
    x = np.ones((2, 3), np.float32)
    assert backend.array_module(x) is np
    assert backend.array_module(x, [1, 2]) is np
    assert backend.asnumpy(x) is x
    assert backend.to_device(x, "cpu") is x
    assert backend.device_of(x) == "cpu"


def test_device_names_are_checked():
    with pytest.raises(backend.DeviceError, match="one of cpu, cuda, auto"):
        backend.resolve_device("gpu")
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("auto") == ("cuda" if GPU else "cpu")


@needs_no_gpu
def test_cuda_without_a_gpu_is_a_device_error_naming_the_extra_or_the_cause():
    with pytest.raises(backend.DeviceError, match="device 'cuda' is not available: ") as e:
        backend.resolve_device("cuda")
    assert "\n" not in str(e.value)
    model = models.mlp((4, 3, 2), rng=0)
    m = make("bp", model, rng=0)
    with pytest.raises(backend.DeviceError):
        m.to("cuda")
    assert m.device == "cpu"


def test_layers_without_a_gpu_path_are_refused_by_name():
    """Every built-in layer has a GPU path; a layer type that declares none is refused by name,
    before any layer moves."""
    class HostOnly(Layer):
        runs_on_gpu = False

    model = Sequential(Dense(3, 2, rng=0), HostOnly())
    with pytest.raises(backend.DeviceError, match="HostOnly has no GPU path"):
        model.to("cuda")
    assert type(model.layers[0].params["W"]) is np.ndarray
    public = [getattr(L, n) for n in L.__all__]
    types_ = [c for c in public if isinstance(c, type) and issubclass(c, Layer) and c is not Layer]
    assert len(types_) >= 17 and all(c.runs_on_gpu for c in types_), [c for c in types_ if not c.runs_on_gpu]


def test_to_cpu_keeps_every_array_and_training_result():
    """to('cpu') on a CPU model is a no-op that changes no bit of a training run."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 20), np.float32), rng.integers(0, 3, 64)
    runs = []
    for move in (False, True):
        m = make("bll", models.mlp((20, 16, 16, 3), rng=1), sample_input=x[:8], rng=1, n_classes=3)
        if move:
            m.to("cpu")
        for s in range(4):
            m.train_step(x[16 * s:16 * (s + 1)], y[16 * s:16 * (s + 1)])
        runs.append(m.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


def test_state_and_predictions_are_host_numpy_arrays():
    x = np.random.default_rng(0).random((10, 6), np.float32)
    m = make("bll", models.mlp((6, 5, 5, 3), rng=0), sample_input=x[:8], rng=0, n_classes=3)
    m.train_step(x, np.arange(10) % 3)
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in m.state_dict().values())
    assert all(isinstance(v, np.ndarray) for v in m.aux_state().values())
    assert isinstance(predict(m.model, x), np.ndarray)


def test_layer_state_dict_is_a_copy():
    d = Dense(3, 2, rng=0)
    from bll_ref.layers import state_dict
    s = state_dict(d)
    s["params/W"][...] = 7
    assert not np.any(d.params["W"] == 7)


@needs_no_gpu
def test_train_device_cuda_without_gpu_exits_2_with_one_line(tmp_path):
    r = _cli("train", "--device", "cuda", "--data", "synthetic", "--epochs", "1", "--limit-train", "64",
             "--limit-test", "32", "--sizes", "784,8,10", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "device 'cuda' is not available" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_streams_schedule_needs_the_gpu_device(tmp_path):
    r = _cli("train", "--parallel", "streams", "--data", "synthetic", "--epochs", "1", "--limit-train", "64",
             "--sizes", "784,8,10", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "needs --device cuda" in r.stderr and "Traceback" not in r.stderr


def test_threads_with_cuda_is_refused_before_any_work(tmp_path):
    r = _cli("train", "--parallel", "threads", "--device", "cpu", "--data", "synthetic", "--epochs", "1",
             "--limit-train", "64", "--limit-test", "32", "--sizes", "784,8,8,10", "--out", str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr  # threads on the CPU still work


def test_doctor_reports_every_piece_and_exits_by_availability():
    r = _cli("doctor")
    assert r.returncode == (0 if GPU else 2), r.stderr
    for item in ("numpy", "numba-cuda", "CuPy", "--device cuda"):
        assert item in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
