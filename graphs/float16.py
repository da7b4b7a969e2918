"""The whole graph in float16: activations, weight and activation scales, constants, inputs and
outputs (``to_float16``), for TensorRT's strongly typed networks, where the ONNX types set the
precision: a DequantizeLinear outputs its scale's type, so an fp32 graph builds fp32 GEMMs
(NVIDIA, TensorRT developer guide, "Strongly Typed Networks"; docs/deployment.md, "TensorRT").

Values outside float16's range are clamped to +-65504 (the exporters' "minus infinity" attention
mask constant, finfo(float32).min, becomes -65504: still e^-65504 = 0 after softmax). Positive
values below float16's smallest normal (6.1e-5) that are scale floors (the dynamic activation
scale floor 1e-8) become that normal: a zero floor would divide an all-zero token by zero.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal, 6.1e-5


def _half(a: np.ndarray) -> np.ndarray:
    a = np.clip(a.astype(np.float32), -FP16_MAX, FP16_MAX)
    tiny = (a > 0) & (a < FP16_TINY) & (a.size == 1)  # a scalar floor such as Max(s, eps)'s eps
    return np.where(tiny, FP16_TINY, a).astype(np.float16)


def _convert_tensor(t: onnx.TensorProto) -> None:
    if t.data_type == TensorProto.FLOAT:
        t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(t)), t.name))


def _convert_type(vi: onnx.ValueInfoProto) -> None:
    if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float16 throughout (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        _convert_tensor(t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _convert_type(vi)
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.type == onnx.AttributeProto.TENSOR:
                _convert_tensor(a.t)
            elif a.name in ("dtype", "output_dtype") and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    return out
