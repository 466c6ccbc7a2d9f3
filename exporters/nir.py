"""NIR export: the float network as a Neuromorphic Intermediate Representation graph (``.nir``).

The file is the HDF5 layout that ``nir.write`` (nir 1.0.x) produces and ``nir.read`` reads, written
here with h5py directly (one write path, no runtime dependency on the ``nir`` package)::

    /version                 string, the NIR layout followed ("1.0.8")
    /node                    the NIRGraph: type = "NIRGraph",
        nodes/<name>/...     one group per node: ``type`` plus the node's fields as datasets
        edges                (E, 2) strings: (source, target)
        metadata/...         generator, format version, how ReLU is mapped
    root attributes          bll_ref_format = "nir", bll_ref_format_version = 1

With ``quant=`` (an HDF5 export of the same model), every node also carries
``metadata["quant"]``: its integer weight / bias codes in the node's own weight layout, its output
Q format and what its integer version computes (docs/nir-quant.md, a proposal for NIR).

Shapes are per sample (NIR types exclude the batch axis).  Layer -> node mapping:

=========================  =======================================================================
bll_ref layer              NIR node
=========================  =======================================================================
Dense (W (in, out), c)     Affine(weight = W.T (out, in), bias = c): y = W x + b (bias 0 if none)
Conv2d (W (o, i, kh, kw))  Conv2d(weight = W, stride, padding, dilation (1, 1), groups 1, bias,
                           input_shape (H, W))
Dense/Conv2d + BatchNorm   the same node with the eval-mode BN folded in (``fold_batchnorm``);
                           NIR has no batch norm
BatchNorm alone            Affine(diag(s), t) on vectors, 1x1 Conv2d with diagonal weight on
                           (C, H, W): the same per-channel y = s x + t, exactly
ReLU                       IF(r = 1, v_threshold = 1, v_reset = 0), rate coded (see below)
AvgPool2d                  AvgPool2d(kernel_size, stride, padding (0, 0))
Flatten                    Flatten(start_dim 0, end_dim -1, input_type (C, H, W))
Residual                   body and shortcut as nodes; each path ends in an edge into one
                           Scale(1) junction node named by the Residual's path.  NIR sums the
                           signals arriving over several edges, so the junction outputs
                           body(x) + shortcut(x); scale 1 makes it the identity otherwise
Sequential                 flattened; nodes are named by layer path as in
                           ``compile_integer`` records ("1.0" = block 1 layer 0, "0.0+0.1" =
                           Dense 0.0 with BatchNorm 0.1 folded, "2.1" = the junction of
                           Residual 2.1, "2.1.body.0" = a layer inside it)
MaxPool2d, LeakyReLU,      ValueError: NIR has no primitive for them (export HDF5 / C instead)
Sigmoid, Tanh, others
=========================  =======================================================================

ReLU as IF neurons: this is the rate-coded ANN-to-SNN conversion (Cao et al. 2015; Diehl et al.
2015; Rueckauer et al. 2017).  An integrate-and-fire neuron with R = 1 driven by a constant current
I fires at a rate of about max(I, 0) / v_threshold spikes per unit time, so IF(r=1, v_threshold=1)
is the spiking counterpart of ReLU for activations in [0, 1] per time step (a discrete simulator
caps the rate at one spike per step, and NIR's reset to v_reset discards the overshoot).  Run as
an SNN, scale each layer's weights to its activation range first (data-based normalisation,
Rueckauer et al. 2017).  A reader that wants the ANN back maps every IF node whose metadata says
``bll_ref_layer = "ReLU"`` to ReLU; metadata is a hint only, the graph stands on its own.
"""
from __future__ import annotations

import pathlib

import h5py
import numpy as np

from bll_ref import layers as L
from bll_ref.fileio import atomic_path
from bll_ref.fixedpoint import records as R
from bll_ref.fixedpoint.walk import Affine, ChannelAffine, Junction, walk

