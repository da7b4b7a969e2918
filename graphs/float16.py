"""The whole graph in float16: activations, weight and activation scales, constants, inputs and
outputs (``to_float16``), for TensorRT's strongly typed networks, where the ONNX types set the
precision: a DequantizeLinear outputs its scale's type, so an fp32 graph builds fp32 GEMMs
(NVIDIA, TensorRT developer guide, "Strongly Typed Networks"; docs/deployment.md, "TensorRT").

Values outside float16's range are clamped to +-65504 (the exporters' "minus infinity" attention
mask constant, finfo(float32).min, becomes -65504: still e^-65504 = 0 after softmax). A positive
scalar that is a floor (read by Max or Clip: the dynamic activation scale floor 1e-8) and lies
below float16's smallest normal (6.1e-5) becomes that normal, as does any positive scalar that
would round to zero: a zero floor would divide an all-zero token by zero. Other small scalars keep
their float16 value: an RMS norm's epsilon (1e-6 in Gemma-2 and T5) raised to 6.1e-5 would
dominate the mean square of small activations (tiny Gemma-2: relative L2 0.57 against float32).
Constants read only by float32 nodes stay float32 (the epsilon of a norm kept in float32).

Three kinds of node stay in float32, with Casts at the region's edges:
- ops whose ONNX schema has no float16 for a float input (Range: a position index);
- the sinusoidal embeddings, Sin and Cos with every float computation feeding them (positions,
  frequencies, the diffusion timestep): their arguments reach 1000 (a timestep), where float16's
  spacing is 0.5, so sin(t * f) would be off by up to 0.25 rad. A graph input read only there
  (the timestep) stays a float32 input. Torch's float16 diffusers models do the same (their
  timestep embedding is computed in float32, then cast).
- the nodes a model computes in float32 itself, named by the caller as node-name patterns
  (``keep``): T5's feed-forward output projections ``wo``, which transformers keeps in float32
  (``T5PreTrainedModel._keep_in_fp32_modules = ["wo"]``, models/t5/modeling_t5.py) because their
  activations overflow float16, with the residual stream they feed.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graphs.protos import copy_model

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal, 6.1e-5


FLOOR_OPS = ("Max", "Clip")  # a scalar read by these is a floor: Max(s, eps)


def _half(a: np.ndarray, floor: bool = False) -> np.ndarray:
    a = np.clip(a.astype(np.float32), -FP16_MAX, FP16_MAX)
    h = a.astype(np.float16)
    raise_ = (a.size == 1) & (a > 0) & ((h == 0) | (floor & (a < FP16_TINY)))
    return np.where(raise_, np.float16(FP16_TINY), h).astype(np.float16)


def _convert_tensor(t: onnx.TensorProto, floor: bool = False) -> None:
    if t.data_type == TensorProto.FLOAT:
        t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(t), floor), t.name))


def _convert_type(vi: onnx.ValueInfoProto) -> None:
    if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16


FLOAT32_SEEDS = ("Sin", "Cos")  # with every float computation feeding them


def _float_values(model: onnx.ModelProto) -> set:
    """Names of the float32 values of ``model`` (ONNX shape inference, plus inputs/initializers)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model over 2 GB cannot be inferred in memory: declared types only
        inferred = model
    g = inferred.graph
    names = {vi.name for vi in list(g.input) + list(g.output) + list(g.value_info)
             if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for n in g.node:
        if n.op_type == "Constant" and any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT
                                           for a in n.attribute):
            names.add(n.output[0])
    return names


