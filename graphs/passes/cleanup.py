"""remove_redundant_qdq and cleanup.

remove_redundant_qdq drops what computes nothing:
- Identity nodes (the writer ends each layer with one);
- DequantizeLinear -> QuantizeLinear with the same scale, zero point, type, axis and block:
  Q(DQ(q)) == q, so the Q's consumers read q directly (this also collapses a doubled fake-quant
  Q->DQ->Q->DQ to Q->DQ);
- duplicate fake-quant chains are merged by share_act_quant.

cleanup: drop dead nodes and tensors, sort topologically, and re-infer shapes (onnx shape
inference; skipped with a log line when the model cannot be inferred, e.g. > 2 GB protos).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphs.nodes import attr, const_key, detach, is_graph_output, log, producer, quiet, replace_uses
from graphs.passes import register_pass
from graphs.protos import export_model, weights_as_headers


def _same_input(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
        return const_key(a) == const_key(b)
    return False


def _qparams_equal(q: gs.Node, dq: gs.Node) -> bool:
    qi, di = q.inputs, dq.inputs
    if not _same_input(qi[1], di[1]):
        return False
    qz, dz = (qi[2] if len(qi) > 2 else None), (di[2] if len(di) > 2 else None)
    if (qz is None) != (dz is None) or (qz is not None and not _same_input(qz, dz)):
        return False
    if attr(q, "axis", 1) != attr(dq, "axis", 1) or attr(q, "block_size", 0) != attr(dq, "block_size", 0):
        return False
    q_type = q.outputs[0].dtype
    return q_type is None or di[0].dtype is None or q_type == di[0].dtype


def remove_identities(graph: gs.Graph) -> int:
    n = 0
    for node in list(graph.nodes):
        if node.op == "Identity" and not is_graph_output(graph, node.outputs[0]):
            replace_uses(graph, node.outputs[0], node.inputs[0])
            detach(node)
            n += 1
        elif node.op == "Identity" and isinstance(node.inputs[0], gs.Variable) and producer(node.inputs[0]) \
                and not is_graph_output(graph, node.inputs[0]) and not graph_input(graph, node.inputs[0]):
            # y = Identity(t) with y a graph output: let t's producer write y directly
            t, y = node.inputs[0], node.outputs[0]
            src = producer(t)
            replace_uses(graph, t, y)
            y.inputs.clear()
            src.outputs[src.outputs.index(t)] = y
            detach(node)
            n += 1
    return n


def graph_input(graph: gs.Graph, t) -> bool:
    return any(i is t for i in graph.inputs)


def remove_dq_q(graph: gs.Graph) -> int:
    n = 0
    for q in list(graph.nodes):
        if q.op != "QuantizeLinear" or is_graph_output(graph, q.outputs[0]):
            continue
        dq = producer(q.inputs[0])
        if dq is None or dq.op != "DequantizeLinear" or not _qparams_equal(q, dq):
            continue
        replace_uses(graph, q.outputs[0], dq.inputs[0])
        detach(q)
        n += 1
    return n


@register_pass("remove_redundant_qdq")
def remove_redundant_qdq(graph: gs.Graph) -> gs.Graph:
    removed = remove_identities(graph) + remove_dq_q(graph)
    log.debug("remove_redundant_qdq: %d nodes", removed)
    graph.cleanup()
    return graph


# Weights over this go to shape inference as a header (dims and type) without their data.
SHAPE_ONLY_BYTES = 1 << 16


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Annotate ``graph``'s tensors with ONNX shape inference. Large weights go in as headers only
    (shape inference reads their dims and type, not their data), so no copy of the weights is
    made and a model over protobuf's 2 GiB is inferred too."""
    with quiet(), weights_as_headers(graph, SHAPE_ONLY_BYTES):
        model = export_model(graph)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - shape inference is a convenience, not a requirement
        log.info("shape inference skipped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return graph
    from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
    tensors = graph.tensors()
    for info in list(model.graph.value_info) + list(model.graph.output):
        t = tensors.get(info.name)
        if isinstance(t, gs.Variable):
            t.dtype, t.shape = get_onnx_tensor_dtype(info), get_onnx_tensor_shape(info)
    return graph


@register_pass("cleanup")
def cleanup(graph: gs.Graph) -> gs.Graph:
    graph.cleanup().toposort()
    return infer_shapes(graph).cleanup().toposort()
