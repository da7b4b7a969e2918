"""Write each quantized Linear as explicit QDQ ONNX.

The FP graph comes from torch.onnx with one placeholder node ``loraq::LayerPlaceholder``
(attribute ``layer``) per quantized Linear. ``write_qdq`` replaces each placeholder with:

    x' = Reshape(MatMul(Reshape(Gather(x, P), [-1, B]), H_B), Shape(x))   online rotation (-had<B>)
    y  = DQ(Q(x')) @ DQ(W_int4; axis 0, block)        main path: INT4 block weight DQ feeds MatMul
       + DQ(Q(DQ(Q(x')) @ DQ(A))) @ DQ(B)             quantized low-rank branch
       + bias
       + Qm(Qi(x') @ L_down) @ L_up                     LoRA adapter term (optional), added last

An adapter term whose factors are float16 constants with float activations is a run-time slot:
its initializers are named ``<layer>.lora_down`` (K, r) and ``<layer>.lora_up`` (r, N), and the
model's metadata ``loraq.lora_slots`` (JSON: layer -> [K, N, r]) lists them, so ``loraq lora set``,
an ONNX Runtime session (initializer overrides) or a TensorRT refitter can replace their values
(docs/lora.md). Added after the bias, a zero adapter adds +0 and leaves every other value as is.

Dynamic activation scales are computed in the graph (Abs, ReduceMax over the last axis, Div by
qmax, Max with a floor) and applied by a blocked QuantizeLinear whose block spans the last axis:
per token over the whole row, or, with activation groups (-ag<N>), per row of the (-1, N) view
of x (Reshape before, Reshape back after), i.e. one scale per token per N channels. Q/DQ stay
explicit nodes that ONNX Runtime and graph passes see; a rotation MatMul reads a float constant,
so checks and legalizers never take it for a quantized GEMM. One H_B constant serves every layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphs.constants import ACT_SCALE_EPS, OPSET, PLACEHOLDER_DOMAIN, PLACEHOLDER_OP
from graphs.protos import export_model
from graphs.tensors import QuantizedWeight, constant, dq_layout


@dataclass
class ActQuant:
    """Dynamic symmetric activation quantization to ``bits``, one scale per token per ``group``
    channels (None: per token over the whole row)."""

    bits: int
    group: Optional[int] = None

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass
class LayerSpec:
    """What the writer writes for one layer (numpy arrays; branch factors quantized, or float16)."""

    weight: QuantizedWeight
    act: Optional[ActQuant] = None
    bias: Optional[np.ndarray] = None
    down: Optional[Union[QuantizedWeight, np.ndarray]] = None
    up: Optional[Union[QuantizedWeight, np.ndarray]] = None
    branch_in: Optional[ActQuant] = None
    branch_mid: Optional[ActQuant] = None
    rotation: Optional[int] = None  # online Hadamard block; None: no online rotation
    rotation_perm: Optional[np.ndarray] = None  # int32 channel gather applied before it
    adapter_down: Optional[Union[QuantizedWeight, np.ndarray]] = None  # LoRA adapter term (K, r)
    adapter_up: Optional[Union[QuantizedWeight, np.ndarray]] = None  # (r, N), the scales folded in
    adapter_in: Optional[ActQuant] = None
    adapter_mid: Optional[ActQuant] = None

    @property
    def adapter_slot(self) -> Optional[list[int]]:
        """[K, N, r] when the adapter term is a swappable slot (float16 factors, float activations)."""
        a = self.adapter_down
        if a is None or isinstance(a, QuantizedWeight) or self.adapter_in is not None or self.adapter_mid is not None:
            return None
        return [int(a.shape[0]), int(self.adapter_up.shape[1]), int(a.shape[1])]


class _Writer:
    def __init__(self, graph: gs.Graph, layer: str, shared: dict):
        self.graph = graph
        self.layer = layer
        self.count = 0
        self.constants: dict[str, gs.Constant] = {}
        self.shared = shared  # graph-wide constants (the Hadamard matrices), one initializer each

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

    def weight(self, what: str, w: QuantizedWeight) -> gs.Variable:
        """DequantizeLinear of a constant quantized weight; feeds its consumer directly."""
        codes, scale, zp, attrs = dq_layout(w)
        inputs = [self.const(f"{what}_q", codes), self.const(f"{what}_scale", scale.astype(np.float32))]
        if zp is not None:
            inputs.append(self.const(f"{what}_zero_point", zp.astype(codes.dtype)))
        return self.node("DequantizeLinear", inputs, attrs)

    def float_weight(self, what: str, w: np.ndarray) -> gs.Variable:
        return self.node("Cast", [self.const(what, w.astype(np.float16))], {"to": TensorProto.FLOAT})

    def factor(self, what: str, f) -> gs.Variable:
        return self.weight(what, f) if isinstance(f, QuantizedWeight) else self.float_weight(what, f)

    def rows(self, x: gs.Variable, width: int) -> tuple[gs.Variable, gs.Variable]:
        """(x viewed as rows of ``width``, x's shape to restore it): rank-agnostic."""
        shape = self.node("Shape", [x], out_dtype=np.int64)
        return self.node("Reshape", [x, self.const(f"rows{width}", np.array([-1, width], np.int64))]), shape

    def rotate(self, x: gs.Variable, block: int, perm: Optional[np.ndarray]) -> gs.Variable:
        """x P H_B online: Gather, then the block Hadamard as MatMul on the (-1, B) view."""
        if perm is not None:
            x = self.node("Gather", [x, self.const("rotation_perm", perm.astype(np.int32))], {"axis": -1})
        key = f"hadamard{block}"
        if key not in self.shared:
            self.shared[key] = constant(f"loraq.{key}", hadamard_matrix(block))
        rows, shape = self.rows(x, block)
        return self.node("Reshape", [self.node("MatMul", [rows, self.shared[key]]), shape])

    def act(self, x: gs.Variable, q: Optional[ActQuant], width: int) -> gs.Variable:
        """Q/DQ of an activation whose last axis has ``width`` elements."""
        if q is None:
            return x
        if q.group is not None and q.group < width:
            rows, shape = self.rows(x, q.group)
            return self.node("Reshape", [self.act(rows, ActQuant(q.bits), q.group), shape])
        otype = TensorProto.INT4 if q.bits == 4 else TensorProto.INT8
        amax = self.node("ReduceMax", [self.node("Abs", [x]), self.const("axes_last", np.array([-1], np.int64))],
                         {"keepdims": 1})
        s = self.node("Div", [amax, self.const(f"qmax{q.bits}", np.array(q.qmax, np.float32))])
        s = self.node("Max", [s, self.const("act_scale_eps", np.array(ACT_SCALE_EPS, np.float32))])
        attrs = {"axis": -1, "block_size": width}
        qx = self.node("QuantizeLinear", [x, s], {**attrs, "output_dtype": otype}, out_dtype=None)
        return self.node("DequantizeLinear", [qx, s], attrs)


def hadamard_matrix(b: int) -> np.ndarray:
    """The normalized Walsh-Hadamard matrix of order ``b`` (Sylvester), float32; equal to
    calibless.rotation.hadamard (tests/test_constants.py)."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(b)).astype(np.float32)


def write_layer(graph: gs.Graph, layer: str, q: LayerSpec, x: gs.Variable, y: gs.Variable,
                shared: Optional[dict] = None) -> None:
    """Append the QDQ subgraph computing ``y`` from ``x`` for one layer."""
    w = _Writer(graph, layer, {} if shared is None else shared)
    k = q.weight.k
    if q.rotation is not None:
        x = w.rotate(x, q.rotation, q.rotation_perm)
    out = w.node("MatMul", [w.act(x, q.act, k), w.weight("weight", q.weight)])
    if q.down is not None:
        out = w.node("Add", [out, _low_rank(w, x, k, q.down, q.up, q.branch_in, q.branch_mid, "down", "up")])
    if q.bias is not None:
        out = w.node("Add", [out, w.const("bias", q.bias.astype(np.float32))])
    if q.adapter_down is not None:
        out = w.node("Add", [out, _low_rank(w, x, k, q.adapter_down, q.adapter_up, q.adapter_in, q.adapter_mid,
                                            "lora_down", "lora_up")])
    w.node("Identity", [out], outputs=[y])


def _low_rank(w: _Writer, x: gs.Variable, k: int, down, up, act_in, act_mid, down_name: str, up_name: str) -> gs.Variable:
    """Qm(Qi(x) @ down) @ up: the branch, or the adapter term."""
    rank = down.codes.shape[1] if isinstance(down, QuantizedWeight) else down.shape[1]
    h = w.node("MatMul", [w.act(x, act_in, k), w.factor(down_name, down)])
    return w.node("MatMul", [w.act(h, act_mid, rank), w.factor(up_name, up)])


def placeholder_layer(value) -> str:
    """The layer a placeholder names: its ``layer`` attribute (bytes in protos, str in gs)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def placeholder_io(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """layer -> (input tensor name, output tensor name) of each placeholder; write_qdq keeps both."""
    out = {}
    for n in model.graph.node:
        if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out[placeholder_layer(attrs["layer"])] = (n.input[0], n.output[0])
    return out


def write_qdq(model: onnx.ModelProto, layers: Mapping[str, LayerSpec]) -> onnx.ModelProto:
    """Replace every placeholder with its layer's QDQ subgraph. Each layer's spec is read once,
    when its placeholder is reached: ``layers`` may build it then (one layer's int4 codes, a
    byte per value before packing, at a time)."""
    graph = gs.import_onnx(model)
    found, shared, slots = set(), {}, {}
    for node in [n for n in graph.nodes if n.op == PLACEHOLDER_OP and n.domain == PLACEHOLDER_DOMAIN]:
        if "layer" not in node.attrs:
            raise ValueError(f"placeholder node {node.name} has no 'layer' attribute")
        layer = placeholder_layer(node.attrs["layer"])
        if layer not in layers:
            raise KeyError(f"the graph has a placeholder for layer {layer!r} but no quantized record")
        found.add(layer)
        x, y = node.inputs[0], node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        spec = layers[layer]
        write_layer(graph, layer, spec, x, y, shared)
        if spec.adapter_slot is not None:
            slots[layer] = spec.adapter_slot
        del spec
    missing = set(layers) - found
    if missing:
        raise KeyError(f"quantized layers with no placeholder in the graph: {sorted(missing)[:5]}")
    graph.cleanup().toposort()
    out = export_model(graph)
    del out.opset_import[:]
    out.opset_import.extend([onnx.helper.make_opsetid("", OPSET)])
    out.ir_version = model.ir_version
    if slots:
        set_metadata(out, LORA_SLOTS_KEY, json.dumps(slots, sort_keys=True))
    return out


LORA_SLOTS_KEY = "loraq.lora_slots"


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def lora_slots(model: onnx.ModelProto) -> dict[str, list[int]]:
    """layer -> [K, N, r] of the graph's adapter slots (empty when it has none)."""
    for p in model.metadata_props:
        if p.key == LORA_SLOTS_KEY:
            return json.loads(p.value)
    return {}
