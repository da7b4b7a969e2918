"""LoRaQ: data-free gradient-descent fit of a quantized low-rank branch that compensates the
W4 main layer's quantization error (arXiv 2604.18117; the paper's exact loss is not public,
this objective and schedule are ours).

Objective: the relative Frobenius error of what is deployed,
    || W - s * clamp(round((W - A B) / s)) - Qb(A) Qb(B) ||_F / ||W||_F,
over the branch factors A, B and the main per-block scales s.

Why not a straight-through estimator over the whole main quantizer: then Q(W - AB) ~ W - AB
and the two AB terms cancel, so A and B get no gradient (docs/methods.md, "LoRaQ"). Here the
codes are re-rounded from the current residual at every step and treated as constants in the
backward pass, which is the true derivative of the piecewise-constant rounding almost
everywhere: A and B then descend on the error that the current codes leave, s descends like a
least-squares scale (LSQ), and the re-rounding lets codes, scales and branch move together,
which the alternating SVD loop cannot do. The branch's own quantizers use the STE on rounding.

Initialisation: the alternating "quantize residual / SVD of what is left" loop, with each
block's scale chosen by a clipping search minimising that block's squared error (an absmax
scale wastes grid levels on one outlier).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calibless.formats import WeightFormat
from calibless.methods import register_method
from calibless.methods.svdquant import alternate
from calibless.quant import choose_qparams, fake_quant_weight
from calibless.record import Branch, LayerRecord, QTensor, down_format, up_format



@dataclass(frozen=True)
class LoraqOptions:
    init_iters: int = 4  # alternating "quantize residual / SVD" iterations of the initialisation
    steps: int = 80  # gradient steps after it (0: the alternating solution with clipping search)
    lr: float = 0.1  # Adam learning rate, relative to each parameter's RMS
    # with the layer's input statistics (commands gather them from the model's synthetic inputs):
    # round the main path by GPTQ against them once the branch is fitted, and shift the bias
    input_stats: bool = True


# 0.1 apart: a 0.05 grid and zero points searched one step either side (27 candidates per block
# instead of 5) cost 2-3x the initialisation's time and measured no better end to end
# (docs/methods.md "Fitting time")
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)
NEIGHBOURS = (0.97, 1.0, 1.03)  # later alternating iterations search around each block's last ratio


def code_range(fmt: WeightFormat, zero_point):
    """Bounds for the codes ``round(x / s)`` before the zero point is added: clamping to them is
    clamp(c + z, qmin, qmax) - z in one pass, the same numbers (codes are integer-valued floats)."""
    if zero_point is None:
        return fmt.qmin, fmt.qmax
    return fmt.qmin - zero_point[:, None, :], fmt.qmax - zero_point[:, None, :]


def quantize_mse(r: torch.Tensor, fmt: WeightFormat, ratios=CLIP_RATIOS) -> tuple[QTensor, torch.Tensor]:
    """Per-block clipping search over ``ratios`` (floats, or tensors shaped like the scales; an
    asymmetric grid keeps its min/max zero point), then a least-squares refit of each block's
    scale. Returns the quantized tensor and each block's chosen ratio to its min/max scale."""
    base, zp = choose_qparams(r, fmt)
    k, n = r.shape
    blocks = r.reshape(base.shape[0], -1, n)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()

    lo, hi = code_range(fmt, zp)

    def block_err(s):
        q = torch.div(blocks, s[:, None, :]).round_().clamp_(lo, hi)
        return torch.mul(q, s[:, None, :]).sub_(blocks).square_().sum(1), q

    for c in ratios:
        cand = base * torch.clamp(torch.as_tensor(c, dtype=base.dtype), max=1.0)
        err, _ = block_err(cand)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    _, q = block_err(best)
    qq = (q * q).sum(1)
    ls = torch.where(qq > 0, (q * blocks).sum(1) / qq.clamp_min(1e-30), best)
    ls = torch.where(ls * best > 0, ls, best)  # keep each block's sign (scales may be negative)
    err_ls, _ = block_err(ls)
    best = torch.where(err_ls < best_err, ls, best)
    return QTensor.from_float(r, fmt, scale=best, zero_point=zp), best / base


