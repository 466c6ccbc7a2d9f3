"""Step through one BLL update by hand: every message, every local gradient, every equation.

What it shows
-------------
A 3-4-3-2 network (block 1 = Dense(3, 4) + sigmoid, block 2 = Dense(4, 3) + sigmoid, block 3 =
the output Dense(3, 2)), 4 samples, 2 classes, float64, trained by ``bll_ref.methods.bll.BLL``
with the paper's Bernoulli estimator (``variational="eq8"``, paper 001 Eq. 8/9), closed-form linear
feedback (paper 003) and plain SGD. For one step it prints, each next to its equation:

    stage 1  the mixing schedule m = 1 / (1 + tau M)              (001 Sec. 3.4, supplement)
    stage 2  block outputs a_k and h_k = S(a_k)                   (Eq. 3: forward messages alpha)
    stage 3  feedback b_k = Y W, W = (Y^T Y + l2 I)^-1 Y^T A_k     (Eq. 4 / 003: beta messages)
    stage 4  alpha = S(a), rho = S(a + m b)                        (Eq. 9)
    stage 5  forward weight rho - alpha, posterior weight rho(1-rho) b, local gradient g_a (Eq. 8)
    stage 6  dL/dW_k = h_{k-1}^T g_a, dL/dc_k = sum_n g_a; the output block's cross-entropy
    stage 7  SGD update p <- p - lr dL/dp, checked against the library's own BLL step
    stage 8  Eq. 8's db term: how a *trained* feedback (the main paper) would be updated
    stage 9  more steps of the literal rule: the KL goes to 0, the output loss does not move
    stage 10 the same with the local predictive head of paper 003: the output loss goes down

Every quantity of the detailed step (stages 2-8) is computed twice: by the library (``LinearFeedback.fit``,
``losses.local.bernoulli_eq8``, ``BLL.train_step``) and by the plain NumPy formula next to its
equation; each stage ends with a line "matches library ...: max |diff| = ..." (differences are
float64 round-off, ~1e-16).

Why closed-form feedback: with one-hot labels Y^T Y is diagonal (the class counts), so the solve
is W_k[c] = (sum of a_k over the samples of class c) / (n_c + l2) — shrunk class means that can be
checked with a pocket calculator, and it is the convex solve of paper 003. The closed-form
feedback is solved, not trained, so Eq. 8's second half (rho(1-rho) b db/dtheta) does not act on
it; stage 8 shows that half on a trained linear feedback (``feedback="trained"``, the main paper's
setting). Why plain SGD: the update is -lr * gradient, checkable by hand (Adam rescales it).
Why sigmoid blocks: then h_k = S(a_k) = alpha_k is the Bernoulli mean, the message itself.
The walk-through starts at epoch M = 1 (one step = one epoch: the batch is the whole data set),
so that m = 2/3 != 1 and you can see where m enters; at M = 0, m = 1 and Eq. 8 is exactly the
gradient of KL(rho || alpha). Initial weights are the library's seeded init rounded to 2 decimals,
so every printed input is exact. This is the paper's literal rule, not the library's default
recipe (Gaussian term on LN(a) + local predictive head); stage 10 adds the predictive head.

How to run
----------
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/step_through.py               # ~1 s
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/step_through.py --interactive # Enter between stages

Options: ``--steps N`` (training steps after the detailed one, default 60, for each of stages 9 and 10),
``--lr`` (default 1.0).
The output is deterministic; tests/golden/step_through.txt holds it (tests/test_step_through.py).

Expected output (excerpt)
-------------------------
    == Stage 4: forward and posterior messages   [Eq. 9: alpha = S(a), rho = S(a + m b)]
    block 1: alpha_1 = S(a_1)    [Eq. 9]
    [[ 0.6737  0.3058  0.4061  0.3740]
    ...
    block 1: g_a1 = dL/da_1 = (-(rho - alpha) + rho(1 - rho) b) / N    [Eq. 8]
    [[ 0.0068 -0.0064 -0.0039 -0.0021]
    ...
    W_1 after = W_1 - lr dL/dW_1
    [[ 0.1546 -0.2619 -0.5147 -0.5649]
    ...
    matches library update (BLL.train_step): max |diff| = 1.1e-16
    ...
    == Stage 10: the same network and rule plus a local predictive head per hidden block (003)
    ...
    output cross-entropy: 0.6953 at step 1 -> 0.4460 after 61 steps

Runs in about a second (plus imports).
"""
from __future__ import annotations

