"""examples/step_through.py: the printed walk-through is pinned twice.

1. Against tests/golden/step_through.txt (the whole text, with the float64 round-off in the
   "max |diff| = ..." check lines masked; those are asserted <= 1e-12 instead).
2. Independently: the key numbers are re-derived here with plain NumPy from the *printed* inputs
   (X, Y, the 2-decimal initial weights, m) — forward pass (Eq. 3), ridge feedback (003), alpha
   and rho (Eq. 9), the Eq. 8 gradient, the weight gradients and the SGD update — and compared
   with the printed 4-decimal values. So a change in the math fails even if someone regenerates
   the golden file without looking.

After a deliberate change to the example, regenerate the golden file with
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/step_through.py > tests/golden/step_through.txt
"""
import importlib.util
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "step_through.txt")
DIFF = re.compile(r"max \|diff\| = (\S+)")
TOL = 5e-5 + 1e-9   # printed values carry 4 decimals (rounding error <= 5e-5)


def _load_example():
    spec = importlib.util.spec_from_file_location("step_through", os.path.join(ROOT, "examples", "step_through.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def text():
    return _load_example().main([])


def _matrix(text, label):
    """The array printed on the lines after the line starting with ``label``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(label):
            body, depth = [], 0
            for row in lines[i + 1:]:
                body.append(row)
                depth += row.count("[") - row.count("]")
                if depth == 0:
                    break
            rows = [r for r in " ".join(body).replace("]", "]\n").splitlines() if r.strip(" []")]
            return np.array([[float(v) for v in r.replace("[", " ").replace("]", " ").split()] for r in rows]).squeeze()
    raise AssertionError(f"label {label!r} not found in the output")


def _close(printed, exact, tol=TOL):
    assert printed.shape == np.shape(exact)
    assert np.max(np.abs(printed - exact)) <= tol, (printed, exact)


def test_output_matches_golden_file(text):
    with open(GOLDEN) as f:
        golden = f.read()
    mask = lambda s: DIFF.sub("max |diff| = <round-off>", s)  # noqa: E731
    assert mask(text) == mask(golden)


def test_every_library_check_agrees_to_round_off(text):
    diffs = [float(d) for d in DIFF.findall(text)]
    assert len(diffs) == 8
    assert max(diffs) <= 1e-12


def test_key_numbers_rederived_from_printed_inputs(text):
    S = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    X = _matrix(text, "X (N = 4 samples")
    Y = _matrix(text, "Y = one_hot(y)")
    W = [_matrix(text, f"W_{k} (block {k},") for k in (1, 2, 3)]
    c = [_matrix(text, f"c_{k}") for k in (1, 2, 3)]
    N, lr = len(X), 1.0
    m = float(re.search(r"this step: M = 1, m = .* = (\S+)", text).group(1))
    assert abs(m - 1 / (1 + 0.5 * 1)) < 1e-4                       # m = 1 / (1 + tau M)
    m = 2 / 3
    # Eq. 3: forward pass
    a1 = X @ W[0] + c[0]
    h1 = S(a1)
    a2 = h1 @ W[1] + c[1]
    h2 = S(a2)
    z = h2 @ W[2] + c[2]
    _close(_matrix(text, "a_1 = X W_1 + c_1"), a1)
    _close(_matrix(text, "a_2 = h_1 W_2 + c_2"), a2)
    _close(_matrix(text, "logits z"), z)
    # 003: closed-form ridge feedback, l2 = 1; with one-hot Y rows are class sums / (n_c + 1)
    new = []
    for k, (a, inp) in enumerate(((a1, X), (a2, h1)), 1):
        Wfb = np.array([a[Y[:, j] == 1].sum(axis=0) / (Y[:, j].sum() + 1) for j in range(2)])
        _close(_matrix(text, f"W^fb_{k} = "), Wfb)
        b = Y @ Wfb
        alpha, rho = S(a), S(a + m * b)                              # Eq. 9
        _close(_matrix(text, f"block {k}: alpha_{k}"), alpha)
        _close(_matrix(text, f"block {k}: rho_{k}"), rho)
        g_a = (-(rho - alpha) + rho * (1 - rho) * b) / N            # Eq. 8
        _close(_matrix(text, f"block {k}: g_a{k} = "), g_a)
        gW, gc = inp.T @ g_a, g_a.sum(axis=0)
        _close(_matrix(text, f"dL/dW_{k} = "), gW)
        new.append((W[k - 1] - lr * gW, c[k - 1] - lr * gc))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    g_z = (p - Y) / N
    new.append((W[2] - lr * h2.T @ g_z, c[2] - lr * g_z.sum(axis=0)))
    for k in (1, 2, 3):                                              # SGD: p <- p - lr dL/dp
        _close(_matrix(text, f"W_{k} after = "), new[k - 1][0])
        _close(_matrix(text, f"c_{k} after = "), new[k - 1][1])
    ce = float(re.search(r"CE = (\S+)", text).group(1))
    assert abs(ce - np.mean(-np.log(p[[0, 1, 2, 3], Y.argmax(axis=1)]))) < 1e-6


def test_literal_rule_minimises_kl_and_predictive_head_lowers_output_loss(text):
    finals = [(float(a), float(b)) for a, b in re.findall(r"output cross-entropy: (\S+) at step 1 -> (\S+) after", text)]
    assert len(finals) == 2
    (lit0, lit1), (head0, head1) = finals
    assert abs(lit1 - lit0) < 0.01            # Stage 9: the literal rule does not move the output loss
    assert head1 < head0 - 0.2                # Stage 10: with the predictive head it goes down
    stage9 = text.split("Stage 9")[1].split("Stage 10")[0]
    rows = [r.split() for r in stage9.splitlines() if re.match(r"\s+\d+\s+\d+\s", r)]
    kl1 = [float(r[4]) for r in rows]
    assert kl1[0] > 0.02 and kl1[-1] < 1e-3   # ... while it drives KL(rho || alpha) to ~0


def test_interactive_pauses_between_stages(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("builtins.input", lambda prompt="": calls.append(prompt) or "")
    _load_example().main(["--interactive", "--steps", "2"])
    assert len(calls) == 10                   # 11 stages (0..10), a pause before each but the first