from .hdf5 import read

__all__ = ["write_nir", "to_nir_dict", "quant_metadata", "NIR_VERSION", "FORMAT_VERSION", "QUANT_VERSION"]

NIR_VERSION = "1.0.8"          # the nir layout this writer follows (checked by tests with nir.read)
FORMAT_VERSION = 1             # bll_ref's version of this export (root attribute)
RELU_MAPPING = ("ReLU -> IF(r=1, v_threshold=1, v_reset=0): rate-coded ANN-to-SNN conversion, "
                "firing rate ~ max(I, 0) / v_threshold")
_NO_PRIMITIVE = (L.MaxPool2d, L.LeakyReLU, L.Sigmoid, L.Tanh)
QUANT_VERSION = 1              # version of the per-node metadata["quant"] proposal (docs/nir-quant.md)


class _GraphBuilder:
    """Collects nodes (in nir's ``to_dict`` layout), edges and per-sample output shapes."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.nodes, self.edges, self.shapes = {}, [], {}
        self.names = []                          # node of each step of the walk (0: the input)

    def add(self, name, node, srcs, shape):
        if name in self.nodes:
            raise ValueError(f"write_nir: two nodes named {name!r}")
        self.nodes[name] = node
        for s in srcs:
            if (s, name) in self.edges:
                raise ValueError(f"write_nir: duplicate edge {s!r} -> {name!r} (a Residual whose body "
                                 "and shortcut are both the identity?)")
            self.edges.append((s, name))
        self.shapes[name] = tuple(int(d) for d in shape)
        return name

    def arr(self, a):
        return np.ascontiguousarray(a, dtype=self.dtype)

    # -- one node per step of the model walk ----------------------------------------------------
    def step(self, st):
        src = self.names[st.inputs[0]]
        if isinstance(st, Affine):
            name = self.affine(st.name, st.layer, st.W, st.c, st.bn is not None, src)
        elif isinstance(st, ChannelAffine):
            name = self.batchnorm(st.name, st.s, st.t, src)
        elif isinstance(st, Junction):
            name = self.junction(st.name, src, self.names[st.inputs[1]])
        else:
            name = self.layer(st.name, st.layer, src)
        self.names.append(name)

    def junction(self, name, body, sc):
        if self.shapes[body] != self.shapes[sc]:
            raise ValueError(f"write_nir: Residual {name}: body output {self.shapes[body]} and "
                             f"shortcut output {self.shapes[sc]} differ")
        node = {"type": "Scale", "scale": self.arr(np.ones(self.shapes[body])),
                "metadata": {"bll_ref_layer": "Residual",
                             "mapping": "sum junction: NIR sums the signals of all incoming "
                                        "edges (body and shortcut); scale 1 is the identity"}}
        return self.add(name, node, [body, sc], self.shapes[body])

    def layer(self, name, layer, src):
        shape = self.shapes[src]
        kind = type(layer).__name__
        if isinstance(layer, L.ReLU):
            node = {"type": "IF", "r": self.arr(np.ones(shape)), "v_threshold": self.arr(np.ones(shape)),
                    "v_reset": self.arr(np.zeros(shape)),
                    "metadata": {"bll_ref_layer": "ReLU", "mapping": RELU_MAPPING}}
            return self.add(name, node, [src], shape)
        if isinstance(layer, L.Flatten):
            node = {"type": "Flatten", "input_type": np.array(shape, np.int64), "start_dim": np.int64(0),
                    "end_dim": np.int64(-1), "metadata": {"bll_ref_layer": "Flatten"}}
            return self.add(name, node, [src], (int(np.prod(shape)),))
        if isinstance(layer, L.AvgPool2d):
            (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
            if len(shape) != 3 or shape[1] < kh or shape[2] < kw:
                raise ValueError(f"write_nir: AvgPool2d {name} ({kh}x{kw}) expects a (C, H, W) input "
                                 f"with H >= {kh}, W >= {kw}, got per-sample shape {shape}")
            node = {"type": "AvgPool2d", "kernel_size": np.array([kh, kw], np.int64),
                    "stride": np.array([sh, sw], np.int64), "padding": np.zeros(2, np.int64),
                    "metadata": {"bll_ref_layer": "AvgPool2d"}}
            out = (shape[0], (shape[1] - kh) // sh + 1, (shape[2] - kw) // sw + 1)
            return self.add(name, node, [src], out)
        if isinstance(layer, _NO_PRIMITIVE):
            hint = (" (average pooling maps to AvgPool2d)" if isinstance(layer, L.MaxPool2d)
                    else " (only ReLU has a rate-coded IF mapping)")
            raise ValueError(f"write_nir: NIR has no primitive for {kind} (layer {name}){hint}; use ReLU "
                             "/ AvgPool2d or export HDF5/C (exporters.hdf5, exporters.c_header)")
        raise ValueError(f"write_nir: layer {name} ({kind}) has no NIR mapping; supported: Dense, "
                         "Conv2d, BatchNorm, ReLU, AvgPool2d, Flatten, Residual, Sequential")

    def affine(self, name, layer, W, c, folded, src):
        shape = self.shapes[src]
        meta = {"bll_ref_layer": type(layer).__name__ + ("+BatchNorm (folded)" if folded else "")}
        if isinstance(layer, L.Dense):
            if shape != (W.shape[0],):
                raise ValueError(f"write_nir: Dense {name} expects a vector of {W.shape[0]} features, got "
                                 f"per-sample shape {shape}; NIR's Affine maps vectors (add a Flatten)")
            node = {"type": "Affine", "weight": self.arr(W.T), "bias": self.arr(c), "metadata": meta}
            return self.add(name, node, [src], (W.shape[1],))
        return self.conv(name, W, c, layer.stride, layer.padding, src, meta)

    def conv(self, name, W, c, stride, padding, src, meta):
        shape = self.shapes[src]
        o, i, kh, kw = W.shape
        (sh, sw), (ph, pw) = stride, padding
        if len(shape) != 3 or shape[0] != i or shape[1] + 2 * ph < kh or shape[2] + 2 * pw < kw:
            raise ValueError(f"write_nir: Conv2d {name} ({i} -> {o} channels, {kh}x{kw}, padding "
                             f"{ph},{pw}) does not fit the per-sample input shape {shape}")
        out = (o, (shape[1] + 2 * ph - kh) // sh + 1, (shape[2] + 2 * pw - kw) // sw + 1)
        node = {"type": "Conv2d", "input_shape": np.array(shape[1:], np.int64), "weight": self.arr(W),
                "stride": np.array([sh, sw], np.int64), "padding": np.array([ph, pw], np.int64),
                "dilation": np.ones(2, np.int64), "groups": np.int64(1), "bias": self.arr(c),
                "metadata": meta}
        return self.add(name, node, [src], out)

    def batchnorm(self, name, s, t, src):
        shape = self.shapes[src]
        meta = {"bll_ref_layer": "BatchNorm"}
        if len(shape) == 1 and shape[0] == s.shape[0]:
            node = {"type": "Affine", "weight": self.arr(np.diag(s)), "bias": self.arr(t), "metadata": meta}
            return self.add(name, node, [src], shape)
        if len(shape) == 3 and shape[0] == s.shape[0]:
            return self.conv(name, np.diag(s)[:, :, None, None], t, (1, 1), (0, 0), src, meta)
        raise ValueError(f"write_nir: BatchNorm {name} over {s.shape[0]} channels does not fit the "
                         f"per-sample shape {shape}")


def _q(fmt, codes=None) -> dict:
    """A Q format as plain metadata (signed as 0/1: HDF5 has no bool), optionally with its codes."""
    d = {"width": np.int64(fmt.width), "frac": np.int64(fmt.frac), "signed": np.int64(int(fmt.signed)),
         "rounding": fmt.rounding, "overflow": fmt.overflow}
    return d if codes is None else {"codes": np.ascontiguousarray(codes), **d}


def _node_layout(rec, W, node):
    """A record's weight array ``W`` (codes, or the float twin) in the layout of the NIR node's
    ``weight`` (Affine: (out, in); Conv2d: (o, i, kh, kw); a lone BatchNorm: the diagonal matrix /
    1x1 kernel), so the integer node is the float node's own operation applied to codes."""
    W = np.asarray(W)
    if isinstance(rec, R.Dense):
        codes = W.T
    elif isinstance(rec, R.Conv2d):
        codes = W
    else:                                        # scale: a diagonal Affine or 1x1 Conv2d node
        codes = np.diag(W) if node["type"] == "Affine" else np.diag(W)[:, :, None, None]
    codes = np.ascontiguousarray(codes)
    if codes.shape != np.shape(node["weight"]):
        raise ValueError(f"record {rec.name!r}: weight codes {codes.shape} do not fit the NIR node's weight "
                         f"{np.shape(node['weight'])}")
    return codes


