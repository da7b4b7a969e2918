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

from graphs.protos import copy_model
from graphs.runtime import ort_session
from loraq_export.fit.parallel import default_workers

ACCURACY_LEVEL = 4
WARMUP = 3
ROUNDS = 20


def with_accuracy_level(model: onnx.ModelProto, level: int = ACCURACY_LEVEL) -> onnx.ModelProto:
    """A copy whose MatMulNBits nodes (ONNX Runtime's quantizer's output) carry ``accuracy_level``."""
    out = copy_model(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", level)])
    return out


def run_seconds(session, feed) -> float:
    """Wall time of one ONNX Runtime run (s)."""
    t = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t


def interleaved(timers: list, rounds: int = ROUNDS, warmup: int = WARMUP) -> list[list[float]]:
    """Times from each of ``timers`` (callables returning one measurement), ``warmup`` rounds
    discarded, then ``rounds`` rounds in alternating order (0, 1, .. then .., 1, 0) so that a
    drifting machine affects all alike."""
    for _ in range(warmup):
        for t in timers:
            t()
    out = [[] for _ in timers]
    order = list(range(len(timers)))
    for i in range(rounds):
        for j in (order if i % 2 == 0 else order[::-1]):
            out[j].append(timers[j]())
    return out


def percentiles(times_ms: list[float]) -> dict:
    """Median and the 90th / 99th percentiles (linear interpolation), in ms."""
    import numpy as np
    p50, p90, p99 = np.percentile(np.asarray(times_ms, np.float64), [50, 90, 99])
    return {"median_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3), "p99_ms": round(float(p99), 3)}


def compare_latency(fp_model, q_model, feed: dict, rounds: int = ROUNDS) -> dict:
    """Median latency (ms) of the FP and quantized models (paths or ModelProtos) on ``feed``."""
    threads = default_workers()
    fp = ort_session(fp_model, accuracy_level=ACCURACY_LEVEL, threads=threads, spinning=False)
    q = ort_session(q_model, accuracy_level=ACCURACY_LEVEL, threads=threads, spinning=False)
    t_fp, t_q = interleaved([lambda: run_seconds(fp, feed), lambda: run_seconds(q, feed)], rounds)
    fp_ms, q_ms = 1e3 * statistics.median(t_fp), 1e3 * statistics.median(t_q)
    return {"fp_ms": round(fp_ms, 3), "quantized_ms": round(q_ms, 3), "ratio": round(q_ms / fp_ms, 4),
            "rounds": rounds, "accuracy_level": ACCURACY_LEVEL, "threads": threads}
