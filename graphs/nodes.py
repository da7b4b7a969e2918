"""Small onnx-graphsurgeon helpers every graphs module uses: walking edges, editing nodes."""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from graphs.tensors import QuantizedWeight, const_array, read_weight_dq

log = logging.getLogger("graphs")


@contextlib.contextmanager
def quiet():
    """Silence onnx-graphsurgeon's warnings ("colored" missing, duplicate constant names)."""
    logger = gs.logger.G_LOGGER
    old, logger.severity = logger.severity, logger.ERROR
    try:
        yield
    finally:
        logger.severity = old


def producer(t) -> Optional[gs.Node]:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def is_graph_output(graph: gs.Graph, t) -> bool:
    return any(o is t for o in graph.outputs)


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of ``old`` at ``new`` (graph outputs excepted)."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new


def detach(node: gs.Node) -> None:
    """Disconnect ``node``; graph.cleanup() then drops it."""
    node.inputs.clear()
    node.outputs.clear()


def weight_dq(t) -> Optional[QuantizedWeight]:
    """The quantized weight whose DequantizeLinear produces ``t`` (see tensors.read_weight_dq)."""
    return read_weight_dq(producer(t))


def const_key(c: gs.Constant, max_bytes: int = 1 << 16):
    """A hashable identity for a constant: its value when small, else its name."""
    shape = tuple(c.shape) if c.shape is not None else None
    if shape is not None and int(np.prod(shape, dtype=np.int64)) * 4 > max_bytes:
        return ("name", c.name)
    a = const_array(c)
    return ("value", str(a.dtype), a.shape, a.tobytes())


def fusable(ws: list) -> bool:
    """Weights that can share one DQ: same code type, same zero-point convention, and each DQ
    read by one node only (the fused DQ replaces them)."""
    return (len({w.dtype for w in ws}) == 1 and len({w.zero_point is None for w in ws}) == 1
            and all(w.node.outputs[0].outputs and len(w.node.outputs[0].outputs) == 1 for w in ws))