import argparse

import numpy as np

from bll_ref import models
from bll_ref.data import one_hot
from bll_ref.feedback import LinearFeedback, TrainedLinearFeedback
from bll_ref.losses import local
from bll_ref.losses.output import softmax, softmax_cross_entropy
from bll_ref.methods.bll import BLL

SIZES = (3, 4, 3, 2)
TAU = 0.5     # the paper's default mixing schedule m = 1 / (1 + 0.5 M)
L2 = 1.0      # ridge strength of the closed-form feedback
START_EPOCH = 1

# Four samples, two classes, round numbers so that a_1 = X W_1 + c_1 is easy to redo by hand.
X = np.array([[1.0, 0.5, -0.5],
              [-1.0, 0.5, 0.5],
              [0.5, 1.0, -1.0],
              [-0.5, -1.0, 1.0]])
LABELS = np.array([0, 1, 0, 1])


def fmt(a) -> str:
    """Fixed 4-decimal print of a small array (same format for every number in the output)."""
    return np.array2string(np.asarray(a, dtype=np.float64), precision=4, floatmode="fixed",
                           suppress_small=False, sign=" ", max_line_width=100)


def build(lr, head=False):
    """The 3-block network and its BLL method (weights rounded to 2 decimals: exact inputs)."""
    blocks = models.mlp(SIZES, activation_name="sigmoid", rng=0, dtype=np.float64)
    for block in blocks:
        for p in block.params.values():
            p[...] = np.round(p, 2)
    method = BLL(blocks, n_classes=2, variational="eq8", feedback="closed", tau=TAU, l2=L2,
                 head=head, optimizer="sgd", lr=lr, use_kernels=False, sample_input=X)
    return blocks, method


class _Out:
    """Collects the printed text (returned by ``main``) and pauses between stages if asked."""

    def __init__(self, interactive):
        self.lines, self.interactive, self.stages = [], interactive, 0

    def __call__(self, *parts):
        text = " ".join(str(p) for p in parts)
        print(text)
        self.lines.append(text)

    def mat(self, name, a, eq=""):
        self(f"{name}" + (f"    [{eq}]" if eq else ""))
        self(fmt(a))

    def check(self, what, diff):
        self(f"matches library {what}: max |diff| = {diff:.1e}")

    def stage(self, title):
        if self.interactive and self.stages:
            input("-- press Enter for the next stage --")
        self.stages += 1
        self("")
        self(f"== {title}")


def _maxdiff(*pairs):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


