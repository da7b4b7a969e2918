"""fold_up: fold the branch's up projection into the main GEMM.

    Add(MatMul(x, DQ(W)), MatMul(h, DQ(B)))  ->  MatMul(Concat([x, h], -1), DQ([W ; B]))

One INT4 GEMM over K + r rows instead of two GEMMs and an Add; x and h need not share a format
(the main input may be float while h is the branch's INT8 Q/DQ). The bias Add that follows is
then absorbed by ONNX Runtime into MatMulNBits. Conditions: both weights are constant DQs of the
same integer type and zero-point convention, each feeding only its MatMul, each MatMul feeding
only the Add, the same N, and one block size b (a power of two, 16..256) such that every block
of b rows of [W ; B] lies inside one block of W or of B (W's block is a multiple of b and K is
a multiple of b; a per-channel B takes any b). Per-channel scales are repeated into blocks,
so the fused DQ computes exactly the same weight values. K + r is padded to a multiple of 64
(see PAD_K_TO).

Where it pays (measured in ONNX Runtime, tools/bench_fusion.py --forms): the rest of the branch
is a separate GEMM over x (the down projection) plus a Concat of M x (K + r), both growing with
K, whereas fuse_down's leftovers (the up GEMM, Split, Add) grow with N. So fold_up takes the
layers with K <= N (attention, MLP up), and leaves K > N (MLP down) to fuse_down, unless
fuse_down cannot take it (the main path and the branch read differently quantized inputs).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from graphs.passes import register_pass
from graphs.constants import MATMULNBITS_BLOCK_SIZES
from graphs.nodes import detach, fusable, producer, weight_dq
from graphs.tensors import QuantizedWeight, weight_base, write_weight_dq

# ORT 1.32's MatMulNBits is ~15% slower when K is not a multiple of 64 (measured: K = 1184 vs
# 1152 and 1216, N = 4608): the fused K is padded up with rows that dequantize to 0, fed with
# copies of h's columns (exact: they meet zero weights).
PAD_K_TO = 64


def stack_rows(ws: list) -> Optional[QuantizedWeight]:
    """The row-wise concatenation of ``ws`` as one quantized weight, or None."""
    for b in MATMULNBITS_BLOCK_SIZES:
        offsets = np.cumsum([0] + [w.k for w in ws[:-1]])
        parts = [w.block_scale(b, int(o)) for w, o in zip(ws, offsets)]
        if all(p is not None for p in parts):
            scale = np.concatenate([p[0] for p in parts], axis=0)
            zp = None if parts[0][1] is None else np.concatenate([p[1] for p in parts], axis=0)
            return QuantizedWeight(np.concatenate([w.codes for w in ws], axis=0), scale, zp, b)
    return None


def pad_rows(w: QuantizedWeight, pad: int) -> QuantizedWeight:
    """``pad`` more rows that dequantize to exactly 0 (code = zero point), in the last block or
    in new blocks with the last block's scale."""
    if not pad:
        return w
    codes, scale, zp, block = w.codes, w.scale, w.zero_point, w.block
    k = codes.shape[0] + pad
    rows = -(-k // block)
    scale = np.concatenate([scale, np.repeat(scale[-1:], rows - scale.shape[0], axis=0)], axis=0)
    if zp is not None:
        zp = np.concatenate([zp, np.repeat(zp[-1:], rows - zp.shape[0], axis=0)], axis=0)
        fill = zp[np.arange(codes.shape[0], k) // block]
    else:
        fill = np.zeros((pad, codes.shape[1]), codes.dtype)
    return QuantizedWeight(np.concatenate([codes, fill.astype(codes.dtype)], axis=0), scale, zp, block)


def _repeat_columns(graph: gs.Graph, base: str, h, width: int, pad: int) -> list:
    """``pad`` columns for the zero rows: copies of h's own columns, so that a kernel quantizing its
    input per block (MatMulNBits, accuracy_level 4) sees the same block maximum as without them."""
    out = [h] * (pad // width)
    if pad % width:
        part = gs.Variable(f"{base}/pad_columns", dtype=np.float32)
        consts = [gs.Constant(f"{base}.pad_{n}", np.array([v], np.int64))
                  for n, v in (("start", 0), ("end", pad % width), ("axis", -1))]
        graph.nodes.append(gs.Node("Slice", f"{base}/PadSlice", {}, [h] + consts, [part]))
        out.append(part)
    return out


def _branch_matmul(t) -> Optional[tuple]:
    """(MatMul node, its weight DQ) when ``t`` is a MatMul output read only once."""
    mm = producer(t)
    if mm is None or mm.op != "MatMul" or len(t.outputs) != 1:
        return None
    w = weight_dq(mm.inputs[1])
    return None if w is None else (mm, w)


def _same_lead(a, b) -> bool:
    """The two activations differ at most in their last dim (when shapes are known)."""
    if a.shape is None or b.shape is None:
        return True
    return len(a.shape) == len(b.shape) and list(a.shape[:-1]) == list(b.shape[:-1])


def down_fusable(x) -> bool:
    """fuse_down could take this layer: two weight-DQ MatMuls read ``x`` itself."""
    ws = [weight_dq(u.inputs[1]) for u in x.outputs if u.op == "MatMul" and u.inputs[0] is x]
    ws = [w for w in ws if w is not None]
    return len(ws) >= 2 and fusable(ws[:2]) and ws[0].k == ws[1].k


def fold_one(graph: gs.Graph, add: gs.Node, max_k_over_n: Optional[float] = 1.0) -> bool:
    if add.op != "Add" or len(add.inputs) != 2 or not all(isinstance(i, gs.Variable) for i in add.inputs):
        return False
    found = [_branch_matmul(t) for t in add.inputs]
    if any(f is None for f in found):
        return False
    (m0, w0), (m1, w1) = found
    if m0 is m1 or w0.n != w1.n or not fusable([w0, w1]) or not _same_lead(m0.inputs[0], m1.inputs[0]):
        return False
    if w1.k > w0.k:  # main weight first: its blocks then start at row 0
        (m0, w0), (m1, w1) = (m1, w1), (m0, w0)
    if max_k_over_n is not None and w0.k > max_k_over_n * w0.n and down_fusable(m0.inputs[0]):
        return False  # fuse_down is cheaper here
    stacked = stack_rows([w0, w1])
    if stacked is None:
        return False
    base = weight_base(w0.name) + "_up"
    pad = -stacked.k % max(stacked.block, PAD_K_TO)
    wq = write_weight_dq(graph, base, pad_rows(stacked, pad))
    cat = gs.Variable(f"{base}/concat", dtype=np.float32)
    pieces = [m0.inputs[0], m1.inputs[0]] + _repeat_columns(graph, base, m1.inputs[0], w1.k, pad)
    graph.nodes.append(gs.Node("Concat", f"{base}/Concat", {"axis": -1}, pieces, [cat]))
    out = add.outputs[0]
    for n in (add, m0, m1, w0.node, w1.node):
        detach(n)
    graph.nodes.append(gs.Node("MatMul", f"{base}/MatMul", {}, [cat, wq], [out]))
    return True


@register_pass("fold_up")
def fold_up(graph: gs.Graph, max_k_over_n: Optional[float] = 1.0) -> gs.Graph:
    """Fold every layer it can take; ``max_k_over_n`` None: K > N layers too (for comparisons)."""
    for node in list(graph.nodes):
        fold_one(graph, node, max_k_over_n)
    graph.cleanup()
    return graph
