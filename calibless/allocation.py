"""Spending a bit budget across layers: each layer's error for each candidate format, predicted
without fitting, and the choice minimising their sum under the budget.

Predicted error of a (K, N) layer for a candidate (main grid, branch rank and format): the main
weight on the per-block clipping-searched grid (what loraq and gptq start from), its residual's
best rank-r approximation (one truncated SVD per grid gives every rank), the factors quantized in
the branch format, and what is left weighed per input channel by the channel's mean square on
the model's synthetic inputs (calibless/input_stats.py):

    err = sum_k E[x_k^2] |row k of (W - W_eff)|^2,

an estimate of the layer's output error that needs no K x K product (the cross terms of the full
covariance are left out: a 4608-wide layer would cost 20 GFLOP per candidate). Without input
statistics every channel weighs 1 (the plain weight error).

The choice: a Lagrangian sweep (each layer takes argmin err + lambda * bits, lambda bisected to
the largest allocation within the budget), then a greedy pass spending what is left on the
upgrades with the best error drop per bit. Layer errors add up to the end-to-end error well
enough for this (for MiniLM the sum of single-layer end-to-end errors was within 1% of the
all-layer error when measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from calibless.bits import layer_bits
from calibless.formats import FitSpec
from calibless.lowrank import top_r
from calibless.methods.loraq import quantize_mse
from calibless.quant import fake_quant_weight
from calibless.record import down_format, up_format


@dataclass(frozen=True)
class Cost:
    """One candidate of one layer: its stored bits and predicted error."""

    bits: int
    error: float


def predicted_errors(w: torch.Tensor, specs: Sequence[FitSpec], channel_weight: Optional[torch.Tensor] = None,
                     seed: int = 0) -> list[float]:
    """The predicted error of ``w`` (in, out) under each spec (see the module docstring)."""
    w = w.detach().float()
    cw = torch.ones(w.shape[0]) if channel_weight is None else channel_weight.float().clamp_min(0)

    cw64 = cw.double()

    residuals, factors, plain = {}, {}, {}
    max_rank = max((s.rank for s in specs if s.branch is not None), default=0)
    out = []
    for s in specs:
        fmt = s.main.weight
        if fmt not in residuals:
            main, _ = quantize_mse(w, fmt)
            r = w - main.dequantize()
            r64 = r.double()
            # sum_k cw_k sum_n r_kn^2 in float64, as row sums: one layer-sized float64 pass fewer
            # than (cw * r^2).sum()
            plain[fmt] = float(cw64 @ torch.linalg.vecdot(r64, r64, dim=1))
            residuals[fmt] = r64 if max_rank else None  # the branch candidates' sums read it
            factors[fmt] = top_r(r * cw.sqrt()[:, None], max_rank, seed) if max_rank else None
        if s.branch is None or s.rank == 0:
            out.append(plain[fmt])
            continue
        # the SVD of the channel-weighted residual is the best rank-r fit in this error's metric
        a, b = factors[fmt]
        a = a[:, :s.rank] / cw.sqrt().clamp_min(1e-12)[:, None]
        b = b[:s.rank]
        if s.branch.weight is not None:
            a = fake_quant_weight(a, down_format(s.branch, w.shape[0]))
            b = fake_quant_weight(b, up_format(s.branch))
        else:
            a, b = a.half().float(), b.half().float()
        out.append(_weighted_after_branch(residuals[fmt], plain[fmt], a.double(), b.double(), cw64))
    return out


def _weighted_after_branch(r: torch.Tensor, plain: float, a: torch.Tensor, b: torch.Tensor,
                           cw: torch.Tensor) -> float:
    """sum_k cw_k |row k of (r - a b)|^2 from ``plain`` (the same sum for r alone) without forming
    r - a b: plain - 2 sum_k cw_k a_k . (r b^T)_k + tr(a^T diag(cw) a b b^T). All float64; the
    (K, N) products of the direct form were most of the allocation's prediction time, this costs
    one (K, N, rank) product. ``r``, ``a``, ``b``, ``cw`` are float64."""
    ca = a * cw[:, None]
    cross = float(torch.linalg.vecdot(ca, r @ b.T, dim=1).sum())
    quad = float(((a.T @ ca) * (b @ b.T)).sum())
    return max(plain - 2 * cross + quad, 0.0)


def candidate_bits(k: int, n: int, specs: Sequence[FitSpec], with_branch: bool, permuted: bool = False) -> list[int]:
    return [layer_bits(k, n, s, with_branch, permuted) for s in specs]


def choose(costs: dict[str, list[Cost]], budget_bits: float) -> dict[str, int]:
    """Each layer's candidate index minimising the summed error with total bits <= ``budget_bits``;
    ValueError when even the cheapest candidates exceed it."""
    layers = list(costs)
    cheapest = sum(min(c.bits for c in costs[n]) for n in layers)
    if cheapest > budget_bits:
        raise ValueError(f"the cheapest allocation needs {cheapest} bits, the budget is {budget_bits:.0f}")

    def pick(lam: float) -> tuple[dict[str, int], int]:
        choice = {n: min(range(len(costs[n])), key=lambda i: (costs[n][i].error + lam * costs[n][i].bits,
                                                              costs[n][i].bits)) for n in layers}
        return choice, sum(costs[n][choice[n]].bits for n in layers)

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget_bits:  # ends: a large enough lambda picks the cheapest, which fits
        lo, hi = hi, hi * 16
    choice, used = pick(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        c, u = pick(mid)
        if u > budget_bits:
            lo = mid
        else:
            hi, choice, used = mid, c, u
    while True:  # spend what is left: best error drop per extra bit that still fits
        best = None
        for n in layers:
            cur = costs[n][choice[n]]
            for i, c in enumerate(costs[n]):
                extra, gain = c.bits - cur.bits, cur.error - c.error
                if extra > 0 and gain > 0 and used + extra <= budget_bits and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, i, extra)
        if best is None:
            return choice
        _, n, i, extra = best
        choice[n] = i
        used += extra
