"""Hand the one in-memory record to the ONNX writer (numpy, no torch on the graphs side)."""
from __future__ import annotations

from typing import Optional

import torch

from calibless.formats import ActFormat
from calibless.record import QTensor, QuantizedLinear
from graphs.qdq import ActQuant, LinearQDQ, QWeight


def _np(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().cpu().numpy()


def qweight(q: QTensor) -> QWeight:
    return QWeight(_np(q.codes), _np(q.scale.float()), _np(q.zero_point), q.fmt.bits)


def act_quant(fmt: ActFormat, static: Optional[float]) -> Optional[ActQuant]:
    if not fmt.enabled:
        return None
    return ActQuant(fmt.bits, static if fmt.mode == "static_per_tensor" else None)


def _factor(f):
    return qweight(f) if isinstance(f, QTensor) else _np(f)


def linear_qdq(rec: QuantizedLinear, bias: Optional[torch.Tensor]) -> LinearQDQ:
    s = rec.act_scales
    out = LinearQDQ(weight=qweight(rec.weight), act=act_quant(rec.fmt.act, s.get("main")),
                    bias=_np(bias), smooth=_np(rec.smooth))
    if rec.branch is not None:
        b = rec.branch
        out.down, out.up = _factor(b.down), _factor(b.up)
        out.branch_in = act_quant(b.fmt.act, s.get("branch_in"))
        out.branch_mid = act_quant(b.fmt.act, s.get("branch_mid"))
    return out