def walk_through(out, lr):
    blocks, method = build(lr)
    W = [b.layers[0].params["W"].copy() for b in blocks]
    c = [b.layers[0].params["c"].copy() for b in blocks]
    N = len(X)
    Y = one_hot(LABELS, 2, dtype=np.float64)
    S = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731  the sigmoid, written out

    out("BLL step-through: Bernoulli Eq. 8 with closed-form linear feedback, plain SGD, float64")
    out("network 3-4-3-2: block 1 = Dense(3,4)+sigmoid, block 2 = Dense(4,3)+sigmoid, "
        "block 3 = Dense(3,2) (output)")
    out("convention: L is minimised; gradients are dL/d(.) of the batch mean (hence the 1/N); "
        "the paper prints -dL/dtheta")

    out.stage("Stage 0: data, labels, initial weights (seeded init rounded to 2 decimals)")
    out.mat("X (N = 4 samples x 3 features)", X)
    out(f"y = {LABELS.tolist()}")
    out.mat("Y = one_hot(y)", Y)
    for k in range(3):
        out.mat(f"W_{k + 1} (block {k + 1}, shape {W[k].shape})", W[k])
        out.mat(f"c_{k + 1}", c[k])

    # ---- Stage 1: mixing ----------------------------------------------------------------------
    out.stage(f"Stage 1: mixing schedule m = 1 / (1 + tau M), tau = {TAU}   [Eq. 9, 001 Sec. 3.4]")
    out("M (epoch):  " + "  ".join(f"{M:6d}" for M in range(5)))
    out("m:          " + "  ".join(f"{local.mixing(M, TAU):6.4f}" for M in range(5)))
    method.on_epoch_start(START_EPOCH)
    m = 1.0 / (1.0 + TAU * START_EPOCH)
    out(f"this step: M = {START_EPOCH}, m = 1 / (1 + {TAU} * {START_EPOCH}) = {m:.4f}")
    out.check("mixing (BLL.mixing())", abs(m - method.mixing()))

    # ---- Stage 2: forward ---------------------------------------------------------------------
    out.stage("Stage 2: forward pass, block outputs a_k (natural parameters of alpha_k)   [Eq. 3]")
    a1 = X @ W[0] + c[0]
    h1 = S(a1)
    a2 = h1 @ W[1] + c[1]
    h2 = S(a2)
    z = h2 @ W[2] + c[2]
    out.mat("a_1 = X W_1 + c_1", a1, "Eq. 3")
    out.mat("h_1 = S(a_1)  (= mean of alpha_1; the input of block 2, treated as a constant there)", h1)
    out.mat("a_2 = h_1 W_2 + c_2", a2, "Eq. 3")
    out.mat("h_2 = S(a_2)  (input of the output block)", h2)
    out.mat("logits z = h_2 W_3 + c_3", z)
    lib_a, lib_h, x = [], [], X
    for block in blocks[:2]:  # block = Sequential(Dense, Sigmoid): a_k is the Dense layer's output
        lib_a.append(block.layers[0].forward(x, train=False))
        x = block.forward(x, train=False)
        lib_h.append(x)
    out.check("forward (block.layers[0].forward, block.forward)", _maxdiff((a1, lib_a[0]), (h1, lib_h[0]), (a2, lib_a[1]),
                                                       (h2, lib_h[1]), (z, blocks[2].forward(h2, train=False))))

    # ---- Stage 3: closed-form feedback --------------------------------------------------------
    out.stage(f"Stage 3: feedback b_k = Y W^fb_k, ridge solve per batch (l2 = {L2})   [Eq. 4, 003 Sec. 2.1]")
    out("W^fb_k = argmin ||Y W - A_k||^2 + l2 ||W||^2 = (Y^T Y + l2 I)^-1 Y^T A_k  (A_k = a_k);")
    out("with one-hot Y, Y^T Y = diag(class counts): row c of W^fb is sum_{n in c} a_n / (n_c + l2)")
    YtY = Y.T @ Y + L2 * np.eye(2)
    out.mat("Y^T Y + l2 I", YtY)
    b, Wfb = [], []
    for k, a in enumerate((a1, a2), 1):
        YtA = Y.T @ a
        Wk = np.linalg.solve(YtY, YtA)
        out.mat(f"Y^T A_{k}", YtA)
        out.mat(f"W^fb_{k} = (Y^T Y + l2 I)^-1 Y^T A_{k}", Wk)
        out.mat(f"b_{k} = Y W^fb_{k}", Y @ Wk, "Eq. 4")
        Wfb.append(Wk)
        b.append(Y @ Wk)
    lib_fb = [LinearFeedback(2, a.shape[1], l2=L2, dtype=np.float64).fit(Y, a) for a in (a1, a2)]
    out.check("feedback (LinearFeedback.fit / predict)",
              _maxdiff(*[(Wfb[k], f.W) for k, f in enumerate(lib_fb)],
                       *[(b[k], f.predict(Y)) for k, f in enumerate(lib_fb)]))

    # ---- Stage 4: Eq. 9 -----------------------------------------------------------------------
    out.stage("Stage 4: forward and posterior messages   [Eq. 9: alpha = S(a), rho = S(a + m b)]")
    alpha = [S(a1), S(a2)]
    rho = [S(a1 + m * b[0]), S(a2 + m * b[1])]
    for k in range(2):
        out.mat(f"block {k + 1}: alpha_{k + 1} = S(a_{k + 1})", alpha[k], "Eq. 9")
        out.mat(f"block {k + 1}: rho_{k + 1} = S(a_{k + 1} + m b_{k + 1}),  m = {m:.4f}", rho[k], "Eq. 9")

    # ---- Stage 5: Eq. 8 -----------------------------------------------------------------------
    out.stage("Stage 5: Eq. 8 local gradient at a:  dL/da = ( -(rho - alpha) + rho(1 - rho) b ) / N")
    out("the paper prints -dL/dtheta = (rho - alpha) da/dtheta - rho(1-rho) b (da/dtheta + db/dtheta)")
    g_a, g_b, kl, lib = [], [], [], []
    for k in range(2):
        fwd = rho[k] - alpha[k]
        post = rho[k] * (1 - rho[k]) * b[k]
        ga = (-fwd + post) / N
        out.mat(f"block {k + 1}: forward weight rho - alpha", fwd, "Eq. 8, 1st term")
        out.mat(f"block {k + 1}: posterior weight rho(1 - rho) b", post, "Eq. 8, 2nd term")
        out.mat(f"block {k + 1}: g_a{k + 1} = dL/da_{k + 1} = (-(rho - alpha) + rho(1 - rho) b) / N", ga, "Eq. 8")
        g_a.append(ga)
        g_b.append(post / N)
        # the loss whose estimator this is: KL(rho || alpha) (Eq. S7, sign-corrected), summed over units
        a = (a1, a2)[k]
        gamma = a + m * b[k]
        kl.append(float(np.sum(np.log1p(np.exp(a)) - np.log1p(np.exp(gamma)) - rho[k] * (a - gamma)) / N))
        out(f"block {k + 1}: KL(rho || alpha) = mean_n sum_j [A(a) - A(a + m b) - rho (a - (a + m b))] "
            f"= {kl[k]:.6f}   (A(x) = log(1 + e^x))")
        lib.append(local.bernoulli_eq8((a1, a2)[k], b[k], m))
    out.check("Eq. 8 (losses.local.bernoulli_eq8: loss, g_a, g_b)",
              _maxdiff(*[(np.array(kl[k]), np.array(lib[k][0])) for k in range(2)],
                       *[(g_a[k], lib[k][1]) for k in range(2)], *[(g_b[k], lib[k][2]) for k in range(2)]))
    gap = local.eq8_chain_rule_gap("bernoulli", a1, b[0], m)[0]
    out(f"note: at m = {m:.4f} != 1 Eq. 8 is not the exact KL gradient; block 1's gap (1 - m) rho(1-rho) b / N "
        f"has max {np.max(np.abs(gap)):.4f}")

    # ---- Stage 6: local gradients ------------------------------------------------------------
    out.stage("Stage 6: local weight gradients (chain rule inside the block only)")
    out("hidden block k: a_k = h_{k-1} W_k + c_k, so dL/dW_k = h_{k-1}^T g_ak, dL/dc_k = sum_n g_ak;")
    out("h_{k-1} is the *detached* output of the block below: no gradient crosses a block boundary")
    grads = []
    for k, inp in enumerate((X, h1)):
        gW, gc = inp.T @ g_a[k], g_a[k].sum(axis=0)
        out.mat(f"dL/dW_{k + 1} = {'X' if k == 0 else 'h_1'}^T g_a{k + 1}", gW)
        out.mat(f"dL/dc_{k + 1}", gc)
        grads.append((gW, gc))
    p = softmax(z)
    g_z = (p - Y) / N
    ce = float(-np.mean(np.log(p[np.arange(N), LABELS])))
    out(f"output block 3: cross-entropy on its detached input h_2; CE = {ce:.6f}")
    out.mat("softmax(z)", p)
    out.mat("g_z = dCE/dz = (softmax(z) - Y) / N", g_z)
    out.mat("dL/dW_3 = h_2^T g_z", h2.T @ g_z)
    out.mat("dL/dc_3 = sum_n g_z", g_z.sum(axis=0))
    grads.append((h2.T @ g_z, g_z.sum(axis=0)))
    lib_ce, lib_gz = softmax_cross_entropy(z, LABELS)
    out.check("output loss (softmax_cross_entropy)", _maxdiff((ce, lib_ce), (g_z, lib_gz)))

    # ---- Stage 7: the update, and the library's own step ---------------------------------------
    out.stage(f"Stage 7: SGD update p <- p - lr * dL/dp  (lr = {lr})")
    new = []
    for k in range(3):
        W_new, c_new = W[k] - lr * grads[k][0], c[k] - lr * grads[k][1]
        out.mat(f"W_{k + 1} before", W[k])
        out.mat(f"W_{k + 1} after = W_{k + 1} - lr dL/dW_{k + 1}", W_new)
        out.mat(f"c_{k + 1} after = c_{k + 1} - lr dL/dc_{k + 1}", c_new)
        new.append((W_new, c_new))
    loss = method.train_step(X, LABELS)  # the library's BLL step: forward, local losses, SGD per block
    out(f"library BLL.train_step returned output CE = {loss:.6f}")
    out.check("update (BLL.train_step)",
              _maxdiff(*[(new[k][0], blocks[k].layers[0].params["W"]) for k in range(3)],
                       *[(new[k][1], blocks[k].layers[0].params["c"]) for k in range(3)]))
    out.check("feedback inside the step (BLL.learners[k].feedback.W)",
              _maxdiff(*[(Wfb[k], method.learners[k].feedback.W) for k in range(2)]))

    # ---- Stage 8: trained feedback -----------------------------------------------------------
    out.stage("Stage 8: Eq. 8's db term, for a *trained* linear feedback b = Y V + e (the main paper)")
    out("the posterior term rho(1-rho) b also multiplies db/dtheta: dL/dV = Y^T g_b, dL/de = sum_n g_b,")
    out("g_b = rho(1-rho) b / N (stage 5). Starting from V = W^fb_1, e = 0 (so b is the same as above):")
    gV, ge = Y.T @ g_b[0], g_b[0].sum(axis=0)
    out.mat("g_b1 = rho_1 (1 - rho_1) b_1 / N", g_b[0], "Eq. 8, 2nd term")
    out.mat("dL/dV_1 = Y^T g_b1", gV)
    out.mat("V_1 after = V_1 - lr dL/dV_1", Wfb[0] - lr * gV)
    tfb = TrainedLinearFeedback(2, 4, optimizer="sgd", lr=lr, rng=0, dtype=np.float64)
    tfb.W[...] = Wfb[0]
    tfb.net[0].params["c"][...] = 0.0
    b_lib = tfb.predict(Y)
    tfb.update(lib[0][2])
    out.check("trained feedback (TrainedLinearFeedback.update)",
              _maxdiff((b_lib, b[0]), (tfb.W, Wfb[0] - lr * gV), (tfb.net[0].params["c"], -lr * ge)))
    out("the closed-form feedback of this walk-through is re-solved every step instead (003: convex in W^fb).")
    return blocks, method, ce