class _ClipSearch:
    """The residual quantizer of the alternating initialisation: a full clipping search on the
    first call, then only around each block's previous ratio (the residual changes little)."""

    def __init__(self, fmt: WeightFormat):
        self.fmt = fmt
        self.ratio = None

    def __call__(self, r: torch.Tensor) -> QTensor:
        ratios = CLIP_RATIOS if self.ratio is None else [self.ratio * f for f in NEIGHBOURS]
        q, self.ratio = quantize_mse(r, self.fmt, ratios)
        return q


def _branch_formats(spec, k: int):
    w = spec.branch.weight
    if w is None:
        return None, None
    return down_format(spec.branch, k), up_format(spec.branch)


def _deployed(w, s, a, b, spec, z=None):
    """What is stored: the branch quantized in its format, the main codes rounded from the
    residual the quantized branch leaves (so the main path also absorbs the branch's error)."""
    br = Branch.from_float(a, b, spec.branch)
    main = QTensor.from_float(w - br.down_weight() @ br.up_weight(), spec.main.weight, scale=s, zero_point=z)
    err = float(torch.linalg.norm(w - main.dequantize() - br.down_weight() @ br.up_weight()))
    return err, main, br


def refine(w, main: QTensor, a, b, spec, steps: int, lr: float):
    """Adam on (A, B, log s) from the alternating solution; returns the best deployed iterate.

    The gradient is written out rather than taken by autograd (the step is a handful of
    matrix products over the layer, and this halves its cost): with E the error matrix and the
    codes held constant, dL/d(AqBq) = -2E (the straight-through estimator carries it to A and B
    through their own quantizers) and dL/ds = -2 sum_block(E * codes).

    The error each step computes is the deployed error of the current iterate: the branch
    fake-quantized exactly as ``Branch.from_float`` stores it and the main codes rounded from
    what it leaves, as ``_deployed`` does. So the best iterate is picked from the step's own
    ||E|| (one reduction) and the layer is rounded and stored once, at the end, instead of at
    every checkpoint (that was 10-17% of a large layer's fit).
    """
    fmt = spec.main.weight
    fa, fb = _branch_formats(spec, w.shape[0])
    k = w.shape[0]
    g = fmt.block_size(k)
    z = None if main.zero_point is None else main.zero_point.float()  # asymmetric grids: zero points held
    lo, hi = code_range(fmt, z)
    sign = main.scale.sign()  # signed scales keep their sign; Adam moves log |s|
    params = [a.clone(), b.clone(), main.scale.abs().log().clone()]
    rms_a = float(a.pow(2).mean().sqrt()) or 1.0
    rms_b = float(b.pow(2).mean().sqrt()) or 1.0
    # Cosine decay: large early steps let codes re-round and escape the alternating fixed
    # point; the small late steps settle on a good joint solution.
    opt = _CosineAdam(params, [lr * rms_a, lr * rms_b, lr], steps)
    eval_every = max(1, steps // 8)
    wb = w.reshape(k // g, g, -1)  # blocked view: scales broadcast instead of being expanded
    # three layer-sized buffers written in place each step: fresh temporaries of a large layer cost
    # more in page faults than the arithmetic (1.3-1.9x per step on 4608-wide layers)
    e, codes, tmp = torch.empty_like(wb), torch.empty_like(wb), torch.empty_like(wb)
    best_err, best = float("inf"), params
    with torch.no_grad():
        for step in range(steps + 1):  # step i sees the iterate after i updates
            A, B, log_s = params
            scale = sign * log_s.exp()
            sc = scale[:, None, :]
            aq = A if fa is None else fake_quant_weight(A, fa)
            bq = B if fb is None else fake_quant_weight(B, fb)
            torch.sub(wb, torch.matmul(aq, bq, out=tmp.view_as(w)).view_as(wb), out=e)
            torch.div(e, sc, out=codes).round_().clamp_(lo, hi)
            e.sub_(torch.mul(codes, sc, out=tmp))  # the error W - codes*s - AqBq
            if step % eval_every == 0 or step == steps:
                err = float(torch.linalg.vector_norm(e))
                if err < best_err:
                    best_err, best = err, [p.clone() for p in params]
            if step == steps:
                break
            grad_s = torch.linalg.vecdot(e, codes, dim=1).mul_(-2 * scale)
            e2 = e.view_as(w)
            opt.step([(e2 @ bq.T).mul_(-2), (aq.T @ e2).mul_(-2), grad_s])
    A, B, log_s = best
    return (*_deployed(w, sign * log_s.exp(), A, B, spec, z), A, B)


class _CosineAdam:
    """torch.optim.Adam's update (its defaults: betas (0.9, 0.999), eps 1e-8; the single-tensor path
    it takes on CPU) under CosineAnnealingLR's chained learning rate, op for op as torch 2.x writes
    them (torch/optim/adam.py, lr_scheduler.py), so the iterates are the same. Written out because
    constructing torch's optimizer imports torch._dynamo: seconds in every worker process."""

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, params: list, lrs: list, steps: int):
        self.params, self.lrs, self.base, self.steps, self.t = params, list(lrs), list(lrs), steps, 0
        self.avg = [torch.zeros_like(p) for p in params]
        self.avg_sq = [torch.zeros_like(p) for p in params]

    def step(self, grads: list) -> None:
        self.t += 1
        b1, b2, t = self.BETA1, self.BETA2, float(self.t)
        for p, g, m, v, lr in zip(self.params, grads, self.avg, self.avg_sq, self.lrs):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(self.EPS)
            p.addcdiv_(m, denom, value=-(lr / (1 - b1 ** t)))
        e, n = self.t, self.steps  # the scheduler's step after the optimizer's
        if (e - 1 - n) % (2 * n) == 0:
            self.lrs = [lr + base * (1 - math.cos(math.pi / n)) / 2 for lr, base in zip(self.lrs, self.base)]
        else:
            self.lrs = [(1 + math.cos(math.pi * e / n)) / (1 + math.cos(math.pi * (e - 1) / n)) * lr for lr in self.lrs]


def fit_loraq_without_branch(w, spec, seed=0, input_stats=None):
    """A layer given no branch (rank 0): the per-block clipping search and least-squares scales
    of LoRaQ's initialisation (then GPTQ's rounding on the input statistics, when given)."""
    return _with_stats(w, LayerRecord(quantize_mse(w, spec.main.weight)[0], spec.main), spec.options, input_stats)


def _with_stats(w, rec: LayerRecord, opts, input_stats) -> LayerRecord:
    """The main codes re-rounded by GPTQ on the grid LoRaQ chose, against what the branch leaves,
    and the bias shifted by the error's mean (calibless/methods/gptq.py)."""
    if not opts.input_stats:
        return rec
    from calibless.methods.gptq import GptqOptions, round_against_stats  # gptq imports this module
    return round_against_stats(w, rec, input_stats, GptqOptions())


@register_method("loraq", options=LoraqOptions, uses_branch=True, without_branch=fit_loraq_without_branch,
                 uses_input_stats=True)
def fit_loraq(w, spec, seed=0, input_stats=None):
    opts = spec.options
    main, a, b, _ = alternate(w, spec, _ClipSearch(spec.main.weight), opts.init_iters, seed)
    if opts.steps > 0:
        _, main, br, a, b = refine(w, main, a, b, spec, opts.steps, opts.lr)
    else:
        _, main, br = _deployed(w, main.scale, a, b, spec, None if main.zero_point is None else main.zero_point.float())
    return _with_stats(w, LayerRecord(main, spec.main, br), opts, input_stats)
