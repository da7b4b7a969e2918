"""Write each quantized Linear as explicit QDQ ONNX.

The FP graph comes from torch.onnx with one placeholder node ``loraq::QuantLinear`` (attribute
``layer``) per quantized Linear. ``write_qdq`` replaces each placeholder with:

    x' = x / smooth                                     (only when smoothing was used)
    y  = DQ(Q(x')) @ DQ(W_int4; axis 0, block)          main path: INT4 block weight DQ feeds MatMul
       + DQ(Q(DQ(Q(x')) @ DQ(A))) @ DQ(B)               quantized low-rank branch
       + bias

Dynamic per-token activation scales are computed in the graph (Abs, ReduceMax over the last
axis, Div by qmax, Max with a floor) and applied by a blocked QuantizeLinear whose block spans
the whole last axis, so Q/DQ stay explicit nodes that ONNX Runtime and graph passes see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphs.onnx_tensors import constant, int_dtype

MARKER_DOMAIN = "loraq"
MARKER_OP = "QuantLinear"
ACT_SCALE_EPS = 1e-8  # must equal calibless.quant.ACT_SCALE_EPS: the two sides agree op for op


@dataclass
class QWeight:
    """A quantized (K, N) matrix: codes in (K, N), scales (K / block, N), blocks along K."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: Optional[np.ndarray]
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[0] // self.scale.shape[0]

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[0] == 1


@dataclass
class ActQuant:
    bits: int
    static_scale: Optional[float] = None  # None: dynamic per-token

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))


Factor = Union[QWeight, np.ndarray]  # float16 array: the 16-bit branch


@dataclass
class LinearQDQ:
    weight: QWeight
    act: Optional[ActQuant] = None
    bias: Optional[np.ndarray] = None
    smooth: Optional[np.ndarray] = None
    down: Optional[Factor] = None
    up: Optional[Factor] = None
    branch_in: Optional[ActQuant] = None
    branch_mid: Optional[ActQuant] = None


class _Writer:
    def __init__(self, graph: gs.Graph, layer: str):
        self.graph = graph
        self.layer = layer
        self.count = 0
        self.constants: dict[str, gs.Constant] = {}

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.layer}/{what}_{self.count}"

    def var(self, what: str, dtype=np.float32) -> gs.Variable:
        return gs.Variable(self.name(what), dtype=dtype)

    def node(self, op: str, inputs, attrs=None, out_dtype=np.float32, outputs=None) -> gs.Variable:
        outs = outputs or [self.var(op.lower(), out_dtype)]
        self.graph.nodes.append(gs.Node(op, self.name(op), attrs or {}, list(inputs), outs))
        return outs[0]

    def const(self, what: str, array) -> gs.Constant:
        """One constant per name within a layer (shared scalars such as qmax are reused)."""
        if what not in self.constants:
            self.constants[what] = constant(f"{self.layer}.{what}", array)
        return self.constants[what]

    def weight(self, what: str, w: QWeight) -> gs.Variable:
        """DequantizeLinear of a constant quantized weight; feeds its consumer directly."""
        signed = w.zero_point is None
        dtype = int_dtype(w.bits, signed)
        codes = self.const(f"{what}_q", w.codes.astype(dtype))
        if w.per_channel:
            attrs = {"axis": 1}
            scale = self.const(f"{what}_scale", w.scale[0].astype(np.float32))
            zp = None if signed else self.const(f"{what}_zero_point", w.zero_point[0].astype(dtype))
        else:
            attrs = {"axis": 0, "block_size": w.block_size}
            scale = self.const(f"{what}_scale", w.scale.astype(np.float32))
            zp = None if signed else self.const(f"{what}_zero_point", w.zero_point.astype(dtype))
        inputs = [codes, scale] + ([zp] if zp is not None else [])
        return self.node("DequantizeLinear", inputs, attrs)

    def float_weight(self, what: str, w: np.ndarray) -> gs.Variable:
        return self.node("Cast", [self.const(what, w.astype(np.float16))], {"to": TensorProto.FLOAT})

    def factor(self, what: str, f: Factor) -> gs.Variable:
        return self.weight(what, f) if isinstance(f, QWeight) else self.float_weight(what, f)

    def act(self, x: gs.Variable, q: Optional[ActQuant], width: int) -> gs.Variable:
        """Q/DQ of an activation whose last axis has ``width`` elements."""
        if q is None:
            return x
        otype = TensorProto.INT4 if q.bits == 4 else TensorProto.INT8
        if q.static_scale is not None:
            s = self.const(f"act_scale_{self.count}", np.array(q.static_scale, np.float32))
            if q.bits == 6:  # int8 storage would saturate at +-127, not at the 6-bit range
                lo = self.const(f"act_lo_{self.count}", np.array(q.qmin * q.static_scale, np.float32))
                hi = self.const(f"act_hi_{self.count}", np.array(q.qmax * q.static_scale, np.float32))
                x = self.node("Clip", [x, lo, hi])
            qx = self.node("QuantizeLinear", [x, s], {"output_dtype": otype}, out_dtype=None)
            return self.node("DequantizeLinear", [qx, s])
        amax = self.node("ReduceMax", [self.node("Abs", [x]), self.const("axes_last", np.array([-1], np.int64))],
                         {"keepdims": 1})
        s = self.node("Div", [amax, self.const(f"qmax{q.bits}", np.array(q.qmax, np.float32))])
        s = self.node("Max", [s, self.const("act_scale_eps", np.array(ACT_SCALE_EPS, np.float32))])
        attrs = {"axis": -1, "block_size": width}
        qx = self.node("QuantizeLinear", [x, s], {**attrs, "output_dtype": otype}, out_dtype=None)
        return self.node("DequantizeLinear", [qx, s], attrs)


