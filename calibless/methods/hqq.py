"""HQQ, Half-Quadratic Quantization (Badri and Shaji, 2023; code: github.com/mobiusml/hqq,
Apache-2.0): data-free fitting of each group's zero point on an asymmetric grid, no branch.

This is a reimplementation of its published solver (``hqq/core/optimize.py``,
``optimize_weights_proximal_legacy``), not a copy. HQQ splits the quantization error into a
sparse part W_e and solves, per group of ``group`` weights along the input dimension,

    min_{z, W_e}  ||W_e||_p^p + beta/2 ||W_e - (W - Q^-1(Q(W)))||^2      (p = 0.7 < 1)

by alternating a proximal (generalized soft-threshold) step on W_e with the closed-form
quadratic step on the zero point, beta growing by kappa each iteration, stopping early at the
first iteration whose mean |W - W_hat| does not fall. HQQ starts from min/max scales and keeps
them fixed; its zero point is a float.

Our grid (ONNX DequantizeLinear / MatMulNBits) stores an integer zero point in [0, 15] and a
float scale, so a float zero point cannot be deployed as is. Two ways to land on the grid
(option ``zero``), measured on the 36 real MiniLM layers (mean relative weight error, group 64;
asymmetric round to nearest 0.0950, HQQ with its undeployable float zero point 0.0898):

- ``constrained`` (default): the same splitting, but the quadratic step solves for the scale
  with the zero point rounded onto the grid: 0.0919 (g32 0.0803, g128 0.1024).
- ``round_refit``: HQQ's float solution, then the zero point rounded and the scale refitted by
  least squares with the codes re-rounded: 0.0925 (g32 0.0805, g128 0.1038).

The upstream ``legacy`` solver of hqq 0.2.8 no longer multiplies beta by kappa (a 2025
refactor dropped the line); on these weights that changes nothing measurable, and we follow
the published algorithm. We also keep the best iterate, where upstream returns the one after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibless.formats import WeightFormat
from calibless.methods import register_method
from calibless.quant import choose_qparams
from calibless.record import LayerRecord, QTensor

ZERO_MODES = ("constrained", "round_refit")
REFIT_ROUNDS = 3  # least-squares scale refits after rounding the zero point (round_refit)


@dataclass(frozen=True)
class HqqOptions:
    iters: int = 20  # solver iterations at most (HQQ's default); stops at the first that does not help
    lp_norm: float = 0.7  # p of the sparsity-promoting norm on the error
    beta: float = 10.0  # initial weight of the quadratic coupling
    kappa: float = 1.01  # beta grows by this factor every iteration
    zero: str = "constrained"  # how the zero point lands on the integer grid: constrained | round_refit

    def __post_init__(self):
        if self.zero not in ZERO_MODES:
            raise ValueError(f"hqq option zero must be one of {', '.join(ZERO_MODES)}, got {self.zero!r}")
        if self.iters < 1 or not 0 < self.lp_norm <= 1 or self.beta <= 0 or self.kappa < 1:
            raise ValueError("hqq options need iters >= 1, 0 < lp_norm <= 1, beta > 0, kappa >= 1")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of |x|^p / beta (HQQ's generalized soft threshold)."""
    a = x.abs()
    return torch.sign(x) * (a - a.clamp_min(1e-30).pow(p - 1) / beta).clamp_min(0)


def _codes(blocks, scale, zero, fmt: WeightFormat):
    return torch.round(blocks / scale + zero).clamp(fmt.qmin, fmt.qmax)


def _ls_scale(target, d, scale):
    """Least-squares scale of ``target ~ scale * d`` per group (keeps the old one where undefined)."""
    dd = (d * d).sum(1, keepdim=True)
    s = (target * d).sum(1, keepdim=True) / dd.clamp_min(1e-30)
    return torch.where((dd > 0) & (s > 0) & torch.isfinite(s), s, scale)


def solve_float_zero(blocks: torch.Tensor, fmt: WeightFormat, opts: HqqOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ as published: min/max scale held fixed, float zero point solved. Returns (scale, zero)
    per group, shaped (groups, 1, N) to broadcast over ``blocks`` (groups, group, N)."""
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    span = hi - lo
    scale = torch.where(span > 1e-4, span / fmt.qmax, torch.ones_like(span))  # HQQ: a flat group gets scale 1
    zero = -lo / scale
    beta, best_err, best_zero = opts.beta, float("inf"), zero
    for _ in range(opts.iters):
        q = _codes(blocks, scale, zero, fmt)
        w_hat = (q - zero) * scale
        err = float((blocks - w_hat).abs().mean())
        if not err < best_err:
            break
        best_err, best_zero = err, zero
        w_e = shrink_lp(blocks - w_hat, beta, opts.lp_norm)
        zero = (q - (blocks - w_e) / scale).mean(1, keepdim=True)
        beta *= opts.kappa
    return scale, best_zero


def round_refit(blocks, scale, zero, fmt: WeightFormat):
    """The float zero point rounded onto the grid, then the scale refitted with codes re-rounded."""
    zero = torch.round(zero).clamp(0, fmt.qmax)
    for _ in range(REFIT_ROUNDS):
        scale = _ls_scale(blocks, _codes(blocks, scale, zero, fmt) - zero, scale)
    return scale, zero


def solve_constrained(blocks: torch.Tensor, fmt: WeightFormat, opts: HqqOptions, scale: torch.Tensor,
                      zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's splitting with the zero point kept on the integer grid; the quadratic step then also
    solves for the scale (closed form), since a rounded zero point alone barely moves. On a
    symmetric grid (zero point fixed at 0) it solves for the scale alone: our extension, HQQ
    itself is asymmetric. Starts from round to nearest's ``scale`` and ``zero``."""
    beta, best = opts.beta, (float("inf"), scale, zero)
    for _ in range(opts.iters):
        q = _codes(blocks, scale, zero, fmt)
        err = float((blocks - (q - zero) * scale).abs().mean())
        if not err < best[0]:
            break
        best = (err, scale, zero)
        target = blocks - shrink_lp(blocks - (q - zero) * scale, beta, opts.lp_norm)  # W - W_e
        if not fmt.symmetric:
            zero = torch.round((q - target / scale).mean(1, keepdim=True)).clamp(0, fmt.qmax)
        scale = _ls_scale(target, q - zero, scale)
        beta *= opts.kappa
    return best[1], best[2]


@register_method("hqq", options=HqqOptions)
def fit_hqq(w, spec, seed=0):
    fmt = spec.main.weight
    k, n = w.shape
    g = fmt.block_size(k)
    blocks = w.reshape(k // g, g, n)
    opts = spec.options
    if opts.zero == "round_refit" and not fmt.symmetric:
        scale, zero = round_refit(blocks, *solve_float_zero(blocks, fmt, opts), fmt)
    else:
        s0, z0 = choose_qparams(w, fmt)  # round to nearest's grid (absmax or min/max with 0 inside)
        zero = torch.zeros_like(s0) if z0 is None else z0
        scale, zero = solve_constrained(blocks, fmt, opts, s0.unsqueeze(1), zero.unsqueeze(1))
    codes = _codes(blocks, scale, zero, fmt).reshape(k, n)
    zp = None if fmt.symmetric else zero.squeeze(1).to(torch.uint8).contiguous()
    main = QTensor(codes.to(torch.int8 if fmt.symmetric else torch.uint8), scale.squeeze(1).float().contiguous(), zp, fmt)
    return LayerRecord(main, spec.main)
