"""LoRaQ: data-free gradient-descent fit of a quantized low-rank branch that compensates the
W4 main layer's quantization error (arXiv 2604.18117; the paper's exact loss is not public,
this objective and schedule are ours).

Objective: the relative Frobenius error of what is deployed,
    || W - s * clamp(round((W - A B) / s)) - Qb(A) Qb(B) ||_F / ||W||_F,
over the branch factors A, B and the main per-block scales s.

Why not a straight-through estimator over the whole main quantizer: then Q(W - AB) ~ W - AB
and the two AB terms cancel, so A and B get no gradient (see docs/methods.md). Here the
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

import torch

from calibless.formats import WeightFormat
from calibless.methods import register_method
from calibless.methods.svdquant import alternate
from calibless.quant import _expand, choose_qparams, fake_quant_weight
from calibless.record import Branch, QTensor, QuantizedLinear, down_format

CLIP_RATIOS = tuple(1.0 - 0.04 * i for i in range(13))  # 1.0 .. 0.52


def quantize_mse(r: torch.Tensor, fmt: WeightFormat, ratios=CLIP_RATIOS) -> QTensor:
    """Per-block clipping search, then a least-squares refit of each block's scale."""
    base, zp = choose_qparams(r, fmt)
    if zp is not None:  # asymmetric grids keep absmax-style range fitting
        return QTensor.from_float(r, fmt)
    k, n = r.shape
    blocks = r.reshape(base.shape[0], -1, n)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()

    def block_err(s):
        q = torch.clamp(torch.round(blocks / s[:, None, :]), fmt.qmin, fmt.qmax)
        return ((q * s[:, None, :] - blocks) ** 2).sum(1), q

    for c in ratios:
        err, _ = block_err(base * c)
        better = err < best_err
        best = torch.where(better, base * c, best)
        best_err = torch.where(better, err, best_err)
    _, q = block_err(best)
    qq = (q * q).sum(1)
    ls = torch.where(qq > 0, (q * blocks).sum(1) / qq.clamp_min(1e-30), best)
    ls = torch.where(ls > 0, ls, best)
    err_ls, _ = block_err(ls)
    best = torch.where(err_ls < best_err, ls, best)
    return QTensor.from_float(r, fmt, scale=best)


def _branch_formats(spec, k: int):
    w = spec.branch.weight
    if w is None:
        return None, None
    return down_format(spec.branch, k), WeightFormat(w.bits, w.symmetric, None)


def _deployed_error(w, s, a, b, spec):
    main = QTensor.from_float(w - a @ b, spec.main.weight, scale=s)
    br = Branch.from_float(a, b, spec.branch)
    err = float(torch.linalg.norm(w - main.dequantize() - br.down_weight() @ br.up_weight()))
    return err, main, br


def refine(w, main: QTensor, a, b, spec, steps: int, lr: float):
    """Adam on (A, B, log s) from the alternating solution; returns the best deployed iterate."""
    fmt = spec.main.weight
    fa, fb = _branch_formats(spec, w.shape[0])
    k = w.shape[0]
    best = (*_deployed_error(w, main.scale, a, b, spec), a, b)
    A = a.clone().requires_grad_(True)
    B = b.clone().requires_grad_(True)
    log_s = main.scale.log().clone().requires_grad_(True)
    rms_a = float(a.pow(2).mean().sqrt()) or 1.0
    rms_b = float(b.pow(2).mean().sqrt()) or 1.0
    opt = torch.optim.Adam([{"params": [A], "lr": lr * rms_a},
                            {"params": [B], "lr": lr * rms_b},
                            {"params": [log_s], "lr": lr}])
    # Cosine decay: large early steps let codes re-round and escape the alternating fixed
    # point; the small late steps settle on a good joint solution.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    eval_every = max(1, steps // 10)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            s = _expand(log_s.exp(), k)
            with torch.no_grad():
                codes = torch.clamp(torch.round((w - A @ B) / s), fmt.qmin, fmt.qmax)
            aq = A if fa is None else fake_quant_weight(A, fa)
            bq = B if fb is None else fake_quant_weight(B, fb)
            loss = (w - codes * s - aq @ bq).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    cand = _deployed_error(w, log_s.exp(), A.detach(), B.detach(), spec)
                if cand[0] < best[0]:
                    best = (*cand, A.detach().clone(), B.detach().clone())
    return best


@register_method("loraq", uses_branch=True)
def fit_loraq(w, spec, act_stats=None, seed=0):
    fmt = spec.main.weight
    main, a, b, _ = alternate(w, spec, lambda r: quantize_mse(r, fmt), spec.option("init_iters", 20), seed)
    steps = spec.option("steps", 100)
    if steps > 0:
        _, main, br, a, b = refine(w, main, a, b, spec, steps, spec.option("lr", 0.1))
    else:
        br = Branch.from_float(a, b, spec.branch)
    return QuantizedLinear(main, spec.main, br)