def write_linear(graph: gs.Graph, layer: str, q: LinearQDQ, x: gs.Variable, y: gs.Variable) -> None:
    """Append the QDQ subgraph computing ``y`` from ``x`` for one layer."""
    w = _Writer(graph, layer)
    k, n = q.weight.codes.shape
    if q.smooth is not None:
        x = w.node("Div", [x, w.const("smooth", q.smooth.astype(np.float32))])
    out = w.node("MatMul", [w.act(x, q.act, k), w.weight("weight", q.weight)])
    if q.down is not None:
        rank = q.down.codes.shape[1] if isinstance(q.down, QWeight) else q.down.shape[1]
        h = w.node("MatMul", [w.act(x, q.branch_in, k), w.factor("down", q.down)])
        up = w.node("MatMul", [w.act(h, q.branch_mid, rank), w.factor("up", q.up)])
        out = w.node("Add", [out, up])
    if q.bias is not None:
        out = w.node("Add", [out, w.const("bias", q.bias.astype(np.float32))])
    w.node("Identity", [out], outputs=[y])


def marker_layers(model: onnx.ModelProto) -> list[str]:
    return [_layer_attr(n) for n in model.graph.node if n.domain == MARKER_DOMAIN and n.op_type == MARKER_OP]


def _layer_attr(node) -> str:
    for a in node.attribute:
        if a.name == "layer":
            return a.s.decode() if isinstance(a.s, bytes) else a.s
    raise ValueError(f"placeholder node {node.name} has no 'layer' attribute")


def write_qdq(model: onnx.ModelProto, layers: dict[str, LinearQDQ]) -> onnx.ModelProto:
    """Replace every ``loraq::QuantLinear`` placeholder with its QDQ subgraph."""
    graph = gs.import_onnx(model)
    found = set()
    for node in [n for n in graph.nodes if n.op == MARKER_OP and n.domain == MARKER_DOMAIN]:
        layer = node.attrs["layer"]
        layer = layer.decode() if isinstance(layer, bytes) else layer
        if layer not in layers:
            raise KeyError(f"the graph has a placeholder for layer {layer!r} but no quantized record")
        found.add(layer)
        x, y = node.inputs[0], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        write_linear(graph, layer, layers[layer], x, y)
    missing = set(layers) - found
    if missing:
        raise KeyError(f"quantized layers with no placeholder in the graph: {sorted(missing)[:5]}")
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend([onnx.helper.make_opsetid("", 21)])
    out.ir_version = model.ir_version
    return out
