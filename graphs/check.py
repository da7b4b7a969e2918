"""Check any ONNX file against the rules of a target: `loraq check MODEL.onnx --target ort|tensorrt`.

    check_model(model, target) -> [Violation(node, rule, message), ...]   (empty: it passes)

ort: each main INT4 weight DQ must become MatMulNBits. Static rules say why it would not
(ORT 1.32's DQ->MatMulNBits selector: axis 0, power-of-two block >= 16, constant float scales,
DQ feeding MatMul input B and nothing else, and no DQ on the MatMul's activation input), and the
rule that decides is checked for real: an ORT session is built with the optimized model written
to a temporary file, and every main weight must be read by a MatMulNBits there.
tensorrt (docs/deployment.md, "TensorRT"): INT4 for weights only (weight-only GEMMs), symmetric (signed types, zero
points all zero), constant positive scales, per-tensor activation scales (no dynamic per-token
INT8, no DynamicQuantizeLinear), block quantization for INT4 only (2-D scale on a 2-D weight,
blocks of 64 or 128 only), weight DQ feeding the GEMM directly (no Cast between).
Branch factors (initializers named '*.down_q', '*.up_q') are not main weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphs.constants import (BRANCH_SUFFIXES, GEMMS, INT4_TYPES, INT8_TYPES, MAIN_WEIGHT_SUFFIX,
                              STACKED_MAIN_WEIGHT_SUFFIX, TRT_INT4_BLOCK_SIZES)
from graphs.nodes import attr, producer, quiet
from graphs.protos import export_model
from graphs.runtime import ort_optimized
from graphs.tensors import const_array, const_dtype

TRT_TYPES = {np.dtype(np.int8), np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.float8_e4m3fn)}
FLOAT_TYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def _data_dtype(node: gs.Node):
    """The integer type of a Q's output / a DQ's input (None when unknown)."""
    if node.op == "DequantizeLinear":
        t = node.inputs[0]
        return const_dtype(t) if isinstance(t, gs.Constant) else (np.dtype(t.dtype) if t.dtype is not None else None)
    t = node.outputs[0]
    if t.dtype is not None:
        return np.dtype(t.dtype)
    if "output_dtype" in node.attrs and node.attrs["output_dtype"]:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["output_dtype"]))
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return const_dtype(node.inputs[2])
    return np.dtype(np.uint8)  # QuantizeLinear's default


def _is_weight(node: gs.Node) -> bool:
    return node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant)


def main_weight_dqs(graph: gs.Graph) -> list:
    """DQs of constant rank-2 main weights: 4-bit ones that are not branch factors, and 8-bit ones
    the writer named as a main weight (a budget's w8a16 layers; 8-bit storage also holds branch
    factors and LoRA factors, which stay float GEMMs)."""
    out = []
    for n in graph.nodes:
        if not _is_weight(n) or n.inputs[0].shape is None or len(n.inputs[0].shape) != 2:
            continue
        dtype, name = const_dtype(n.inputs[0]), n.inputs[0].name
        if (dtype in INT4_TYPES and not name.endswith(BRANCH_SUFFIXES)) \
                or (dtype in INT8_TYPES and name.endswith((MAIN_WEIGHT_SUFFIX, STACKED_MAIN_WEIGHT_SUFFIX))):
            out.append(n)
    return out


def _gemm_users(dq: gs.Node) -> list:
    return [u for u in dq.outputs[0].outputs if u.op in GEMMS and len(u.inputs) > 1 and u.inputs[1] is dq.outputs[0]]


# ---------------------------------------------------------------- ONNX Runtime
def ort_graph_rules(graph: gs.Graph) -> list:
    v = []
    for dq in main_weight_dqs(graph):
        name = dq.name or dq.outputs[0].name
        block, axis = attr(dq, "block_size", 0), attr(dq, "axis", 1)
        if not all(isinstance(i, gs.Constant) for i in dq.inputs[1:]):
            v.append(Violation(name, "ort-constant-weight", "scale / zero point must be constant initializers"))
        elif const_dtype(dq.inputs[1]) not in (np.dtype(np.float32), np.dtype(np.float16)):
            v.append(Violation(name, "ort-scale-type", "scale must be float32 or float16"))
        if block and axis not in (0, -2):
            v.append(Violation(name, "ort-dq-axis", f"blocks along axis {axis}; MatMulNBits needs axis 0 (the input dim)"))
        if block and (block < 16 or block & (block - 1)):
            v.append(Violation(name, "ort-block-size", f"block size {block}; MatMulNBits needs a power of two >= 16"))
        users = list(dq.outputs[0].outputs)
        gemms = _gemm_users(dq)
        if len(users) != 1 or len(gemms) != 1:
            ops = ", ".join(u.op for u in users) or "nothing"
            v.append(Violation(name, "ort-dq-direct",
                               f"feeds {ops}; the DQ must feed MatMul input B directly and nothing else"))
        for mm in gemms:
            if any(u.op == "QuantizeLinear" for u in _readers(mm.outputs[0])):
                v.append(Violation(mm.name, "ort-output-q", "output read by a QuantizeLinear: ORT's DQ->MatMulNBits "
                                   "selector takes no Q after the MatMul (legalize for 'ort' rewrites that Q/DQ "
                                   "as Mul(Clip(Round(Div(y, s))), s), exactly)"))
            a = producer(mm.inputs[0])
            if a is not None and a.op == "DequantizeLinear":
                v.append(Violation(mm.name, "ort-activation-dq",
                                   f"activation input comes from DequantizeLinear {a.name}: ORT's DQ->MatMulNBits "
                                   "selector needs the weight DQ to be the MatMul's only DQ parent (legalize for "
                                   "'ort' rewrites that DQ as Mul(Cast(q), scale), exactly)"))
    return v


def ort_session_rules(model: onnx.ModelProto, graph: gs.Graph, known: list) -> list:
    """The rule that decides: every main weight is read by a MatMulNBits in ONNX Runtime's own
    optimized graph (``known``: the static findings, named as the likely cause)."""
    mains = main_weight_dqs(graph)
    if not mains:
        return []
    try:
        opt = ort_optimized(model)
    except Exception as e:  # noqa: BLE001 - any failure to load is itself the violation
        return [Violation(graph.name or "model", "ort-session", f"ONNX Runtime refused the model: {str(e).splitlines()[0]}")]
    nbits_inputs = {i for n in opt.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:2]}
    dq_inputs = {n.input[0] for n in opt.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for dq in mains:
        w = dq.inputs[0].name
        # ORT 1.32 names the packed weight '<name>_T'; allow a short suffix, not another weight's name
        fused = any(i == w or re.fullmatch(re.escape(w) + r"_[A-Za-z0-9]{1,4}", i) for i in nbits_inputs) \
            and w not in dq_inputs
        if not fused:
            why = [x.rule for x in known if x.node in (dq.name, *(u.name for u in _gemm_users(dq)))]
            out.append(Violation(dq.name or w, "ort-matmulnbits",
                                 f"weight {w} is not fused into MatMulNBits in ONNX Runtime's optimized graph"
                                 + (f" (see {', '.join(sorted(set(why)))})" if why else "")))
    return out


def _readers(t) -> list:
    """Consumers of ``t``, looking through Identity nodes (ORT removes them first)."""
    out = []
    for u in t.outputs:
        out += _readers(u.outputs[0]) if u.op == "Identity" else [u]
    return out


def _users_by_dq_name(graph: gs.Graph, name: str) -> list:
    return [u for n in graph.nodes if n.name == name and n.op == "DequantizeLinear" for u in n.outputs[0].outputs]


# ---------------------------------------------------------------- TensorRT
def _scale_ok(node: gs.Node, what: str, name: str) -> list:
    s = node.inputs[1]
    if not isinstance(s, gs.Constant):
        return [Violation(name, "trt-constant-scale", f"{what} scale is computed in the graph; TensorRT needs "
                          "build-time constant scales (dynamic per-token quantization is not expressible: "
                          "calibrate static per-tensor scales)")]
    v = []
    if const_dtype(s) not in FLOAT_TYPES:
        v.append(Violation(name, "trt-scale-type", "scale must be float32, float16 or bfloat16"))
    else:
        vals = const_array(s).astype(np.float32)
        if not np.all(vals > 0):
            v.append(Violation(name, "trt-positive-scale", f"{what} scales must all be positive"))
    return v


def _zero_point_ok(node: gs.Node, name: str) -> list:
    if len(node.inputs) < 3 or (isinstance(node.inputs[2], gs.Variable) and node.inputs[2].name == ""):
        return []
    zp = node.inputs[2]
    if not isinstance(zp, gs.Constant) or np.any(const_array(zp).astype(np.int32) != 0):
        return [Violation(name, "trt-zero-point", "zero point must be absent or all zeros (symmetric only)")]
    return []


def tensorrt_rules(graph: gs.Graph) -> list:
    v = []
    for node in graph.nodes:
        if node.op == "DynamicQuantizeLinear":
            v.append(Violation(node.name or node.outputs[0].name, "trt-dynamic-quant", "DynamicQuantizeLinear: "
                               "TensorRT's ONNX parser does not take it (its dynamic quantization is FP4/FP8 only); "
                               "use static per-tensor INT8 activation scales"))
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = node.name or node.outputs[0].name
        weight = _is_weight(node)
        what = "weight" if weight else "activation"
        dtype = _data_dtype(node)
        block = attr(node, "block_size", 0)
        if dtype in INT4_TYPES and not weight:
            v.append(Violation(name, "trt-int4-activation", "4-bit activation quantization: TensorRT has INT4 for "
                               "weights only (no INT4 activations on any GPU)"))
        elif dtype is not None and dtype not in TRT_TYPES:
            v.append(Violation(name, "trt-quant-type", f"{dtype} quantization; TensorRT takes signed INT8, INT4 "
                               "(weights) or FP8"))
        v += _zero_point_ok(node, name)
        scale_v = _scale_ok(node, what, name)
        v += scale_v
        if block and dtype not in INT4_TYPES:
            v.append(Violation(name, "trt-block-int4-only", f"block quantization of {dtype} ({what}); TensorRT "
                               "block-quantizes INT4 only: use per-tensor or per-channel scales"))
        elif not weight and not scale_v and int(np.prod(node.inputs[1].shape or [1])) != 1:
            v.append(Violation(name, "trt-activation-per-tensor", "activation scales must be per-tensor (scalar)"))
        if weight and node.op == "DequantizeLinear":
            v += _trt_weight(node, name, dtype)
    return v


def _trt_weight(dq: gs.Node, name: str, dtype) -> list:
    v = []
    users = list(dq.outputs[0].outputs)
    if any(u.op not in GEMMS + ("Conv",) for u in users):
        ops = ", ".join(sorted({u.op for u in users if u.op not in GEMMS + ("Conv",)}))
        v.append(Violation(name, "trt-dq-feeds-gemm", f"weight DQ feeds {ops}; keep DQ feeding the GEMM directly "
                           "(a Cast in between blocks the fusion)"))
    if dtype in INT4_TYPES:
        rank = len(dq.inputs[0].shape or [])
        s_rank = len(dq.inputs[1].shape or [])
        axis = attr(dq, "axis", 1) % max(rank, 1)
        block = attr(dq, "block_size", 0)
        if rank != 2:
            v.append(Violation(name, "trt-int4-2d", f"INT4 weight of rank {rank}; TensorRT block-quantizes INT4 "
                               "2-D constant weights only"))
        if not block or s_rank != rank or axis < rank - 2:
            v.append(Violation(name, "trt-int4-block", "INT4 weights must be block-quantized: scale of the weight's "
                               "rank, blocked along one of the last two dims"))
        elif block not in TRT_INT4_BLOCK_SIZES:
            v.append(Violation(name, "trt-int4-block-size", f"INT4 block size {block}; TensorRT takes INT4 blocks of "
                               f"{' or '.join(map(str, TRT_INT4_BLOCK_SIZES))} only (use a g64 or g128 recipe)"))
        for mm in users:
            gemm = mm.op in GEMMS and len(mm.inputs) > 1 and mm.inputs[1] is dq.outputs[0]
            a = producer(mm.inputs[0]) if gemm else None
            if a is not None and a.op == "DequantizeLinear":
                v.append(Violation(mm.name, "trt-int4-weight-only", "INT4 weight GEMM with a quantized activation "
                                   f"({a.name}); TensorRT runs INT4 weight-only: the activation must be FP16/FP32"))
    return v


def check_graph(graph: gs.Graph, target: str, model: onnx.ModelProto = None) -> list:
    if target == "ort":
        static = ort_graph_rules(graph)
        dynamic = ort_session_rules(model if model is not None else export_model(graph), graph, static)
        if any(v.rule == "ort-session" for v in dynamic):
            return static + dynamic
        # ORT decides: a static finding that did not stop the fusion (e.g. a float Cast that ORT
        # removes) is not a violation
        unfused = {v.node for v in dynamic} | {u.name for v in dynamic for u in _users_by_dq_name(graph, v.node)}
        return [v for v in static if v.node in unfused] + dynamic
    if target == "tensorrt":
        return tensorrt_rules(graph)
    raise ValueError(f"unknown target {target!r}; choose ort or tensorrt")


def check_model(model: onnx.ModelProto, target: str) -> list:
    """Every violation of ``target``'s rules in ``model``: [Violation(node, rule, message)]."""
    with quiet():
        graph = gs.import_onnx(model)
    return check_graph(graph, target, model)


def format_violations(violations: list, target: str) -> str:
    if not violations:
        return f"OK: no violations of the {target} rules"
    lines = [str(v) for v in violations]
    return "\n".join(lines + [f"FAILED: {len(violations)} violation(s) of the {target} rules"])


def check_main(model: onnx.ModelProto, target: str) -> int:
    """What `loraq check MODEL.onnx --target T` does with the loaded model: print each violation,
    return the exit status (0: passes, 1: violations)."""
    violations = check_model(model, target)
    print(format_violations(violations, target))
    return 1 if violations else 0