def quant_metadata(graph, records) -> dict:
    """Attach ``metadata["quant"]`` (docs/nir-quant.md) to every node of ``graph`` (a
    :func:`to_nir_dict` result, changed in place) from the integer records of the same model
    (``exporters.hdf5.export(...).records`` or ``IntegerModel.records``): the record of each node
    has the node's name (layer path; ``input``), the Output node gets the last record's format.
    ValueError when the records are not those of the graph's model."""
    by_name = {r.name: r for r in records}
    steps = [n for n in graph["nodes"] if n != "output"]
    if set(steps) != set(by_name):
        raise ValueError(f"the integer records do not belong to this model: NIR nodes without a record "
                         f"{sorted(set(steps) - set(by_name))[:5]}, records without a node "
                         f"{sorted(set(by_name) - set(steps))[:5]}")
    for name, node in graph["nodes"].items():
        rec = by_name[name] if name != "output" else records[-1]
        q = {"version": np.int64(QUANT_VERSION), "kind": "output" if name == "output" else rec.kind,
             "output": _q(rec.out_fmt)}
        if isinstance(rec, R.Affine) and name != "output":
            wf = rec.info.get("W_float")
            if wf is not None and not np.allclose(_node_layout(rec, wf, node), node["weight"], rtol=1e-5, atol=1e-6):
                raise ValueError(f"the integer record {name!r} was made from other weights than the model's "
                                 "(export and NIR of different checkpoints?)")
            q["weight"] = _q(rec.w_fmt, _node_layout(rec, rec.W, node))
            acc_frac = np.int64(rec.acc_frac)
            if getattr(rec, "w_frac", None) is not None:     # per-output-channel formats: (out,) fracs
                q["weight"]["frac"] = np.asarray(rec.w_frac, np.int64)
                acc_frac = np.asarray(rec.channel_acc_fracs(), np.int64)
            q["bias"] = {"codes": np.asarray(rec.c, np.int64), "width": np.int64(64), "frac": acc_frac,
                         "signed": np.int64(1), "rounding": rec.w_fmt.rounding, "overflow": "none"}
            q["acc_frac"] = acc_frac
        elif isinstance(rec, R.AvgPool2d):
            q["recip"], q["recip_shift"] = np.int64(rec.recip), np.int64(rec.recip_shift)
        node.setdefault("metadata", {})["quant"] = q
    graph["metadata"]["quant"] = {"format": "bll_ref-nir-quant", "version": np.int64(QUANT_VERSION),
                                  "spec": "docs/nir-quant.md: integer codes and Q formats per node"}
    return graph


