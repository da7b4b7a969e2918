"""Building ONNX tensors and onnx-graphsurgeon constants, including INT4 ones.

gs.Constant(values=<int4 array>) fails at export ("Raw data size does not match") and so does
reading .values of an INT4 constant; the working route is a TensorProto from
numpy_helper.from_array wrapped in gs LazyValues (see docs/deploy.md).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def int_dtype(bits: int, signed: bool):
    if bits == 4:
        return ml_dtypes.int4 if signed else ml_dtypes.uint4
    if bits in (6, 8):  # 6-bit codes ride in 8-bit storage
        return np.int8 if signed else np.uint8
    raise ValueError(f"no storage type for {bits}-bit values")


def constant(name: str, array: np.ndarray) -> gs.Constant:
    """A gs.Constant that exports correctly for every dtype, INT4/UINT4 included."""
    array = np.asarray(array)
    if array.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        proto = numpy_helper.from_array(array, name)
        return gs.Constant(name, gs.ir.tensor.LazyValues(proto))
    return gs.Constant(name, np.ascontiguousarray(array))
