"""Helpers shared by the graph passes: reading constants (INT4 included), weight DequantizeLinear
nodes normalised to one blocked layout, and writing fused weight DQs.

A weight DQ is a DequantizeLinear whose data input is a constant rank-2 (K, N) tensor. It is
normalised to ``scale`` of shape (ceil(K / block), N) with ``block`` rows per scale (per-channel
axis=1 and per-tensor scales become one block spanning K), which is the layout the fused
weights are written in (axis 0, blocks along the reduction dim: what MatMulNBits and TensorRT's
block DQ take).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from graphs.onnx_tensors import constant

log = logging.getLogger("graphs.passes")

INT4_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))
BLOCK_SIZES = (256, 128, 64, 32, 16)  # what MatMulNBits takes: power of two, 16..256
BRANCH_SUFFIXES = (".down_q", ".up_q")  # the writer's names for the branch factors' codes


@contextlib.contextmanager
def quiet():
    """Silence onnx-graphsurgeon's warnings ("colored" missing, duplicate constant names)."""
    logger = gs.logger.G_LOGGER
    old, logger.severity = logger.severity, logger.ERROR
    try:
        yield
    finally:
        logger.severity = old


def const_array(c: gs.Constant) -> np.ndarray:
    """The values of a constant; works for imported INT4 constants (whose .values fails)."""
    v = c._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        return numpy_helper.to_array(v.tensor)
    return np.asarray(v)


def const_dtype(c: gs.Constant) -> np.dtype:
    v = c._values
    if not isinstance(v, gs.ir.tensor.LazyValues):
        return np.asarray(v).dtype
    if isinstance(v.dtype, (int, np.integer)):  # gs keeps the ONNX enum for types numpy lacks (bfloat16)
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(v.dtype)))
    return np.dtype(v.dtype)


def const_key(c: gs.Constant, max_bytes: int = 1 << 16):
    """A hashable identity for a constant: its value when small, else its name."""
    shape = tuple(c.shape) if c.shape is not None else None
    if shape is not None and int(np.prod(shape, dtype=np.int64)) * 4 > max_bytes:
        return ("name", c.name)
    a = const_array(c)
    return ("value", str(a.dtype), a.shape, a.tobytes())


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


@dataclass
class WeightDQ:
    node: gs.Node
    name: str  # the codes initializer's name
    codes: np.ndarray  # (K, N), ml_dtypes.int4 / uint4 / int8 / uint8
    scale: np.ndarray  # (ceil(K / block), N) float32
    zero_point: Optional[np.ndarray]  # like scale, codes' dtype
    block: int  # rows per scale; == K for per-channel / per-tensor

    @property
    def k(self) -> int:
        return self.codes.shape[0]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.codes.dtype

    @property
    def per_channel(self) -> bool:
        return self.block >= self.k

    def block_scale(self, b: int, offset: int = 0) -> Optional[tuple]:
        """(scale, zero_point) re-expressed in blocks of ``b`` rows, the first starting at
        ``offset`` in a larger fused matrix; None when a new block would straddle two old ones."""
        if offset % b:
            return None
        if not self.per_channel and self.block % b:
            return None
        rows = np.arange(0, self.k, b) // self.block  # old block of each new block's first row
        zp = None if self.zero_point is None else self.zero_point[rows]
        return self.scale[rows], zp


def weight_dq(t) -> Optional[WeightDQ]:
    """The weight DQ producing ``t`` (a constant (K, N) integer tensor), normalised; else None."""
    node = producer(t)
    if node is None or node.op != "DequantizeLinear":
        return None
    data = node.inputs[0]
    if not isinstance(data, gs.Constant) or data.shape is None or len(data.shape) != 2:
        return None
    if not all(isinstance(i, gs.Constant) for i in node.inputs[1:]):
        return None
    codes = const_array(data)
    k, n = codes.shape
    scale = const_array(node.inputs[1]).astype(np.float32)
    zp = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    block_size = attr(node, "block_size", 0)
    axis = attr(node, "axis", 1)
    if block_size:
        if axis not in (0, -2) or scale.ndim != 2 or scale.shape != (-(-k // block_size), n):
            return None
        block = block_size
    elif scale.ndim == 0 or scale.size == 1:
        scale, block = np.full((1, n), scale.reshape(()), np.float32), k
        zp = None if zp is None else np.full((1, n), zp.reshape(()), zp.dtype)
    elif scale.ndim == 1 and axis in (1, -1) and scale.shape[0] == n:
        scale, block = scale.reshape(1, n), k
        zp = None if zp is None else zp.reshape(1, n)
    else:
        return None
    return WeightDQ(node, data.name, codes, scale, zp, block)


def fusable(ws: list) -> bool:
    """Same code type and the same zero-point convention: can share one DQ."""
    return (len({w.dtype for w in ws}) == 1 and len({w.zero_point is None for w in ws}) == 1
            and all(w.node.outputs[0].outputs and len(w.node.outputs[0].outputs) == 1 for w in ws))


def write_weight_dq(graph: gs.Graph, base: str, codes: np.ndarray, scale: np.ndarray,
                    zero_point: Optional[np.ndarray], block: int, blocked: bool = False,
                    transposed: bool = False) -> gs.Variable:
    """Constant codes -> DequantizeLinear (axis 0, blocks of ``block`` rows, or per-channel axis 1
    when one block spans K, unless ``blocked``); returns the float (K, N) output. Initializers are
    named ``{base}_q``, ``{base}_scale``. ``transposed``: store codes^T (N, K), always blocked along
    axis 1, then Transpose back (the same values; see graphs/targets/ort.py for why)."""
    k, n = codes.shape
    if transposed:
        attrs = {"axis": 1, "block_size": int(block)}
        codes, scale = codes.T, scale.T
        zero_point = None if zero_point is None else zero_point.T
    elif scale.shape[0] == 1 and block >= k and not blocked:
        attrs, scale = {"axis": 1}, scale[0]
        zero_point = None if zero_point is None else zero_point[0]
    else:
        attrs = {"axis": 0, "block_size": int(block)}
    inputs = [constant(f"{base}_q", np.ascontiguousarray(codes)),
              constant(f"{base}_scale", np.ascontiguousarray(scale, np.float32))]
    if zero_point is not None:
        inputs.append(constant(f"{base}_zero_point", np.ascontiguousarray(zero_point.astype(codes.dtype))))
    out = gs.Variable(f"{base}_dq", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", attrs, inputs, [out]))
    if transposed:
        dq_t, out = out, gs.Variable(f"{base}_dq_t", dtype=np.float32)
        graph.nodes.append(gs.Node("Transpose", f"{base}/Transpose", {"perm": [1, 0]}, [dq_t], [out]))
    return out


def weight_base(name: str) -> str:
    """'l0.weight_q' -> 'l0.weight': the stem of a codes initializer's name."""
    return name[:-2] if name.endswith("_q") else name


def layer_of(name: str) -> str:
    """'l0.weight_q' -> 'l0' (the writer names initializers '{layer}.{what}')."""
    return name.rsplit(".", 1)[0] if "." in name else name


def detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()