def _no_float16(node: onnx.NodeProto, floats: set, opset: int) -> bool:
    """True when the node's schema takes no float16 at one of its float inputs (Range)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except Exception:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for i, name in enumerate(node.input):
        if name in floats and schema.inputs:
            formal = schema.inputs[min(i, len(schema.inputs) - 1)]
            if "tensor(float16)" not in allowed.get(formal.type_str, {formal.type_str}):
                return True
    return False


def float32_region(model: onnx.ModelProto, floats: set = None, keep=()) -> set:
    """Indices of the nodes that stay in float32 (see the module docstring); ``floats``: the
    float32 value names (default: inferred); ``keep``: node-name regular expressions."""
    g = model.graph
    floats = _float_values(model) if floats is None else floats
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    producers = {o: i for i, n in enumerate(g.node) for o in n.output}
    kept = [re.compile(p) for p in keep]
    keep = {i for i, n in enumerate(g.node) if n.domain in ("", "ai.onnx") and _no_float16(n, floats, opset)}
    keep |= {i for i, n in enumerate(g.node) if any(p.search(n.name) for p in kept)}
    closure, todo = set(), [i for i, n in enumerate(g.node) if n.op_type in FLOAT32_SEEDS]
    while todo:
        i = todo.pop()
        if i in closure:
            continue
        closure.add(i)
        todo += [producers[name] for name in g.node[i].input if name in floats and name in producers]
    return keep | closure


def to_float16(model: onnx.ModelProto, keep=()) -> onnx.ModelProto:
    """A copy of ``model`` computing in float16 except where float32 is needed (see the module
    docstring); ``keep``: node-name regular expressions of nodes the model computes in float32."""
    out = copy_model(model)
    g = out.graph
    floats = _float_values(out)
    keep = float32_region(out, floats, keep)
    readers: dict = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            readers.setdefault(name, set()).add(i)
    # a Constant read only by float32 nodes joins them: its value is never rounded to float16
    keep |= {i for i, n in enumerate(g.node) if n.op_type == "Constant" and n.output[0] in floats
             and readers.get(n.output[0]) and readers[n.output[0]] <= keep}
    floors = {name for n in g.node if n.op_type in FLOOR_OPS for name in n.input[1:]}
    kept_outputs = {o for i in keep for o in g.node[i].output}
    for o in g.output:
        if o.name in kept_outputs and o.name in floats:
            raise ValueError(f"graph output {o.name} is computed in the float32 region")
    # float32 sources (inputs, initializers) read only inside the region stay float32
    sources = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    stay = {name for name in sources & floats if readers.get(name) and readers[name] <= keep}
    for t in g.initializer:
        if t.name not in stay:
            _convert_tensor(t, t.name in floors)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name not in stay and vi.name not in kept_outputs:
            _convert_type(vi)
    nodes, casts = [], set()

    def cast(name: str, to: int) -> str:
        new = f"{name}/as_{'fp32' if to == TensorProto.FLOAT else 'fp16'}"
        if new not in casts:
            casts.add(new)
            nodes.append(onnx.helper.make_node("Cast", [name], [new], name=f"{new}/Cast", to=to))
        return new

    for i, node in enumerate(g.node):
        if i in keep:  # float16 values read by the region: cast up just before
            for k, name in enumerate(node.input):
                if name in floats and name not in kept_outputs and name not in stay:
                    node.input[k] = cast(name, TensorProto.FLOAT)
        else:  # region outputs read outside it: the cast-down copy
            for k, name in enumerate(node.input):
                if name in kept_outputs and name in floats:
                    node.input[k] = f"{name}/as_fp16"
            _convert_attributes(node, node.op_type == "Constant" and node.output[0] in floors)
        nodes.append(node)
        if i in keep:  # cast its float32 outputs down just after, where read outside the region
            for name in node.output:
                if name in floats and readers.get(name, set()) - keep:
                    cast(name, TensorProto.FLOAT16)
    copies = [onnx.NodeProto() for _ in nodes]  # the originals belong to the field cleared next
    for a, b in zip(copies, nodes):
        a.CopyFrom(b)
    del g.node[:]
    g.node.extend(copies)
    return out


def _convert_attributes(node: onnx.NodeProto, floor: bool = False) -> None:
    for a in node.attribute:
        if a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16
        elif a.type == onnx.AttributeProto.TENSOR:
            _convert_tensor(a.t, floor)
        elif a.name in ("dtype", "output_dtype") and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16


def float32_nodes(model: onnx.ModelProto) -> dict:
    """What a float16 graph computes in float32: op counts of the nodes between the Casts that
    ``to_float16`` put at the region's edges (outputs read in float32 by float32 nodes)."""
    from collections import Counter
    g = model.graph
    floats = _float_values(model)
    ops = Counter(n.op_type for n in g.node if n.op_type not in ("Cast", "Constant", "Shape")
                  and any(o in floats for o in n.output))
    return dict(sorted(ops.items()))
