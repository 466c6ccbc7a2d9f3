"""Where a hidden block's feedback message b_k (beta, Eq. 4) comes from: one small class per kind.

Every source has the same interface, so the learner never asks which kind it holds:

    source.begin(Y, b_fb)                # at the start of an update (trained: predict b now)
    b = source.message(Y, target, b_fb)  # this step's message; target = what b is fitted to
    source.learn(g_b)                    # dL/db trains the feedback (closed form: nothing to do)
    source.trains                        # False: g_b is never needed (not even computed)
    source.state_dict() / load_state_dict(s) / aux(k) / to(device)

``OPTIONS`` names the BLL options each kind accepts (``BLL`` refuses the others).
"""
from __future__ import annotations

from .. import backend
from ..layers.base import load_state_dict as load_layer_state
from ..layers.base import state_dict as layer_state

__all__ = ["ClosedForm", "Trained", "TwinStage", "SOURCES"]


class ClosedForm:
    """Linear feedback solved per batch (ridge least squares, paper 003: the local loss is convex
    in W): b = Y W with W fitted to the target the variational term matches (a_k, or LN(a_k))."""

    name, trains = "closed", False
    OPTIONS = frozenset({"l2", "feedback_decay"})

    def __init__(self, net):
        self.net = net  # a feedback.LinearFeedback

    def begin(self, Y, b_fb=None):
        pass

    def message(self, Y, target, b_fb=None):
        return self.net.fit(Y, target).predict(Y)

    def learn(self, g_b):
        pass

    def state_dict(self):
        return _prefixed("feedback", self.net.state_dict())

    def load_state_dict(self, state):
        self.net.load_state_dict(_sub(state, "feedback"))

    def aux(self, k):
        return {f"feedback{k}/{n}": v for n, v in self.net.state_dict().items()}

    def to(self, device):
        self.net.to(device)


class Trained(ClosedForm):
    """Linear feedback b = Y V + e trained by gradient descent on g_b (Eq. 8's second term)."""

    name, trains = "trained", True
    OPTIONS = frozenset({"feedback_lr"})

    def begin(self, Y, b_fb=None):
        if b_fb is None:  # a message handed in (a test, a study) replaces the network's
            self._b = self.net.predict(Y, train=True)  # caches Y for the update below

    def message(self, Y, target, b_fb=None):
        return self._b if b_fb is None else b_fb

    def learn(self, g_b):
        self.net.update(g_b)

    def state_dict(self):
        return {**super().state_dict(), **_prefixed("feedback_opt", self.net.opt.state_dict())}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.net.opt.load_state_dict(_sub(state, "feedback_opt"))


class TwinStage:
    """Stage k of the paper's deep backward network (``feedback.TwinFeedback``): the method runs
    the whole network top-down once per step and hands each learner its message as ``b_fb``;
    stage k is trained by block k's g_b only."""

    name, trains = "twin", True
    OPTIONS = frozenset({"feedback_lr"})

    def __init__(self, twin, k):
        self.twin, self.k = twin, k

    def begin(self, Y, b_fb=None):
        pass

    def message(self, Y, target, b_fb=None):
        return b_fb

    def learn(self, g_b):
        self.twin.update(self.k, g_b)

    def state_dict(self):
        s = _prefixed("feedback", layer_state(self.twin.stages[self.k]))
        s.update(_prefixed("feedback_opt", self.twin.opts[self.k].state_dict()))
        return s

    def load_state_dict(self, state):
        load_layer_state(self.twin.stages[self.k], _sub(state, "feedback"))
        self.twin.opts[self.k].load_state_dict(_sub(state, "feedback_opt"))

    def aux(self, k):
        return {f"feedback/{k}/{n}": backend.asnumpy(v) for n, v in self.twin.stages[k].params.items()}

    def to(self, device):
        pass  # the whole twin network is moved once, by the method


SOURCES = {cls.name: cls for cls in (ClosedForm, Trained, TwinStage)}


def _prefixed(prefix, d):
    return {f"{prefix}/{k}": v for k, v in d.items()}


def _sub(state, prefix):
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + "/")}
