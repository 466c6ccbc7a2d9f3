"""The GPU code path end to end, on a machine without a GPU.

``tests/fakecupy.py`` answers for CuPy with host memory under CuPy's rules (no implicit host <->
device conversion, no host array mixed into device work, 0-d device arrays from reductions), and
numba's CUDA simulator runs the numba.cuda kernels. Under them, in a fresh process each:

* ``benchmarks/gpu_check.py --smoke``: every GPU layer, loss and optimiser against the CPU,
  determinism, streams against one stream, 2-step BLL / BP / FA runs of the MLP, BLL variants,
  Pred-Sim, a transformer, the CNN and ResNet-18 against the CPU (losses and trained weights), and
  a short ``fit`` on both devices; the same script the GPU run executes, at tiny sizes;
* ``benchmarks/gpu_step.py --smoke``: every contender of the GPU timing script runs (its times
  mean nothing here);
* ``bll-ref train --device cuda`` (sequential and ``--parallel streams``), ``eval``, ``report`` and
  ``--resume`` onto the CPU.

What this cannot check (a GPU run does: ``bash benchmarks/gpu_all.sh``): the real launch path,
cuBLAS / cuSOLVER rounding, stream ordering, speed. The PTX tests (tests/test_cuda_kernels.py)
check that NVVM compiles every kernel.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fakecupy
from bll_ref import backend
from bll_ref.layers import Dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")])

PRELUDE = """
import json, sys
import fakecupy
cp = fakecupy.install()
"""


def run_on_stand_in(code, timeout=600):
    """Run ``code`` (after installing the stand-in) in a fresh simulator process -> (rc, stdout, the
    JSON object its last line prints)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=PATHS, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


# ------------------------------------------------------------------------- the stand-in's own rules
@pytest.fixture
def stand_in(monkeypatch):
    """backend answers with the stand-in module in this process (no simulator: no kernels run)."""
    m = fakecupy.module()
    monkeypatch.setattr(backend, "_cupy", m)
    return m


def test_the_stand_in_refuses_what_cupy_refuses(stand_in):
    cp = stand_in
    d, h = cp.asarray(np.arange(6.0).reshape(2, 3)), np.ones((2, 3))
    assert not isinstance(d, np.ndarray) and backend.is_device_array(d) and backend.array_module(d) is cp
    for bad in (lambda: np.asarray(d), lambda: d + h, lambda: h * d, lambda: np.add(d, h), lambda: d @ h.T,
                lambda: np.concatenate([d, h]), lambda: cp.exp(h), lambda: d[np.array([0])],
                lambda: d.__setitem__(0, h[0]), lambda: cp.stack([d, h])):
        with pytest.raises(TypeError):
            bad()
    s = d.sum()
    assert isinstance(s, fakecupy.FakeArray) and s.shape == () and float(s) == 15.0
    assert isinstance(d[0, 1], fakecupy.FakeArray)
    h2 = d.get()
    assert type(h2) is np.ndarray and np.array_equal(h2, np.arange(6.0).reshape(2, 3))
    h2[0, 0] = 99.0                          # a copy, as a device-to-host transfer is
    assert float(d[0, 0]) == 0.0
    v = d.reshape(-1)
    v[0] = 7.0                               # views share memory, as CuPy's do
    assert float(d[0, 0]) == 7.0
    assert np.array_equal(backend.asnumpy(cp.maximum(d, 1.0)), np.maximum(h2 * 0 + d.get(), 1.0))


def test_a_layer_left_on_the_host_is_caught(stand_in):
    """The class of bug the stand-in is for: host weights meeting a device input."""
    layer = Dense(3, 2, rng=0)
    with pytest.raises(TypeError, match="Unsupported type"):
        layer.forward(stand_in.asarray(np.ones((4, 3), np.float32)))


def test_embedding_gradient_on_the_device_adds_every_chunk_of_its_one_hot_product(stand_in, monkeypatch):
    """Embedding's device gradient (onehot^T dy, in chunks of rows) against NumPy's scatter-add,
    with chunks of 2 rows, so ids repeat across chunks; two runs give the same bits."""
    from bll_ref.layers import Embedding
    from bll_ref.layers import sequence
    monkeypatch.setattr(backend, "_gpu_ok", (True, ""))
    monkeypatch.setattr(sequence, "ONE_HOT_ELEMENTS", 2 * 5)
    rng = np.random.default_rng(3)
    ids, dy = rng.integers(0, 5, (3, 7)), rng.standard_normal((3, 7, 4))
    cpu = Embedding(5, 4, rng=0, dtype=np.float64)
    cpu.forward(ids)
    cpu.backward(dy)
    grads = []
    for _ in range(2):
        gpu = Embedding(5, 4, rng=0, dtype=np.float64).to("cuda")
        y = gpu.forward(stand_in.asarray(ids))
        assert backend.is_device_array(y)
        gpu.backward(stand_in.asarray(dy))
        grads.append(gpu.grads["E"].get())
    np.testing.assert_allclose(grads[0], cpu.grads["E"], rtol=1e-13, atol=1e-13)
    assert np.array_equal(grads[0], grads[1])


