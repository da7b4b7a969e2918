"""TensorRT legalizer (docs/deployment.md, "TensorRT"): INT4 for weights only, symmetric, constant positive
scales, per-tensor INT8 activations, block quantization for INT4 weights only, no Cast between a
weight DQ and its GEMM.

Refused unless ``allow_conversion`` (the user asked): 4-bit activations, and quantized activations
feeding an INT4-weight GEMM (TensorRT runs INT4 weight-only). The conversion drops the activation
quantizer in front of INT4-weight GEMMs (that GEMM becomes W4A16) and turns any other 4-bit
activation quantizer into an INT8 one.
Always done, and recorded in the report:
- dynamic per-token INT8 activation Q/DQ -> static per-tensor Q/DQ, the scale from a short
  data-free calibration: the graph run in ONNX Runtime on synthetic inputs defined from its input
  specs (standard normal floats, zeros for integers), amax over all of them / qmax;
- INT4 per-channel weights -> blocked by 128 or 64, TensorRT's only INT4 blocks (scales repeated,
  exact); an INT4 branch factor that no such block fits (B of a rank-32 branch: 32 rows) -> INT8
  per channel (the same codes and scales, exact), or its float32 values when its blocks have
  different scales (exact); a main INT4 weight blocked by 16 or 32 cannot be re-blocked exactly:
  check names it and legalize refuses (loraq export refuses such recipes before fitting);
- INT8 block-quantized weights (TensorRT blocks INT4 only) -> per-channel, requantized from the
  dequantized values (the report gives the largest relative change);
- a float32 Cast between a weight DQ and its GEMM is removed (a no-op on a float32 DQ).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphs.constants import (ACT_SCALE_EPS, BRANCH_SUFFIXES, CALIBRATION_BATCHES, GEMMS, INT4_TYPES,
                              TRT_INT4_BLOCK_SIZES)
from graphs.nodes import attr, detach, producer, quiet, replace_uses, weight_dq
from graphs.runtime import input_specs, ort_session, random_feed
from graphs.tensors import QuantizedWeight, const_array, constant, weight_base, write_weight_dq

DEFAULT_DIM = 64  # symbolic dims other than the first (batch = 1) in synthetic calibration inputs


def _q_bits(q: gs.Node) -> int:
    """Bits of an activation quantizer: from the qmax constant of its dynamic chain, else its type."""
    s = producer(q.inputs[1])
    div = producer(s.inputs[0]) if s is not None and s.op == "Max" else s
    if div is not None and div.op == "Div" and isinstance(div.inputs[1], gs.Constant):
        qmax = int(round(float(const_array(div.inputs[1]).reshape(-1)[0])))
        return {7: 4, 31: 6, 127: 8}.get(qmax, 8)
    dt = q.outputs[0].dtype or onnx.helper.tensor_dtype_to_np_dtype(attr(q, "output_dtype", TensorProto.INT8))
    return 4 if np.dtype(dt) in INT4_TYPES else 8


def _act_quantizers(graph: gs.Graph) -> list:
    return [n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs and not isinstance(n.inputs[0], gs.Constant)]


def _int4_gemm_input(t) -> list:
    """(GEMM node, input index) pairs where ``t`` reaches an INT4-weight GEMM's activation input,
    directly or through a Concat."""
    out = []
    for u in t.outputs:
        if u.op in GEMMS and u.inputs[0] is t:
            w = weight_dq(u.inputs[1])
            if w is not None and w.dtype in INT4_TYPES:
                out.append((u, 0))
        elif u.op == "Concat":
            if _int4_gemm_input(u.outputs[0]):
                out.append((u, list(u.inputs).index(t)))
    return out


def _dqs_of(q: gs.Node) -> list:
    return [d for d in q.outputs[0].outputs if d.op == "DequantizeLinear"]


def find_refusals(graph: gs.Graph) -> list:
    """(node name, why) for what TensorRT cannot run without a conversion."""
    out = []
    for q in _act_quantizers(graph):
        bits = _q_bits(q)
        if bits == 4:
            out.append((q.name, "4-bit activations"))
        elif any(_int4_gemm_input(d.outputs[0]) for d in _dqs_of(q)):
            out.append((q.name, f"{bits}-bit activations into an INT4-weight GEMM (INT4 is weight-only)"))
    return out


def convert_activations(graph: gs.Graph) -> list:
    """Bypass activation quantizers in front of INT4-weight GEMMs; returns what changed."""
    done = []
    for q in _act_quantizers(graph):
        x = q.inputs[0]
        for d in _dqs_of(q):
            for node, i in _int4_gemm_input(d.outputs[0]):
                node.inputs[i] = x
                done.append(f"{node.name}: activation quantizer {q.name} removed (INT4 weight-only GEMM)")
    graph.cleanup()
    return done


def synthetic_inputs(model: onnx.ModelProto, n: int = CALIBRATION_BATCHES, seed: int = 0,
                     dims: Optional[dict] = None) -> list:
    """Calibration feeds defined from the graph's input specs: N(0, 1) floats, zeros otherwise;
    symbolic dims from ``dims`` (by name), else 1 for the first dim and DEFAULT_DIM for others."""
    rng = np.random.default_rng(seed)
    specs = [(name, dt, [d if isinstance(d, int) else (dims or {}).get(d, 1 if j == 0 else DEFAULT_DIM)
                         for j, d in enumerate(shape)]) for name, dt, shape in input_specs(model)]
    return [random_feed(specs, rng) for _ in range(n)]


def calibrate(model: onnx.ModelProto, tensors: list, feeds: list) -> dict:
    """amax of each named tensor over all ``feeds`` (ONNX Runtime, CPU, reference accuracy)."""
    sess = ort_session(model, extra_outputs=tensors)
    names = [o.name for o in sess.get_outputs()]
    amax = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        res = dict(zip(names, sess.run(None, feed)))
        for t in tensors:
            amax[t] = max(amax[t], float(np.abs(res[t]).max(initial=0.0)))
    return amax


def make_static(graph: gs.Graph, amax: dict) -> dict:
    """Replace each dynamic activation quantizer by a static per-tensor INT8 one; returns scales."""
    scales = {}
    for q in _act_quantizers(graph):
        if isinstance(q.inputs[1], gs.Constant) and not attr(q, "block_size", 0):
            continue
        if any(u.op != "DequantizeLinear" for u in q.outputs[0].outputs):
            continue  # its integer output is read as such: left to check, which will name it
        x, bits = q.inputs[0], (6 if _q_bits(q) == 6 else 8)  # 4-bit ones left here become INT8
        qmax = 2 ** (bits - 1) - 1
        scale = max(amax[x.name] / qmax, ACT_SCALE_EPS)
        scales[x.name] = {"scale": scale, "amax": amax[x.name], "bits": bits}
        base = f"{q.name}_static"
        s = constant(f"{base}.scale", np.array(scale, np.float32))
        src = x
        if bits == 6:  # INT8 storage would saturate at +-127, not at the 6-bit range
            src = gs.Variable(f"{base}/clip", dtype=np.float32)
            lo, hi = constant(f"{base}.lo", np.array(-(qmax + 1) * scale, np.float32)), \
                constant(f"{base}.hi", np.array(qmax * scale, np.float32))
            graph.nodes.append(gs.Node("Clip", f"{base}/Clip", {}, [x, lo, hi], [src]))
        qv = gs.Variable(f"{base}/q", dtype=np.int8)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{base}/QuantizeLinear", {"output_dtype": TensorProto.INT8},
                                   [src, s], [qv]))
        for d in _dqs_of(q):
            out = d.outputs[0]
            detach(d)
            graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", {}, [qv, s], [out]))
        detach(q)
    graph.cleanup()
    return scales


def fix_weights(graph: gs.Graph) -> list:
    """INT4 per-channel -> blocked (exact); INT8 blocked -> per-channel (requantized); drop no-op
    Casts between a weight DQ and its GEMM."""
    done = []
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and n.inputs and isinstance(n.inputs[0], gs.Constant)]:
        for cast in [u for u in dq.outputs[0].outputs if u.op == "Cast"]:
            if cast.attrs.get("to") == TensorProto.FLOAT:
                replace_uses(graph, cast.outputs[0], dq.outputs[0])
                detach(cast)
                done.append(f"{cast.name}: float32 Cast after weight DQ {dq.name} removed")
        w = weight_dq(dq.outputs[0])
        if w is None or w.zero_point is not None:
            continue
        base = f"{weight_base(w.name)}_trt"
        legal = next((b for b in TRT_INT4_BLOCK_SIZES if w.k % b == 0), None)
        if w.dtype == np.dtype(ml_dtypes.int4) and (w.per_channel or w.block not in TRT_INT4_BLOCK_SIZES):
            if w.per_channel and legal is not None:
                scale, _ = w.block_scale(legal)
                new = write_weight_dq(graph, base, QuantizedWeight(w.codes, scale, None, legal), blocked=True)
                done.append(f"{dq.name}: INT4 per-channel weight written blocked (block {legal}, exact)")
            elif w.per_channel or w.name.endswith(BRANCH_SUFFIXES):
                new, what, as_ = _int4_factor_as_int8(graph, base, w)
                done.append(f"{dq.name}: INT4 {what}, {w.k} rows, takes no TensorRT INT4 block "
                            f"({' or '.join(map(str, TRT_INT4_BLOCK_SIZES))}): stored as {as_} (exact)")
            else:
                continue  # a main weight blocked by 16 or 32: check names it, legalize refuses
        elif w.dtype == np.int8 and not w.per_channel:
            deq = w.codes.astype(np.float32) * np.repeat(w.scale, w.block, axis=0)[: w.k]
            qmax = max(int(np.abs(w.codes).max()), 1)  # keeps a 6-bit range [-32, 31] as it was
            scale = np.maximum(np.abs(deq).max(axis=0, keepdims=True) / qmax, 1e-12).astype(np.float32)
            codes = np.clip(np.round(deq / scale), -qmax - 1, qmax).astype(np.int8)
            change = float(np.abs(codes * scale - deq).max() / max(np.abs(deq).max(), 1e-30))
            new = write_weight_dq(graph, base, QuantizedWeight(codes, scale, None, w.k))
            done.append(f"{dq.name}: INT8 blocked weight requantized per channel (max change {change:.2e} of max |w|)")
        else:
            continue
        replace_uses(graph, dq.outputs[0], new)
        detach(dq)
    graph.cleanup()
    return done


def _int4_factor_as_int8(graph: gs.Graph, base: str, w: QuantizedWeight) -> tuple:
    """(new output, what it was) for an INT4 factor TensorRT cannot block: INT8 per channel, the
    same codes and scales, when one scale spans each column (exact: int4 codes fit in int8), else
    its float32 values as a constant (exact: DequantizeLinear computes code * scale in float32)."""
    if w.per_channel or np.all(w.scale == w.scale[:1]):
        new = write_weight_dq(graph, base, QuantizedWeight(w.codes.astype(np.int8), w.scale[:1], None, w.k))
        return new, ("per-channel factor" if w.per_channel else f"factor blocked by {w.block} (equal scales)"), "INT8 per channel"
    return constant(f"{base}_float", w.dequantize()), f"factor blocked by {w.block}", "float32 values"


def legalize(model: onnx.ModelProto, allow_conversion: bool = False, report: Optional[dict] = None,
             calibration: Optional[list] = None, **_) -> onnx.ModelProto:
    from graphs.check import check_model
    from graphs.passes import apply_passes, to_model
    from graphs.targets import ALTERNATIVES, TargetError
    rep = {"target": "tensorrt", "conversions": [], "rewrites": []}
    with quiet():
        graph = gs.import_onnx(apply_passes(model, ["cleanup"]))
    refusals = find_refusals(graph)
    if refusals and not allow_conversion:
        layers = sorted({n.split("/")[0] for n, _ in refusals})
        why = sorted({w for _, w in refusals})
        raise TargetError(f"recipe not deployable on TensorRT as is: {'; '.join(why)} at {len(refusals)} quantizer(s) "
                          f"(layers {', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}); {ALTERNATIVES['tensorrt']}")
    if refusals:
        rep["conversions"] += convert_activations(graph)
    rep["rewrites"] += fix_weights(graph)
    dynamic = [q for q in _act_quantizers(graph) if not isinstance(q.inputs[1], gs.Constant) or attr(q, "block_size", 0)]
    if dynamic:
        staged = to_model(graph, model)
        feeds = calibration if calibration is not None else synthetic_inputs(staged)
        amax = calibrate(staged, sorted({q.inputs[0].name for q in dynamic}), feeds)
        with quiet():
            graph = gs.import_onnx(staged)
        scales = make_static(graph, amax)
        rep["calibration"] = {"source": "given inputs" if calibration is not None else "synthetic N(0,1) inputs",
                              "batches": len(feeds),
                              "inputs": {k: list(v.shape) for k, v in feeds[0].items()} if feeds else {},
                              "scales": scales}
    out = apply_passes(to_model(graph, model), ["cleanup"])
    violations = check_model(out, "tensorrt")
    rep["violations"] = [asdict(v) for v in violations]
    if report is not None:
        report.update(rep)
    if violations:
        v = violations[0]
        raise TargetError(f"not deployable on TensorRT: {len(violations)} violation(s), first {v.node}: [{v.rule}] "
                          f"{v.message}; {ALTERNATIVES['tensorrt']}")
    return out


__all__ = ["calibrate", "legalize", "synthetic_inputs"]