def to_nir_dict(model, *, input_shape, dtype=np.float32) -> dict:
    """The NIR graph of ``model`` as the nested dict ``NIRGraph.to_dict()`` would give.

    With the ``nir`` package installed, ``nir.dict2NIRNode(to_nir_dict(...))`` builds the graph
    in memory.

    Parameters
    ----------
    model : Layer (usually Sequential of blocks) or list of blocks, float weights; BatchNorm is
        used in eval mode (running statistics)
    input_shape : tuple of int, per-sample input shape, e.g. (784,) or (1, 28, 28)
    dtype : float32 (default, what SNN frameworks load) | float64, dtype of weights and parameters

    Returns
    -------
    dict with keys type ("NIRGraph"), nodes ({name: node dict}), edges ([(src, dst)]), metadata
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"write_nir: dtype must be float32 or float64, got {dtype}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except TypeError:
        raise ValueError(f"write_nir: input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"write_nir: input_shape must be non-empty positive ints (per sample, no "
                         f"batch axis), got {input_shape!r}")
    model = L.as_sequential(model, "write_nir", wrap=False)
    g = _GraphBuilder(dtype)
    g.names.append(g.add("input", {"type": "Input", "shape": np.array(shape, np.int64)}, [], shape))
    for st in walk(model):
        g.step(st)
    last = g.names[-1]
    g.add("output", {"type": "Output", "shape": np.array(g.shapes[last], np.int64)}, [last], g.shapes[last])
    meta = {"generator": "bll_ref exporters.nir", "bll_ref_format_version": np.int64(FORMAT_VERSION),
            "relu_mapping": RELU_MAPPING,
            "batchnorm": "folded into the preceding Affine/Conv2d (eval-mode statistics)",
            "residual": "Scale(1) junction node summing its incoming edges"}
    return {"type": "NIRGraph", "nodes": g.nodes, "edges": list(g.edges), "metadata": meta}


def _write_group(group, d):
    """The generic writer: dict -> group, str -> string dataset, edges -> (E, 2) strings,
    anything else -> dataset (the layout ``nir.read`` expects)."""
    for k, v in d.items():
        if isinstance(v, dict):
            if k == "metadata" and not v:
                continue
            _write_group(group.create_group(k, track_order=True), v)
        elif isinstance(v, str):
            group.create_dataset(k, data=v, dtype=h5py.string_dtype())
        elif k == "edges":
            group.create_dataset(k, data=np.array(v, dtype=object).reshape(-1, 2), dtype=h5py.string_dtype())
        else:
            group.create_dataset(k, data=np.asarray(v))


def write_nir(model, path, *, input_shape, dtype=np.float32, quant=None) -> pathlib.Path:
    """Write ``model`` as a NIR graph file (HDF5), atomically (temp file + ``os.replace``).

    See the module docstring for the layer mapping; unsupported layers (MaxPool2d, LeakyReLU,
    Sigmoid, Tanh, ...) raise ValueError naming the layer.  Read back with ``nir.read(path)``.

    Parameters
    ----------
    model : Layer or list of blocks (see :func:`to_nir_dict`)
    path : str or Path, e.g. ``"model.nir"``
    input_shape : tuple of int, per-sample input shape
    dtype : float32 | float64
    quant : None, or the integer version of the same model: an export (``ExportedModel`` or the path
        of an HDF5 export file), an ``IntegerModel`` or its list of records; every node then
        carries ``metadata["quant"]`` with its integer codes and Q formats (docs/nir-quant.md)

    Returns
    -------
    pathlib.Path of the written file
    """
    graph = to_nir_dict(model, input_shape=input_shape, dtype=dtype)
    if quant is not None:
        if isinstance(quant, (str, pathlib.Path)):
            quant = read(quant)
        quant_metadata(graph, quant if isinstance(quant, (list, tuple)) else quant.records)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["bll_ref_format"] = "nir"
        f.attrs["bll_ref_format_version"] = FORMAT_VERSION
        f.create_dataset("version", data=NIR_VERSION, dtype=h5py.string_dtype())
        _write_group(f.create_group("node", track_order=True), graph)
    return path
