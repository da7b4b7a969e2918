"""Hand the one in-memory record of a layer to the ONNX writer (numpy; graphs imports no torch)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from calibless.formats import ActFormat
from calibless.record import LayerRecord, QTensor
from graphs.qdq import ActQuant, LayerSpec
from graphs.tensors import QuantizedWeight, int_dtype


def _np(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().cpu().numpy()


def quantized_weight(q: QTensor) -> QuantizedWeight:
    """calibless' QTensor as graphs' QuantizedWeight: codes in their ONNX storage type."""
    dtype = int_dtype(q.fmt.bits, q.fmt.symmetric)
    codes = _np(q.codes).astype(dtype)
    zp = None if q.zero_point is None else _np(q.zero_point).astype(dtype)
    return QuantizedWeight(codes, _np(q.scale.float()), zp, q.codes.shape[0] // q.scale.shape[0])


def act_quant(fmt: ActFormat, width: int) -> Optional[ActQuant]:
    """The writer's quantizer for an activation ``width`` wide (the group where it splits the width)."""
    if not fmt.enabled:
        return None
    g = fmt.group_for(width)
    return ActQuant(fmt.bits, None if g == width else g)


def _factor(f):
    return quantized_weight(f) if isinstance(f, QTensor) else _np(f)


def layer_spec(rec: LayerRecord, bias: Optional[torch.Tensor]) -> LayerSpec:
    k = rec.in_features
    out = LayerSpec(weight=quantized_weight(rec.weight), act=act_quant(rec.fmt.act, k), bias=_np(rec.shifted_bias(bias)))
    if rec.branch is not None:
        b = rec.branch
        out.down, out.up = _factor(b.down), _factor(b.up)
        out.branch_in = act_quant(b.fmt.act, k)
        out.branch_mid = act_quant(b.fmt.act, b.rank)
    if rec.adapter is not None:
        a = rec.adapter
        out.adapter_down, out.adapter_up = _factor(a.down), _factor(a.up)
        out.adapter_in = act_quant(a.fmt.act, k)
        out.adapter_mid = act_quant(a.fmt.act, a.rank)
    rot = rec.rotation
    if rot is not None and rot.folded is None:  # a folded rotation is applied by the producer
        out.rotation = rot.block
        out.rotation_perm = None if rot.perm is None else rot.perm.numpy().astype(np.int32)
    return out
