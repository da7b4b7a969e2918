"""share_act_quant: one activation quantizer where the graph computes the same one twice.

The writer gives the main path and the branch their own Q/DQ of x. When the two formats match
(same bits, same dynamic per-token recipe or the same static scale) the chains are the same
computation on the same tensor, so this pass merges them: common-subexpression elimination
over pure nodes (same op, same attributes, same inputs; constants compared by value). After it,
the main MatMul and the branch's down MatMul read one tensor, which is what fuse_down needs.
Chains of different formats differ in a constant (qmax) or an attribute (output_dtype) and are
left alone. Exact: the merged nodes computed identical values.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphs.constants import LORA_SLOT_SUFFIXES
from graphs.passes import register_pass
from graphs.nodes import const_key, detach, is_graph_output, replace_uses

IMPURE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
          "Bernoulli", "Dropout", "If", "Loop", "Scan"}


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (gs.Graph, gs.Tensor)):
        return ("object", id(v))
    if hasattr(v, "tobytes"):
        return ("array", v.tobytes())
    return v


def _input_key(t):
    if isinstance(t, gs.Constant):
        # LoRA slot initializers are replaced by name after export (graphs/lora_slots.py): equal
        # values now (all zeros in an empty slot) are not equal later, so they are never merged
        if t.name.endswith(LORA_SLOT_SUFFIXES):
            return ("slot", t.name)
        return const_key(t)
    return ("var", id(t))


def node_key(node: gs.Node):
    attrs = tuple(sorted((k, _freeze(v)) for k, v in node.attrs.items()))
    return (node.op, node.domain or "", attrs, tuple(_input_key(i) for i in node.inputs), len(node.outputs))


def eliminate_common(graph: gs.Graph) -> int:
    """Merge nodes that compute the same values; returns how many were removed."""
    graph.toposort()
    seen, removed = {}, 0
    for node in list(graph.nodes):
        if node.op in IMPURE or not node.outputs or any(is_graph_output(graph, o) for o in node.outputs):
            continue
        key = node_key(node)
        keep = seen.get(key)
        if keep is None:
            seen[key] = node
            continue
        for old, new in zip(node.outputs, keep.outputs):
            replace_uses(graph, old, new)
        detach(node)
        removed += 1
    graph.cleanup()
    return removed


@register_pass("share_act_quant")
def share_act_quant(graph: gs.Graph) -> gs.Graph:
    eliminate_common(graph)
    return graph
