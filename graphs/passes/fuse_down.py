"""fuse_down: fuse the branch's down projection into the main GEMM.

    MatMul(x, DQ(W)), MatMul(x, DQ(A))  ->  Split(MatMul(x, DQ([W | A])), [N, r], -1)

the graph form of the kernel fusion that makes SVDQuant's branch cheap: one INT4 GEMM with
N + r output columns. It needs both MatMuls to read the very same activation tensor (run
share_act_quant first when the main path and the branch quantize x in the same format), and
both weights to be constant DQs of the same integer type and zero-point convention, blocked
along K compatibly (A is blocked like W by the writer when the branch weights are 4-bit;
per-channel scales are repeated into blocks). Exact: the same dot products, split afterwards.
When the main output is followed by Add(branch) then Add(bias), the bias moves before the Split,
padded with zeros for the branch columns, so ONNX Runtime fuses it into MatMulNBits (exact: the
branch columns get + 0, the main ones their bias, only the float summation order changes).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from graphs.passes import register_pass
from graphs.constants import MAIN_WEIGHT_SUFFIX, MATMULNBITS_BLOCK_SIZES
from graphs.nodes import detach, fusable, weight_dq
from graphs.tensors import QuantizedWeight, const_array, weight_base, write_weight_dq


def stack_columns(ws: list) -> Optional[QuantizedWeight]:
    """The column-wise concatenation of ``ws`` as one quantized weight, or None."""
    if len({w.k for w in ws}) != 1:
        return None
    if all(w.per_channel for w in ws):
        candidates = [ws[0].k]
    else:
        candidates = MATMULNBITS_BLOCK_SIZES
    for b in candidates:
        parts = [w.block_scale(b) for w in ws]
        if all(p is not None for p in parts):
            scale = np.concatenate([p[0] for p in parts], axis=1)
            zp = None if parts[0][1] is None else np.concatenate([p[1] for p in parts], axis=1)
            return QuantizedWeight(np.concatenate([w.codes for w in ws], axis=1), scale, zp, b)
    return None


def fuse_at(graph: gs.Graph, x: gs.Tensor) -> bool:
    """Fuse the weight-DQ MatMuls that read ``x``; True when something changed."""
    users = []
    for node in list(x.outputs):
        if node.op == "MatMul" and node.inputs[0] is x and node.inputs[1] is not x:
            w = weight_dq(node.inputs[1])
            if w is not None:
                users.append((node, w))
    if len(users) < 2:
        return False
    users.sort(key=lambda u: (not u[1].name.endswith(MAIN_WEIGHT_SUFFIX), -u[1].n))  # main weight first
    groups = {}
    for u in users:
        groups.setdefault((str(u[1].dtype), u[1].zero_point is None, u[1].k), []).append(u)
    changed = False
    for group in groups.values():
        ws = [w for _, w in group]
        stacked = stack_columns(ws) if len(group) > 1 and fusable(ws) else None
        if stacked is None:
            continue
        base = weight_base(ws[0].name) + "_down"
        wq = write_weight_dq(graph, base, stacked)
        y = gs.Variable(f"{base}/matmul", dtype=np.float32)
        graph.nodes.append(gs.Node("MatMul", f"{base}/MatMul", {}, [x, wq], [y]))
        outs = [mm.outputs[0] for mm, _ in group]
        sizes = gs.Constant(f"{base}.split", np.array([w.n for w in ws], np.int64))
        for mm, w in group:
            detach(mm)
            detach(w.node)
        y = _absorb_bias(graph, base, y, outs[0], sum(w.n for w in ws[1:]))
        graph.nodes.append(gs.Node("Split", f"{base}/Split", {"axis": -1}, [y, sizes], outs))
        changed = True
    return changed


def _absorb_bias(graph: gs.Graph, base: str, y: gs.Variable, main: gs.Variable, pad: int) -> gs.Variable:
    """Add(Add(main, up), bias) -> Add(main, up) with the bias added to ``y`` before the Split."""
    if len(main.outputs) != 1 or main.outputs[0].op != "Add":
        return y
    inner = main.outputs[0]
    t = inner.outputs[0]
    if len(t.outputs) != 1 or t.outputs[0].op != "Add" or any(o is t for o in graph.outputs):
        return y
    outer = t.outputs[0]
    bias = [i for i in outer.inputs if isinstance(i, gs.Constant)]
    if len(bias) != 1 or len(outer.inputs) != 2 or bias[0].shape is None or len(bias[0].shape) != 1:
        return y
    b = const_array(bias[0]).astype(np.float32)
    padded = gs.Constant(f"{base}.bias", np.concatenate([b, np.zeros(pad, np.float32)]))
    y2 = gs.Variable(f"{base}/biased", dtype=np.float32)
    graph.nodes.append(gs.Node("Add", f"{base}/AddBias", {}, [y, padded], [y2]))
    out = outer.outputs[0]
    detach(outer)
    inner.outputs[0] = out
    return y2


@register_pass("fuse_down")
def fuse_down(graph: gs.Graph) -> gs.Graph:
    for t in list(graph.tensors().values()):
        if isinstance(t, gs.Variable):
            fuse_at(graph, t)
    graph.cleanup()
    return graph