def _train(out, method, steps, first_ce, columns, row):
    """Steps M = START_EPOCH + 1, ... (one full-batch step per epoch); prints every 5th step."""
    out(columns)
    out(row(1, START_EPOCH, first_ce, method.epoch_diagnostics(X, LABELS)))
    ce = first_ce
    for s in range(2, steps + 2):
        M = START_EPOCH + s - 1
        method.on_epoch_start(M)  # sets m and resets the per-epoch statistics
        ce = method.train_step(X, LABELS)
        if s % 5 == 0 or s == steps + 1:
            out(row(s, M, ce, method.epoch_diagnostics(X, LABELS)))
    final = float(softmax_cross_entropy(method.predict(X), LABELS)[0])
    out(f"output cross-entropy: {first_ce:.4f} at step 1 -> {final:.4f} after {steps + 1} steps")
    return final


def train_more(out, method, steps, first_ce, lr):
    out.stage(f"Stage 9: {steps} more steps of the literal rule (one step = one epoch M; m follows the schedule)")
    out("KL_k = the Eq. 8 loss of block k, |a_1|, |b_1| = mean |a|, |b| of block 1, acc = accuracy on the 4 samples")

    def literal(s, M, ce, d):
        acc = float(np.mean(np.argmax(method.predict(X), axis=1) == LABELS))
        bl = d["blocks"]
        return (f"{s:4d} {M:4d}  {local.mixing(M, TAU):6.4f}  {ce:7.4f}  {bl[0]['var_loss']:7.4f}  "
                f"{bl[1]['var_loss']:7.4f}  {bl[0]['mean_abs_a']:7.4f}  {bl[0]['mean_abs_b']:7.4f}  {acc:4.2f}")

    _train(out, method, steps, first_ce, "step    M       m   out CE     KL_1     KL_2    |a_1|    |b_1|   acc", literal)
    out("Eq. 8 does what it promises, it drives KL(rho || alpha) to 0, but the output loss does not move:")
    out("the KL is smallest when b carries nothing. b_1 is the shrunk class mean of a_1 (stage 3); it goes")
    out("to 0 while |a_1| stays ~0.23, i.e. the class means of a_1 are driven to 0 and the label information")
    out("goes with them. The literal rule alone does not train (docs/architecture.md).")
    out("Paper 003 adds a local predictive term:")

    out.stage("Stage 10: the same network and rule plus a local predictive head per hidden block (003)")
    out("hidden block k: loss = Eq. 8 term + CE(head_k(h_k), y), the head's gradient stays in block k")
    _, method2 = build(lr, head=True)
    method2.on_epoch_start(START_EPOCH)
    ce1 = method2.train_step(X, LABELS)

    def with_head(s, M, ce, d):
        acc = float(np.mean(np.argmax(method2.predict(X), axis=1) == LABELS))
        bl = d["blocks"]
        return (f"{s:4d} {M:4d}  {local.mixing(M, TAU):6.4f}  {ce:7.4f}  {bl[0]['head_loss']:7.4f}  "
                f"{bl[0]['var_loss']:7.4f}  {acc:4.2f}")

    return _train(out, method2, steps, ce1, "step    M       m   out CE  head1 CE     KL_1   acc", with_head)


def main(argv=None) -> str:
    """Run the walk-through; returns everything printed (for tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactive", action="store_true", help="pause (press Enter) between stages")
    ap.add_argument("--steps", type=int, default=60, help="training steps after the detailed one")
    ap.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    args = ap.parse_args(argv)
    if args.steps < 0 or not args.lr > 0:
        ap.error(f"need --steps >= 0 and --lr > 0, got {args.steps}, {args.lr}")
    out = _Out(args.interactive)
    _, method, ce = walk_through(out, args.lr)
    train_more(out, method, args.steps, ce, args.lr)
    return "\n".join(out.lines) + "\n"


if __name__ == "__main__":
    main()
