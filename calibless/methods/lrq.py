"""LRQ, low-rank quantization (Lee et al., "LRQ: Optimizing Post-Training Quantization for Large
Language Models by Learning Low-Rank Weight-Scaling Matrices", arXiv 2407.11534; code:
github.com/onliwad101/FlexRound_LRQ), made data-free, with a quantized low-rank branch.

LRQ learns which way each weight rounds: codes = clamp(round(W / S)) with a per-element
division scale S = exp(log s1 + L U + r + c), where s1 is the stored scale (here per group of
the recipe's group size), L (in x k) starts at zero, U (k x out) Kaiming-uniform, and the
vectors r (per input channel) and c (per output channel) at zero, so training starts at round
to nearest. Only the rounding sees S; what is stored is s1 and the integer codes, so the main
path deploys as a plain INT4 grid. The rounding gets its gradient from the straight-through
estimator.

The objective. LRQ learns from block outputs on calibration data; loraq takes none. Plain
weight error cannot be the objective: for a fixed s1 it is separable per element and round to
nearest already minimises it, so L, U, r and c would have nothing to learn (a per-input-channel
importance weight keeps it separable: the same). What couples the rounding decisions is the
low-rank branch: the error that matters is what is left after the branch absorbs its best
rank-r part. So LRQ here minimises the deployed error

    || W - s1 * codes - Qb(A) Qb(B) ||_F,   codes = clamp(round((W - Qb(A) Qb(B)) / S))

jointly over s1, L, U, r, c and the branch A, B (Adam, cosine schedule). As in LoRaQ, A and B
see the codes as constants (a straight-through estimator through the main quantizer would
cancel the branch's own gradient), while the rounding parameters see the error the current
branch leaves. It starts from the alternating "quantize residual / SVD of what is left"
solution (SVDQuant-style) with a per-group clipping search for s1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calibless.methods import register_method
from calibless.methods.loraq import quantize_mse
from calibless.methods.svdquant import alternate
from calibless.quant import fake_quant_weight, round_ste
from calibless.record import Branch, LayerRecord, QTensor, down_format, relative_error, up_format


@dataclass(frozen=True)
class LrqOptions:
    init_iters: int = 4  # alternating "quantize residual / SVD" iterations of the initialisation
    steps: int = 100  # Adam steps on the rounding and the branch
    lr: float = 0.1  # learning rate of log s1, L, U, r, c; the branch's is relative to its RMS
    scale_rank_divisor: int = 8  # rank k of L U is min(in, out) // this (LRQ: 1024 for 4096-wide layers)

    def __post_init__(self):
        if self.init_iters < 1 or self.steps < 0 or self.lr <= 0 or self.scale_rank_divisor < 1:
            raise ValueError("lrq options need init_iters >= 1, steps >= 0, lr > 0, scale_rank_divisor >= 1")


def _per_element(p: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group values (K / group, N) repeated over each group's rows: (K, N)."""
    return p.repeat_interleave(k // p.shape[0], dim=0)


class _Rounding:
    """The learnable division scale S = exp(log s1 + L U + r + c) over a (K, N) weight."""

    def __init__(self, main: QTensor, rank: int, seed: int):
        k, n = main.shape
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(n)  # Kaiming-uniform as nn.Linear initialises a weight of fan-in n
        self.sign = main.scale.sign()  # signed scales (ONNX Runtime grids) keep their sign; log |s1| is learned
        self.log_s1 = main.scale.abs().log().clone()
        self.L = torch.zeros(k, rank)
        self.U = torch.empty(rank, n).uniform_(-bound, bound, generator=gen)
        self.r = torch.zeros(k, 1)
        self.c = torch.zeros(1, n)
        self.zero = None if main.zero_point is None else _per_element(main.zero_point.float(), k)
        self.fmt = main.fmt
        self.main = main

    def params(self) -> list[torch.Tensor]:
        return [self.log_s1, self.L, self.U, self.r, self.c]

    def codes(self, residual: torch.Tensor, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1 expanded to the weight's shape, codes minus the zero point) for ``residual``."""
        k = residual.shape[0]
        s1 = _per_element(self.sign * self.log_s1.exp(), k)
        q = residual / (s1 * torch.exp(self.L @ self.U + self.r + self.c))
        q = round_ste(q) if ste else torch.round(q)
        if self.zero is None:
            return s1, torch.clamp(q, self.fmt.qmin, self.fmt.qmax)
        return s1, torch.clamp(q + self.zero, self.fmt.qmin, self.fmt.qmax) - self.zero

    def stored(self, residual: torch.Tensor) -> QTensor:
        """The INT4 grid that is deployed: integer codes and s1 (and the initial zero points)."""
        with torch.no_grad():
            _, q = self.codes(residual, ste=False)
            if self.zero is not None:
                q = q + self.zero
            storage = torch.int8 if self.fmt.symmetric else torch.uint8
            return QTensor(q.to(storage).contiguous(), (self.sign * self.log_s1.exp()).detach().clone().contiguous(),
                           self.main.zero_point, self.fmt)


def _deployed(w, rounding: _Rounding, a, b, spec) -> tuple[float, LayerRecord]:
    br = Branch.from_float(a.detach(), b.detach(), spec.branch)
    rec = LayerRecord(rounding.stored(w - br.down_weight() @ br.up_weight()), spec.main, br)
    return relative_error(w, rec), rec


@register_method("lrq", options=LrqOptions, uses_branch=True)
def fit_lrq(w, spec, seed=0):
    opts = spec.options
    k, n = w.shape
    main, a, b, _ = alternate(w, spec, lambda r: quantize_mse(r, spec.main.weight)[0], opts.init_iters, seed)
    rounding = _Rounding(main, max(1, min(k, n) // opts.scale_rank_divisor), seed)
    best = _deployed(w, rounding, a, b, spec)
    if opts.steps == 0:
        return best[1]
    fa = None if spec.branch.weight is None else down_format(spec.branch, k)
    fb = None if spec.branch.weight is None else up_format(spec.branch)
    A, B = a.clone(), b.clone()
    tensors = rounding.params() + [A, B]
    for t in tensors:
        t.requires_grad_(True)
    rms = [float(t.pow(2).mean().sqrt()) or 1.0 for t in (a, b)]
    opt = torch.optim.Adam([{"params": rounding.params(), "lr": opts.lr},
                            {"params": [A], "lr": opts.lr * rms[0]}, {"params": [B], "lr": opts.lr * rms[1]}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts.steps)
    norm2 = float(w.pow(2).sum()) or 1.0
    eval_every = max(1, opts.steps // 10)
    with torch.enable_grad():
        for step in range(1, opts.steps + 1):
            ab = (A if fa is None else fake_quant_weight(A, fa)) @ (B if fb is None else fake_quant_weight(B, fb))
            s1, q = rounding.codes(w - ab.detach(), ste=True)  # the branch is a constant to the rounding
            loss = (w - s1 * q - ab).pow(2).sum() / norm2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % eval_every == 0 or step == opts.steps:
                cand = _deployed(w, rounding, A, B, spec)
                if cand[0] < best[0]:
                    best = cand
    return best[1]
