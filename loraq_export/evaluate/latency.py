"""ONNX Runtime latency of a quantized model against its FP model, measured in the same run.

Interleaved rounds (FP, quantized, then quantized, FP in the next round, ...) so that a machine
whose speed drifts (other processes, frequency scaling) affects both alike; medians over the
rounds. Sessions run at ``session.qdq_matmulnbits_accuracy_level = 4``, ONNX Runtime's own
default (int8 activations inside MatMulNBits: the fast path a deployment gets), on the
machine's cores, spinning off. A MatMulNBits graph written by ONNX Runtime's quantizer takes
its accuracy level from the node attribute instead, so the bench sets that attribute to 4 too.
"""
from __future__ import annotations

import statistics
import time

import onnx

from graphs.runtime import ort_session
from loraq_export.fit.parallel import default_workers

ACCURACY_LEVEL = 4
WARMUP = 3
ROUNDS = 20


def with_accuracy_level(model: onnx.ModelProto, level: int = ACCURACY_LEVEL) -> onnx.ModelProto:
    """A copy whose MatMulNBits nodes (ONNX Runtime's quantizer's output) carry ``accuracy_level``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
    return out


def _once(session, feed) -> float:
    t = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t


def compare_latency(fp_model, q_model, feed: dict, rounds: int = ROUNDS) -> dict:
    """Median latency (ms) of the FP and quantized models (paths or ModelProtos) on ``feed``."""
    threads = default_workers()
    fp = ort_session(fp_model, accuracy_level=ACCURACY_LEVEL, threads=threads, spinning=False)
    q = ort_session(q_model, accuracy_level=ACCURACY_LEVEL, threads=threads, spinning=False)
    for _ in range(WARMUP):
        _once(fp, feed), _once(q, feed)
    t_fp, t_q = [], []
    for i in range(rounds):
        if i % 2:
            t_q.append(_once(q, feed))
            t_fp.append(_once(fp, feed))
        else:
            t_fp.append(_once(fp, feed))
            t_q.append(_once(q, feed))
    fp_ms, q_ms = 1e3 * statistics.median(t_fp), 1e3 * statistics.median(t_q)
    return {"fp_ms": round(fp_ms, 3), "quantized_ms": round(q_ms, 3), "ratio": round(q_ms / fp_ms, 4),
            "rounds": rounds, "accuracy_level": ACCURACY_LEVEL, "threads": threads}
