"""bias_first: add the bias to the main GEMM before the branch.

    Add(Add(MatMul(x, DQ(W)), up), bias)  ->  Add(Add(MatMul(x, DQ(W)), bias), up)

so ONNX Runtime fuses the bias into the main MatMulNBits and one Add of the branch remains
(the other form of "merge the branch Add with the bias"; fold_up removes the Add altogether).
Exact up to float summation order.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphs.passes import register_pass
from graphs.nodes import producer, weight_dq


def _main_matmul(t) -> bool:
    mm = producer(t)
    return mm is not None and mm.op == "MatMul" and weight_dq(mm.inputs[1]) is not None and len(t.outputs) == 1


def swap_one(outer: gs.Node) -> bool:
    if outer.op != "Add" or len(outer.inputs) != 2:
        return False
    inner_t, bias = outer.inputs
    if isinstance(inner_t, gs.Constant):
        inner_t, bias = bias, inner_t
    inner = producer(inner_t)
    if not isinstance(bias, gs.Constant) or inner is None or inner.op != "Add" or len(inner_t.outputs) != 1:
        return False
    if bias.shape is None or len(bias.shape) != 1:
        return False
    a, b = inner.inputs
    if not _main_matmul(a):
        a, b = b, a
    if not _main_matmul(a) or isinstance(b, gs.Constant):
        return False
    inner.inputs[0], inner.inputs[1] = a, bias
    outer.inputs[0], outer.inputs[1] = inner_t, b
    return True


@register_pass("bias_first")
def bias_first(graph: gs.Graph) -> gs.Graph:
    for node in list(graph.nodes):
        swap_one(node)
    return graph
