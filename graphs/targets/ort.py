"""ONNX Runtime (CPU) legalizer: make every main INT4 weight DQ fuse into MatMulNBits.

What blocks the fusion (ORT 1.32, qdq_selectors.cc DQMatMulNodeGroupSelector): the MatMul must
have exactly ONE DequantizeLinear parent, the weight's. When its activation input also comes
from a DequantizeLinear (W4A8 / W4A4 main path, or the branch's down projection), the node group
has two DQs; the selector for two DQs (QLinearMatMul / MatMulIntegerToFloat) rejects an INT4
weight with an INT8 activation; nothing fuses, and the weight is dequantized on every run.
Besides, ORT's blocked activation DQ (the per-token one) is slow (~16x a Cast and a Mul).
Second blocker: the selector takes no Q after the MatMul, so a main GEMM whose output is quantized
directly (no bias, and the next layer quantizes its input) does not fuse either.

The rewrite: an activation DequantizeLinear(q, s[, zp]) whose scale broadcasts over q (per-tensor,
or blocked with one block spanning the last axis, i.e. per token) becomes Mul(Cast(q), s)
(Sub(zp) first when present). It computes bit-identical values (float(q) * s), so numerics do not
change; the Q stays, so the activation is still quantized. Applied to activation DQs that feed a
MatMul/Gemm whose weight is a 4-bit DQ, and to every per-token DQ (ORT has no fused kernel for
per-token scales, and its blocked DQ is slow). A fake-quant Q -> DQ reading a main GEMM's output
becomes Mul(Clip(Round(Div(y, s)), qmin, qmax), s): the same values (QuantizeLinear divides and
rounds half to even, as Div and Round do; checked equal, ties included, per tensor and per
token, INT8 and INT4). Weight DQs read by several nodes are duplicated
(the fusion needs a single consumer). What this cannot fix (block size not a power of two >= 16,
blocks along N, non-constant weights) stays a violation and raises TargetError.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphs.constants import BRANCH_SUFFIXES, GEMMS, INT4_TYPES
from graphs.nodes import attr, detach, producer, replace_uses, weight_dq
from graphs.tensors import const_array, constant, weight_base, write_weight_dq

# Skinny GEMMs (one dim = the branch rank) run faster as ORT's fp32 MatMul over the dequantized
# factor than as MatMulNBits, whose int8 kernel is tiled for wide matrices: up to rank 64 on
# ONNX Runtime 1.32's CPU provider (the per-op timings: docs/benchmarks.md, "Branch factor
# GEMMs", from tools/bench_branch_forms.py).
FP32_FACTOR_MAX_RANK = 64


def is_activation_dq(node: gs.Node) -> bool:
    return node.op == "DequantizeLinear" and not isinstance(node.inputs[0], gs.Constant)


def _broadcastable(dq: gs.Node) -> bool:
    """True when Mul(Cast(q), s) broadcasts exactly like the DQ."""
    s = dq.inputs[1]
    block = attr(dq, "block_size", 0)
    q_shape = dq.inputs[0].shape
    if isinstance(s, gs.Constant) and s.shape is not None and int(np.prod(s.shape)) == 1 and not block:
        return True  # per-tensor
    axis = attr(dq, "axis", 1)
    rank = len(q_shape) if q_shape is not None else None
    last = axis == -1 or (rank is not None and axis == rank - 1)
    if not block and last and s.shape is not None and len(s.shape) == 1:
        return True  # per-channel along the last axis: a 1-D scale broadcasts over it
    if block and last:
        width = q_shape[-1] if q_shape is not None else None
        s_shape = s.shape
        if isinstance(width, int) and block >= width:
            return True  # one block spans the last axis: scale [..., 1]
        if s_shape is not None and len(s_shape) > 0 and s_shape[-1] == 1:
            return True
        return _per_token_scale(s)
    return False


def _per_token_scale(s) -> bool:
    """``s`` is ReduceMax(..., axes=[-1], keepdims=1) followed by elementwise ops with scalar
    constants (the writer's dynamic scale): its last dim is 1 even when shapes are unknown."""
    node = producer(s)
    while node is not None and node.op in ("Max", "Div", "Mul", "Clip", "Abs"):
        var = [i for i in node.inputs if isinstance(i, gs.Variable)]
        if len(var) != 1 or any(isinstance(i, gs.Constant) and int(np.prod(i.shape or [1])) != 1
                                for i in node.inputs):
            return False
        node = producer(var[0])
    if node is None or node.op != "ReduceMax" or not node.attrs.get("keepdims", 1):
        return False
    axes = node.inputs[1] if len(node.inputs) > 1 else None
    return isinstance(axes, gs.Constant) and const_array(axes).tolist() == [-1]


def _is_per_token(dq: gs.Node) -> bool:
    return bool(attr(dq, "block_size", 0)) and not isinstance(dq.inputs[1], gs.Constant)


def _feeds_nbits_gemm(dq: gs.Node) -> bool:
    for mm in dq.outputs[0].outputs:
        if mm.op in GEMMS and mm.inputs[0] is dq.outputs[0]:
            w = weight_dq(mm.inputs[1])
            if w is not None and w.dtype in INT4_TYPES:
                return True
    return False


def lower_activation_dq(graph: gs.Graph) -> int:
    """Rewrite activation DQs as Mul(Cast(q), s) where that unblocks MatMulNBits or avoids ORT's
    slow per-token DQ. Exact. Returns the number rewritten."""
    n = 0
    for dq in [d for d in graph.nodes if d.inputs and is_activation_dq(d)]:
        if not (_feeds_nbits_gemm(dq) or _is_per_token(dq)) or not _broadcastable(dq):
            continue
        q, s = dq.inputs[0], dq.inputs[1]
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        out = dq.outputs[0]
        base = dq.name or out.name
        c = gs.Variable(f"{base}/cast_out", dtype=np.float32)
        nodes = [gs.Node("Cast", f"{base}/Cast", {"to": TensorProto.FLOAT}, [q], [c])]
        if zp is not None:
            z, c2 = gs.Variable(f"{base}/zp_out", dtype=np.float32), gs.Variable(f"{base}/sub_out", dtype=np.float32)
            nodes += [gs.Node("Cast", f"{base}/CastZp", {"to": TensorProto.FLOAT}, [zp], [z]),
                      gs.Node("Sub", f"{base}/Sub", {}, [c, z], [c2])]
            c = c2
        detach(dq)
        nodes.append(gs.Node("Mul", f"{base}/Mul", {}, [c, s], [out]))
        graph.nodes.extend(nodes)
        n += 1
    return n


def _main_gemm_output(t) -> bool:
    mm = producer(t)
    if mm is None or mm.op not in GEMMS or len(mm.inputs) < 2:
        return False
    w = weight_dq(mm.inputs[1])
    return w is not None and w.dtype in INT4_TYPES and not w.name.endswith(BRANCH_SUFFIXES)


def lower_output_quantizer(graph: gs.Graph) -> int:
    """Q -> DQ on a main INT4 GEMM's output -> Mul(Clip(Round(Div(y, s)), qmin, qmax), s). Exact."""
    n = 0
    for q in [x for x in graph.nodes if x.op == "QuantizeLinear" and x.inputs and _main_gemm_output(x.inputs[0])]:
        dtype = q.attrs.get("output_dtype")
        bounds = {TensorProto.INT8: (-128, 127), TensorProto.INT4: (-8, 7)}.get(dtype)
        dqs = list(q.outputs[0].outputs)
        if bounds is None or len(q.inputs) > 2 or not dqs or any(
                d.op != "DequantizeLinear" or d.inputs[1] is not q.inputs[1] or len(d.inputs) > 2
                or not _broadcastable(d) for d in dqs):
            continue
        y, s, base = q.inputs[0], q.inputs[1], q.name
        names = ("div", "round", "clip")
        v = {k: gs.Variable(f"{base}/{k}_out", dtype=np.float32) for k in names}
        lo, hi = (constant(f"{base}.{k}", np.array(b, np.float32)) for k, b in zip(("lo", "hi"), bounds))
        graph.nodes += [gs.Node("Div", f"{base}/Div", {}, [y, s], [v["div"]]),
                        gs.Node("Round", f"{base}/Round", {}, [v["div"]], [v["round"]]),
                        gs.Node("Clip", f"{base}/Clip", {}, [v["round"], lo, hi], [v["clip"]])]
        for d in dqs:
            out = d.outputs[0]
            detach(d)
            graph.nodes.append(gs.Node("Mul", f"{d.name}/Mul", {}, [v["clip"], s], [out]))
        detach(q)
        n += 1
    return n


def single_consumer_weights(graph: gs.Graph) -> int:
    """Give each consumer of a multiply-read weight DQ its own DQ and its own copy of the
    initializers (MatMulNBits needs a single edge, and ORT's common-subexpression elimination
    would merge DQs of the very same initializers back into one)."""
    n = 0
    for dq in [d for d in graph.nodes if d.op == "DequantizeLinear" and d.inputs
               and isinstance(d.inputs[0], gs.Constant)]:
        users = list(dq.outputs[0].outputs)
        for i, user in enumerate(users[1:], 1):
            out = gs.Variable(f"{dq.outputs[0].name}_{i}", dtype=dq.outputs[0].dtype)
            ins = [constant(f"{c.name}_copy{i}", const_array(c)) if isinstance(c, gs.Constant) else c
                   for c in dq.inputs]
            graph.nodes.append(gs.Node("DequantizeLinear", f"{dq.name}_{i}", dict(dq.attrs), ins, [out]))
            for j, t in enumerate(user.inputs):
                if t is dq.outputs[0]:
                    user.inputs[j] = out
            n += 1
    return n


def factors_as_fp32_gemms(graph: gs.Graph, max_rank: int = FP32_FACTOR_MAX_RANK) -> int:
    """Keep skinny branch factors (rank <= ``max_rank``) out of MatMulNBits: store the INT4 codes
    transposed, DQ(codes^T) -> Transpose -> MatMul. ORT's DQ->MatMulNBits fusion needs the DQ to
    feed the MatMul directly, so it leaves this DQ alone (run once per inference on r x K values)
    and folds the Transpose into an fp32 FusedMatMul(transB). The weights stay INT4 in the file
    and dequantize to exactly the same values."""
    n = 0
    for dq in [d for d in graph.nodes if d.op == "DequantizeLinear" and d.inputs
               and isinstance(d.inputs[0], gs.Constant) and d.inputs[0].name.endswith(BRANCH_SUFFIXES)]:
        w = weight_dq(dq.outputs[0])
        users = dq.outputs[0].outputs
        if w is None or min(w.k, w.n) > max_rank or len(users) != 1 or users[0].op != "MatMul" \
                or users[0].inputs[1] is not dq.outputs[0]:
            continue
        if w.scale.size == 1:
            continue  # per-tensor: nothing to gain from a layout change
        for c in dq.inputs:  # the new initializers keep the names: checks tell factors by them
            c.name += "_replaced"
        # Blocked along axis 1 even when per channel (one block spanning K): ORT's transpose
        # optimizer pushes a Transpose through a per-axis DQ (and the DQ then fuses into
        # MatMulNBits again) but not through a blocked one.
        w.block = min(w.block, w.k)
        new = write_weight_dq(graph, weight_base(w.name), w, transposed=True)
        replace_uses(graph, dq.outputs[0], new)
        detach(dq)
        n += 1
    return n


def legalize_graph(graph: gs.Graph) -> dict:
    """In place; returns what was rewritten."""
    done = {"output_quantizer_lowered": lower_output_quantizer(graph)}
    graph.cleanup()
    done["activation_dq_lowered"] = lower_activation_dq(graph)
    graph.cleanup()
    done["weight_dq_duplicated"] = single_consumer_weights(graph)
    done["factors_as_fp32_gemms"] = factors_as_fp32_gemms(graph)
    graph.cleanup().toposort()
    return done


def legalize(model: onnx.ModelProto, allow_conversion: bool = False, report: dict = None, **_) -> onnx.ModelProto:
    from graphs.check import check_model
    from graphs.nodes import quiet
    from graphs.passes import run_passes, to_model
    from graphs.targets import ALTERNATIVES, TargetError
    with quiet():
        # no Identity hides a GEMM's consumers; shapes tell which DQs broadcast. One graph
        # throughout: each export is a copy of every weight
        graph = run_passes(gs.import_onnx(model), ["remove_redundant_qdq", "cleanup"])
        done = legalize_graph(graph)
        graph = run_passes(graph, ["cleanup"])
    out = to_model(graph, model)
    violations = check_model(out, "ort")
    if report is not None:
        report.update({"target": "ort", "rewrites": done, "violations": [asdict(v) for v in violations]})
    if violations:
        v = violations[0]
        raise TargetError(f"not deployable on ONNX Runtime as MatMulNBits: {len(violations)} violation(s), first "
                          f"{v.node}: [{v.rule}] {v.message}; {ALTERNATIVES['ort']}")
    return out


__all__ = ["legalize", "legalize_graph", "lower_activation_dq", "producer"]