# ------------------------------------------------------------------------------- the GPU scripts
def smoke(script, tmp_path):
    """``benchmarks/<script>.py --smoke`` on the stand-in -> the results of the JSON it wrote; it
    must exit 0."""
    res, out = run_on_stand_in(f"""
        import {script}
        print(json.dumps({{"rc": {script}.main(["--smoke", "--out", {str(tmp_path)!r}])}}))
    """)
    assert res["rc"] == 0, out[-3000:]
    return json.loads((tmp_path / f"{script}.json").read_text())["results"]


def test_gpu_check_passes_on_the_stand_in(tmp_path):
    results = smoke("gpu_check", tmp_path)
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    checks = {r["check"] for r in results}
    for must in ("layer vs CPU", "Eq. 8 kernel vs NumPy", "gaussian KL kernel vs NumPy", "softmax CE vs NumPy",
                 "optimiser kernel vs NumPy", "GPU run-to-run bit-identical", "GPU streams vs sequential",
                 "GPU vs CPU losses", "GPU vs CPU trained state", "random synthetic data 1 epochs GPU vs CPU"):
        assert must in checks, must
    details = " ".join(r["detail"] for r in results)
    for must in ("Conv2d", "BatchNorm NCHW", "LayerNorm", "MaxPool2d", "Residual", "Upsample2d", "Embedding",
                 "PositionalEncoding learned", "SelfAttention causal", "bll float32", "bp float32", "fa float64",
                 "'eq8'", "'bernoulli_kl'", "'span': 2", "bll Pred-Sim CNN", "bll transformer", "bp transformer",
                 "bll CNN", "bll ResNet-18"):
        assert must in details, must
    assert len(results) >= 70


def test_gpu_step_runs_every_contender_on_the_stand_in(tmp_path):
    rows = smoke("gpu_step", tmp_path)
    seen = {(r["model"].split()[0], r["contender"]) for r in rows}
    for model in ("MLP", "CNN", "ResNet-18"):
        for contender in ("BP (ours)", "BLL (ours), sequential", "BLL (ours), stream per block"):
            assert (model, contender) in seen, (model, contender)
    assert all(r["ms_per_step"] > 0 and np.isfinite(r["ms_per_step"]) for r in rows)
    assert any("epoch_s" in r for r in rows)


# ------------------------------------------------------------------------------------ the command line
def test_train_on_cuda_eval_report_and_resume_on_the_cpu(tmp_path):
    d = str(tmp_path)
    res, out = run_on_stand_in(f"""
        from bll_ref.cli import main
        d = {d!r}
        tiny = ["--data", "synthetic", "--sizes", "784,16,16,10", "--limit-train", "64", "--limit-test", "32",
                "--batch-size", "16"]
        rcs = {{
            "cuda": main(["train", *tiny, "--epochs", "2", "--device", "cuda", "--out", d + "/cuda"]),
            "cpu": main(["train", *tiny, "--epochs", "2", "--device", "cpu", "--out", d + "/cpu"]),
            "streams": main(["train", *tiny, "--epochs", "2", "--device", "cuda", "--parallel", "streams",
                             "--out", d + "/streams"]),
            "half": main(["train", *tiny, "--epochs", "1", "--device", "cuda", "--out", d + "/half"]),
        }}
        rcs["resume"] = main(["train", "--resume", d + "/half", "--epochs", "2", "--device", "cpu"])
        rcs["eval"] = main(["eval", d + "/cuda/checkpoint.npz"])
        rcs["report"] = main(["report", d + "/cuda", "--out", d + "/report"])
        print(json.dumps(rcs))
    """)
    assert set(res.values()) == {0}, (res, out[-3000:])
    hist = {r: json.loads((tmp_path / r / "history.json").read_text()) for r in ("cuda", "cpu", "streams", "half")}
    steps = {r: np.concatenate(h["step_losses"]) for r, h in hist.items()}
    assert len(steps["cuda"]) == 8
    # float32 on two devices: the last bits differ (float64 sums on the GPU side), nothing more
    np.testing.assert_allclose(steps["cuda"], steps["cpu"], rtol=1e-5)
    assert np.array_equal(steps["streams"], steps["cuda"])          # one stream per block: the same bits
    np.testing.assert_allclose(steps["half"], steps["cuda"], rtol=1e-5)  # epoch 1 on the GPU, 2 on the CPU
    assert hist["half"]["test_acc"][0] == hist["cuda"]["test_acc"][0]
    ck = np.load(tmp_path / "cuda" / "checkpoint.npz")
    assert all(ck[k].dtype != object for k in ck.files)             # host arrays in today's format
    assert (tmp_path / "report" / "report.md").is_file()
    assert "test accuracy" in out
