"""Containers: Sequential (a block, or a model of blocks) and Residual."""
from __future__ import annotations

from .base import Layer, layer_from_config, register

__all__ = ["Sequential", "backward_through", "Residual", "as_sequential"]


def _flatten(children, attr):
    out = {}
    for i, child in enumerate(children):
        for k, v in getattr(child, attr).items():
            out[f"{i}.{k}"] = v
    return out


@register
class Sequential(Layer):
    """Layers applied in order; itself a layer. A model is a Sequential of blocks (Sequentials).

    ``params``/``grads``/``buffers`` are flat dicts keyed ``"<index>.<child key>"`` whose values are
    the children's own arrays, so in-place optimiser updates reach the children.
    """

    def __init__(self, *layers):
        self._cache = None  # params/grads/buffers are derived from the children (properties)
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, l in enumerate(layers):
            if not isinstance(l, Layer):
                raise ValueError(f"Sequential item {i} is not a Layer: {type(l).__name__}")
        self.layers = list(layers)

    params = property(lambda self: _flatten(self.layers, "params"))
    grads = property(lambda self: _flatten(self.layers, "grads"))
    buffers = property(lambda self: _flatten(self.layers, "buffers"))

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def forward(self, x, train=True):
        for layer in self.layers:
            x = layer.forward(x, train=train)
        return x

    takes_need_dx = True

    def backward(self, dy, need_dx=True):
        """Backpropagate through the children; ``need_dx=False`` lets the first layer skip dx."""
        return backward_through(self.layers, dy, need_dx)

    def zero_grads(self):
        for l in self.layers:
            l.zero_grads()

    def children(self):
        return tuple(self.layers)

    def to(self, device):
        """Move every child to ``device`` ('cpu' or 'cuda'); returns self."""
        if device == "cuda":
            self.refuse_host_only()
        for l in self.layers:
            l.to(device)
        return self

    def config(self):
        return {"type": "Sequential", "layers": [l.config() for l in self.layers]}

    @classmethod
    def from_config(cls, cfg):
        return cls(*[layer_from_config(c) for c in cfg["layers"]])

    def __repr__(self):
        inner = "\n".join("  " + repr(l).replace("\n", "\n  ") for l in self.layers)
        return f"Sequential(\n{inner}\n)"


def as_sequential(model, who="a model", wrap=True):
    """The one conversion to a model: a list or tuple of layers (blocks) -> a Sequential of them; a
    Sequential -> itself; any other Layer -> Sequential(layer) (``wrap``) or itself. ValueError,
    naming ``who``, for anything else."""
    if isinstance(model, (list, tuple)):
        if not all(isinstance(b, Layer) for b in model):
            raise ValueError(f"{who} expects a Layer or a list of blocks (Layers)")
        return Sequential(*model)
    if isinstance(model, Sequential):
        return model
    if isinstance(model, Layer):
        return Sequential(model) if wrap else model
    raise ValueError(f"{who} expects a bll_ref Layer (e.g. a Sequential of blocks) or a list of blocks, "
                     f"got {type(model).__name__}")


def backward_through(layers, dy, need_dx=True):
    """Backward through ``layers`` (last to first); with ``need_dx=False`` the first layer skips
    its input gradient when it can (Dense, Conv2d), and None is returned."""
    for layer in layers[:0:-1]:
        dy = layer.backward(dy)
    if not need_dx and layers[0].takes_need_dx:
        return layers[0].backward(dy, need_dx=False)
    return layers[0].backward(dy)


@register
class Residual(Layer):
    """y = body(x) + shortcut(x) (identity when shortcut is None); the ResNet basic block's sum.

    dL/dx = body.backward(dy) + shortcut.backward(dy).
    """

    def __init__(self, body, shortcut=None):
        self._cache = None
        if not isinstance(body, Layer) or (shortcut is not None and not isinstance(shortcut, Layer)):
            raise ValueError("Residual expects Layer instances for body and shortcut")
        self.body, self.shortcut = body, shortcut

    def _children(self):
        return {"body": self.body, **({"shortcut": self.shortcut} if self.shortcut is not None else {})}

    def _flat(self, attr):
        return {f"{n}.{k}": v for n, c in self._children().items() for k, v in getattr(c, attr).items()}

    params = property(lambda self: self._flat("params"))
    grads = property(lambda self: self._flat("grads"))
    buffers = property(lambda self: self._flat("buffers"))

    def forward(self, x, train=True):
        y = self.body.forward(x, train=train)
        s = x if self.shortcut is None else self.shortcut.forward(x, train=train)
        if y.shape != s.shape:
            raise ValueError(f"Residual: body output {y.shape} and shortcut output {s.shape} differ; "
                             "give a projection shortcut")
        if train:
            self._cache = y.shape
        return y + s

    def backward(self, dy):
        self._check_dy(dy, self._cached())
        dx = self.body.backward(dy)
        return dx + (dy if self.shortcut is None else self.shortcut.backward(dy))

    def zero_grads(self):
        for c in self._children().values():
            c.zero_grads()

    def children(self):
        return tuple(self._children().values())

    def to(self, device):
        if device == "cuda":
            self.refuse_host_only()
        for c in self._children().values():
            c.to(device)
        self._cache = None
        return self

    def config(self):
        return {"type": "Residual", "body": self.body.config(),
                "shortcut": None if self.shortcut is None else self.shortcut.config()}

    @classmethod
    def from_config(cls, cfg):
        sc = cfg.get("shortcut")
        return cls(layer_from_config(cfg["body"]), None if sc is None else layer_from_config(sc))
