"""ONNX tensors and the one numpy class of a quantized (K, N) matrix, read from and written to graphs.

``QuantizedWeight`` is the graphs-side twin of calibless' ``QTensor`` (graphs imports no torch):
codes in their ONNX storage type (ml_dtypes int4/uint4, int8/uint8; 6-bit values ride in int8),
scales (ceil(K / block), N), zero points like the scales (asymmetric only), ``block`` rows per
scale (== K for one scale per output channel). The layer writer (graphs.qdq), the fusion passes
and the target legalizers all read and write weights through it.

INT4 constants: gs.Constant(values=<int4 array>) fails at export ("Raw data size does not match")
and so does reading .values of an imported INT4 constant; the working route is a TensorProto from
numpy_helper.from_array wrapped in gs LazyValues (docs/deployment.md, "onnx-graphsurgeon").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper


def int_dtype(bits: int, signed: bool):
    """The ONNX storage type of ``bits``-bit codes (6-bit codes ride in 8-bit storage)."""
    if bits == 4:
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    if bits in (6, 8):
        return np.int8 if signed else np.uint8
    raise ValueError(f"no storage type for {bits}-bit values")


def constant(name: str, array: np.ndarray) -> gs.Constant:
    """A gs.Constant that exports correctly for every dtype, INT4/UINT4 included."""
    array = np.asarray(array)
    if array.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        proto = numpy_helper.from_array(array, name)
        return gs.Constant(name, gs.ir.tensor.LazyValues(proto))
    return gs.Constant(name, np.ascontiguousarray(array))


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


@dataclass
class QuantizedWeight:
    codes: np.ndarray  # (K, N) in the storage type
    scale: np.ndarray  # (ceil(K / block), N) float32
    zero_point: Optional[np.ndarray]  # like scale, codes' dtype; None when symmetric
    block: int  # rows per scale; == K for per-channel
    name: str = ""  # the codes initializer's name, when read from a graph
    node: Optional[gs.Node] = None  # the DequantizeLinear it was read from

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

    def dequantize(self) -> np.ndarray:
        q = self.codes.astype(np.float32)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point.astype(np.float32), self.block, axis=0)[: self.k]
        return q * np.repeat(self.scale, self.block, axis=0)[: self.k]


def read_weight_dq(node: gs.Node) -> Optional[QuantizedWeight]:
    """The weight a DequantizeLinear of a constant (K, N) integer tensor computes, normalised to
    blocks along K (per-channel axis=1 and per-tensor scales become one block spanning K); None
    for anything else."""
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
    block_size = node.attrs.get("block_size", 0)
    axis = node.attrs.get("axis", 1)
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
    return QuantizedWeight(codes, scale, zp, block, data.name, node)


def dq_layout(w: QuantizedWeight, blocked: bool = False, transposed: bool = False) -> tuple:
    """(codes, scale, zero_point, attrs) of the DequantizeLinear that computes ``w``: blocks of
    ``w.block`` rows along axis 0, or per-channel along axis 1 when one block spans K (unless
    ``blocked``); ``transposed`` stores codes^T (N, K) blocked along axis 1 (then a Transpose
    gives the (K, N) values back)."""
    codes, scale, zp = w.codes, w.scale, w.zero_point
    if transposed:
        return codes.T, scale.T, None if zp is None else zp.T, {"axis": 1, "block_size": int(w.block)}
    if w.per_channel and scale.shape[0] == 1 and not blocked:
        return codes, scale[0], None if zp is None else zp[0], {"axis": 1}
    return codes, scale, zp, {"axis": 0, "block_size": int(w.block)}


def write_weight_dq(graph: gs.Graph, base: str, w: QuantizedWeight, blocked: bool = False,
                    transposed: bool = False) -> gs.Variable:
    """Constant codes -> DequantizeLinear (see ``dq_layout``); returns the float (K, N) output.
    Initializers are named ``{base}_q``, ``{base}_scale``, ``{base}_zero_point``."""
    codes, scale, zp, attrs = dq_layout(w, blocked, transposed)
    inputs = [constant(f"{base}_q", np.ascontiguousarray(codes)),
              constant(f"{base}_scale", np.ascontiguousarray(scale, np.float32))]
    if zp is not None:
        inputs.append(constant(f"{base}_zero_point", np.ascontiguousarray(zp.astype(codes.dtype))))
    out = gs.Variable(f"{base}_dq", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", attrs, inputs, [out]))
    if transposed:
        dq_t, out = out, gs.Variable(f"{base}_dq_t", dtype=np.float32)
        graph.nodes.append(gs.Node("Transpose", f"{base}/Transpose", {"perm": [1, 0]}, [dq_t], [out]))
    return out


def weight_base(name: str) -> str:
    """'l0.weight_q' -> 'l0.weight': the stem of a codes initializer's name."""
    return name[:-2] if name.endswith("_q") else name
