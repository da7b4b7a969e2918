"""Pure quantization primitives (torch). Matrices are in (K, N) layout, blocks run along K.

These functions define the numerics of the whole product: the torch reference module, the
checkpoint and the ONNX graph all compute exactly what these compute. In particular
``fake_quant_act`` mirrors the ONNX subgraph Abs -> ReduceMax -> Div -> Max(eps) ->
QuantizeLinear -> DequantizeLinear op for op, so ONNX Runtime agrees with torch bit for bit
on the quantized activations.
"""
from __future__ import annotations

from typing import Optional

import torch

from calibless.formats import ActFormat, WeightFormat

# Floor for dynamic activation scales, so an all-zero token quantizes to zeros instead of NaN.
ACT_SCALE_EPS = 1e-8


def check_blockable(k: int, fmt: WeightFormat) -> None:
    g = fmt.block_size(k)
    if k % g:
        raise ValueError(f"input dim {k} is not divisible by group size {g}")


def _blocks(w: torch.Tensor, g: int) -> torch.Tensor:
    k, n = w.shape
    return w.reshape(k // g, g, n)


def choose_qparams(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (and zero point for asymmetric formats), shape (K / block, N).

    Symmetric grids use all 2^bits levels, [qmin, qmax] = [-8, 7] at 4 bits. With positive scales
    (TensorRT's rule, the default) the scale is the smallest that fits both extremes, max(-min / 8,
    max / 7): a block whose negative extreme dominates gets the finer step. ``fmt.signed_scales``
    (ONNX Runtime) lets the value of largest magnitude map to -8 whatever its sign: scale =
    v / -8, negative when v > 0 (what ONNX Runtime's own quantizer does).

    Differentiable in ``w`` (through the block max/min), which is what lets a fitted branch
    shrink the ranges the main quantizer must cover. An all-zero block gets scale 1 rather
    than 0, which would divide by zero.
    """
    k, _ = w.shape
    check_blockable(k, fmt)
    b = _blocks(w, fmt.block_size(k))
    levels = max(-fmt.qmin, fmt.qmax)
    if fmt.symmetric:
        if fmt.signed_scales:
            extreme = torch.gather(b, 1, b.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            scale = extreme / fmt.qmin
        else:
            scale = torch.maximum(b.amin(dim=1).clamp(max=0) / fmt.qmin, b.amax(dim=1).clamp(min=0) / fmt.qmax)
        scale = _finite_steps(scale, levels)
        return torch.where(scale != 0, scale, torch.ones_like(scale)), None
    lo = b.amin(dim=1).clamp(max=0)
    hi = b.amax(dim=1).clamp(min=0)
    scale = _finite_steps((hi - lo) / fmt.qmax, levels)
    scale = torch.where(torch.isfinite(scale), scale, hi / fmt.qmax - lo / fmt.qmax)  # hi - lo overflowed
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-lo / scale).clamp(0, fmt.qmax).detach()
    return scale, zero_point


def _finite_steps(scale: torch.Tensor, levels: int) -> torch.Tensor:
    """Scales at float32's edges: a range reaching its max would dequantize levels * scale to inf
    (shrink those by 2^-20, relative); a subnormal scale loses the precision that keeps every code
    within half a step (raise its magnitude to the smallest normal). Any other scale is left bit
    for bit."""
    scale = torch.where(torch.isinf(scale * levels), scale * (1 - 2.0 ** -20), scale)
    tiny = torch.finfo(scale.dtype).tiny
    return torch.where((scale != 0) & (scale.abs() < tiny), torch.copysign(torch.full_like(scale, tiny), scale), scale)


def _expand(p: torch.Tensor, k: int) -> torch.Tensor:
    return p.repeat_interleave(k // p.shape[0], dim=0)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt: WeightFormat) -> torch.Tensor:
    """Integer codes (int16 tensor holding fmt's range; storage dtype is the caller's choice).
    Computed on the blocked view with the (K / block, N) parameters broadcast: the same elementwise
    operations as on expanded (K, N) copies, without building them."""
    k, n = w.shape
    g = k // scale.shape[0]
    q = torch.div(_blocks(w, g), scale[:, None, :]).round_()
    if zero_point is not None:
        q = q.add_(zero_point[:, None, :])
    return q.clamp_(fmt.qmin, fmt.qmax).to(torch.int16).reshape(k, n)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    k, n = codes.shape
    q = _blocks(codes.to(scale.dtype), k // scale.shape[0])
    if zero_point is not None:
        q = q - zero_point.to(scale.dtype)[:, None, :]
    return (q * scale[:, None, :]).reshape(k, n)


class _RoundSTE(torch.autograd.Function):
    """Round with identity gradient: the straight-through estimator on the rounding alone."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def fake_quant_weight(w: torch.Tensor, fmt: WeightFormat, clip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize with the STE on rounding only; gradients reach ``w`` through the
    values and through the block scales. ``clip`` (shape of the scale, in (0, 1]) shrinks each
    block's range, a learnable clipping factor."""
    scale, zp = choose_qparams(w, fmt)
    if clip is not None:
        scale = scale * clip
    k = w.shape[0]
    s = _expand(scale, k)
    q = round_ste(w / s)
    if zp is not None:
        z = _expand(zp, k)
        q = torch.clamp(q + z, fmt.qmin, fmt.qmax) - z
    else:
        q = torch.clamp(q, fmt.qmin, fmt.qmax)
    return q * s


def act_scale(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """Dynamic scales of ``x`` viewed as rows of one group each (see ``fake_quant_act``):
    max |x| over the row / qmax, floored at ACT_SCALE_EPS."""
    scale = x.abs().amax(dim=-1, keepdim=True) / fmt.qmax
    return torch.clamp(scale, min=ACT_SCALE_EPS)


def fake_quant_act(x: torch.Tensor, fmt: ActFormat) -> torch.Tensor:
    """Symmetric activation quantize-dequantize (round half to even, as ONNX QuantizeLinear), one
    scale per token per ``fmt.group_for(width)`` channels. Computed on the view (-1, group), which
    is exactly what the graph does: Reshape(-1, group), the per-row scale, Q/DQ, Reshape back."""
    if not fmt.enabled:
        return x
    rows = x.reshape(-1, fmt.group_for(x.shape[-1]))
    s = act_scale(rows, fmt)
    return (torch.clamp(torch.round(rows / s), fmt.qmin, fmt.qmax) * s).reshape(x.shape)
