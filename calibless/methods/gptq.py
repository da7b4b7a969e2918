"""gptq: GPTQ's error-compensating rounding (Frantar et al., arXiv 2210.17323) on the layer's input
covariance from the model's own synthetic inputs (calibless/input_stats.py), then bias correction.

Rows of W (in, out) are rounded one input channel at a time, most active channel first (GPTQ's
"act order"); the rounding error of each row is spread over the rows not yet rounded through the
inverse covariance, which minimises tr(E^T C E), the output error the remaining rows can still
cancel. Each block's scale and zero point are fixed beforehand by LoRaQ's per-block clipping
search on the weight (GPTQ's "static groups"), so the result is an ordinary blocked grid that
MatMulNBits and DequantizeLinear run as is. Finally the bias absorbs the mean's share of the
error, mu (W - W_eff) (see calibless/input_stats.py).

Without statistics (a module quantized with no example inputs) the covariance is the identity,
where GPTQ reduces to round to nearest on the clipping-searched grid.

Why the covariance and not E[x x^T] as in GPTQ: transformer activations carry a large mean
(e.g. BERT's LayerNorm outputs), which E[x x^T] would make GPTQ spend its freedom on, although
the bias cancels it for free; measured on MiniLM (synthetic statistics, g64 asymmetric) this
was 0.0191 -> 0.0170 end-to-end 1 - cosine on held-out sentences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from calibless.input_stats import InputStats
from calibless.methods import register_method
from calibless.methods.loraq import quantize_mse
from calibless.record import LayerRecord, QTensor


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01  # added to the covariance's diagonal, relative to its mean (GPTQ's default)
    act_order: bool = True  # round the most active input channels first
    bias_correction: bool = True
    block: int = 128  # rows rounded between two lazy updates of the rest (speed only)

    def __post_init__(self):
        if not self.damp > 0:
            raise ValueError(f"damp must be positive, got {self.damp}")
        if self.block < 1:
            raise ValueError(f"block must be at least 1, got {self.block}")


def _triangular_inverse(c):
    """LAPACK trtri of the lower triangular ``c`` on one BLAS thread. scipy's OpenBLAS starts a
    thread per core: its result then depends on the machine's core count (the rounding of its
    blocked products: a 4608-wide factor's inverse differed between 1 and 2 threads), and beside
    the other fitting processes its threads wait for busy cores (1.5 s for a 1152-wide inverse
    that takes 0.02 s alone, measured on 2 cores with 2 fitting processes)."""
    from scipy.linalg.lapack import get_lapack_funcs
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return get_lapack_funcs("trtri", (c,))(c, lower=1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), H damped until it factors (a rank-deficient
    covariance from few tokens needs more than the default).

    One factorisation: with J the reversal permutation and J H J = L L^T, U = J L^-1 J (upper, and
    U^T U = J L^-T L^-1 J = (J J H J J)^-1 = H^-1), where GPTQ's reference inverts H and factors the
    inverse (three K^3-sized steps instead of two smaller ones: a 4608-wide layer's 46 s of 75 s).
    L^-1 comes from LAPACK's triangular inverse (trtri, K^3/3 flops; torch exposes only a
    triangular solve against the identity, K^3: 1.47 s against 0.27 s at K = 4608, one thread)."""
    k = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean()) or 1.0
    eye = torch.eye(k, dtype=h.dtype)
    flipped = h.flip(0, 1)
    for extra in (1.0, 10.0, 100.0, 1000.0):
        chol, info = torch.linalg.cholesky_ex(flipped + eye * (damp * extra * mean_diag))
        if int(info) == 0:
            inv, info = _triangular_inverse(chol.numpy())
            inv = torch.from_numpy(inv).tril_()  # trtri leaves the untouched upper triangle as it was (zeros)
            if int(info) == 0 and bool(torch.isfinite(inv).all()):
                return inv.flip(0, 1)
    raise ValueError("the input covariance does not factor even when damped; check the model's inputs")


def gptq_round(w: torch.Tensor, cov: torch.Tensor, main: QTensor, opts: GptqOptions,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized (in, out) weight GPTQ rounds onto ``main``'s grid (its scales, zero points).
    In float32 as GPTQ's reference code (float64 doubled the time of a 4608-wide layer and moved
    held-out MiniLM errors by less than their noise, docs/methods.md)."""
    k, n = w.shape
    fmt = main.fmt
    g = fmt.block_size(k)
    h = cov.to(dtype).clone()
    w = w.to(dtype).clone()
    dead = torch.diagonal(h) <= 0  # inputs that never vary: their rows matter only through the bias
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if opts.act_order else torch.arange(k)
    w, h = w[perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, opts.damp)
    scale = main.scale.to(dtype)[perm // g]  # each row's block parameters, in the rounding order
    zero = None if main.zero_point is None else main.zero_point.to(dtype)[perm // g]
    out = torch.zeros_like(w)
    for i1 in range(0, k, opts.block):
        i2 = min(i1 + opts.block, k)
        w1 = w[i1:i2].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row, s = w1[i], scale[i1 + i]
            q = torch.round(row / s)
            if zero is None:
                q = q.clamp(fmt.qmin, fmt.qmax) * s
            else:
                z = zero[i1 + i]
                q = ((q + z).clamp(fmt.qmin, fmt.qmax) - z) * s
            out[i1 + i] = q
            e = (row - q) / h1[i, i]
            w1[i:] -= torch.outer(h1[i, i:], e)
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return out[torch.argsort(perm)].float()


def round_against_stats(w: torch.Tensor, rec: LayerRecord, input_stats: Optional[InputStats],
                        opts: GptqOptions) -> LayerRecord:
    """``rec``'s main codes re-rounded by GPTQ on their own grid against what its branch leaves of
    ``w``, and (``opts.bias_correction``) the bias shifted by the error's mean. Without statistics
    ``rec`` is returned as it is."""
    if input_stats is None or input_stats.count == 0:
        return rec
    branch = 0 if rec.branch is None else rec.branch.down_weight() @ rec.branch.up_weight()
    main = rec.weight
    deq = gptq_round(w - branch, input_stats.covariance(), main, opts)
    rec.weight = QTensor.from_float(deq, main.fmt, scale=main.scale, zero_point=main.zero_point)
    if opts.bias_correction:
        rec.bias_shift = (input_stats.mean.double() @ (w.double() - rec.effective_weight().double())).float()
    return rec


@register_method("gptq", options=GptqOptions, uses_input_stats=True)
def fit_gptq(w, spec, seed=0, input_stats: Optional[InputStats] = None):
    grid, _ = quantize_mse(w, spec.main.weight)
    return round_against_stats(w, LayerRecord(grid, spec.main), input_stats, spec.options)
