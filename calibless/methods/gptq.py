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

import math
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


def _triangular_inverse_in_place(c):
    """LAPACK trtri of the lower triangular, column-major ``c`` (numpy), written over it, on one
    BLAS thread. scipy's OpenBLAS starts a thread per core: its result then depends on the
    machine's core count (the rounding of its blocked products: a 4608-wide factor's inverse
    differed between 1 and 2 threads), and beside the other fitting processes its threads wait for
    busy cores (1.5 s for a 1152-wide inverse that takes 0.02 s alone, measured on 2 cores with 2
    fitting processes)."""
    from scipy.linalg.lapack import get_lapack_funcs
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return get_lapack_funcs("trtri", (c,))(c, lower=1, overwrite_c=1)


def _inverse_factor_of_reversed(flipped: torch.Tensor, mean_diag: float, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) from ``flipped`` = J H J (J the reversal
    permutation; overwritten: its diagonal takes the damping), H damped until it factors (a
    rank-deficient covariance from few tokens needs more than the default).

    One factorisation: with J H J = L L^T, U = J L^-1 J (upper, and U^T U = J L^-T L^-1 J =
    (J J H J J)^-1 = H^-1), where GPTQ's reference inverts H and factors the inverse (three
    K^3-sized steps instead of two smaller ones: a 4608-wide layer's 46 s of 75 s). L^-1 comes
    from LAPACK's triangular inverse (trtri, K^3/3 flops; torch exposes only a triangular solve
    against the identity, K^3: 1.47 s against 0.27 s at K = 4608, one thread), computed over the
    factor's own memory (torch returns it column-major, as LAPACK wants it) and the damping added
    to the diagonal in place: at K = 4608 each K x K copy or mask is 85 MB, and the ones these
    replace were about a quarter of the layer's GPTQ time."""
    mean_diag = mean_diag or 1.0
    diag = torch.diagonal(flipped)
    undamped = diag.clone()
    for extra in (1.0, 10.0, 100.0, 1000.0):
        torch.add(undamped, damp * extra * mean_diag, out=diag)
        chol, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            # the factor's upper triangle is zero and trtri leaves it as it is
            inv, info = _triangular_inverse_in_place(chol.numpy())
            inv = torch.from_numpy(inv)
            # finite iff its sum is (an inf or NaN anywhere makes the sum one): a pass without the
            # Gram-sized mask isfinite() builds
            if int(info) == 0 and math.isfinite(float(inv.sum())):
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
    diag = torch.diagonal(cov).to(dtype)
    dead = diag <= 0  # inputs that never vary: their rows matter only through the bias
    diag = diag.masked_fill(dead, 1.0)
    perm = torch.argsort(diag, descending=True, stable=True) if opts.act_order else torch.arange(k)
    w = w[perm].to(dtype)
    reverse = perm.flip(0)
    flipped = cov.index_select(0, reverse).index_select(1, reverse).to(dtype)  # J P^T H P J
    torch.diagonal(flipped).copy_(diag[reverse])
    hinv = _inverse_factor_of_reversed(flipped, float(diag[perm].mean()), opts.damp)
    del flipped
    scale = main.scale.to(dtype)[perm // g]  # each row's block parameters, in the rounding order
    zero = None if main.zero_point is None else main.zero_point.to(dtype)[perm // g]
    out = torch.empty_like(w)
    spread = torch.empty(opts.block, n, dtype=dtype)
    for i1 in range(0, k, opts.block):
        i2 = min(i1 + opts.block, k)
        w1 = w[i1:i2]  # rounded in place: the rows before i2 are not read again
        err = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            # written into the output row and preallocated buffers rather than fresh temporaries
            # per row; the same operations in the same order, so the codes are bit-identical
            row, s, q, e = w1[i], scale[i1 + i], out[i1 + i], err[i]
            torch.div(row, s, out=q).round_()
            if zero is None:
                q.clamp_(fmt.qmin, fmt.qmax)
            else:
                z = zero[i1 + i]
                q.add_(z).clamp_(fmt.qmin, fmt.qmax).sub_(z)
            q.mul_(s)
            torch.sub(row, q, out=e).div_(h1[i, i])
            rest = i2 - i1 - i - 1  # row i itself is rounded: only the rows after it take its error
            if rest:
                w1[i + 1:].sub_(torch.mul(h1[i, i + 1:, None], e, out=spread[:rest]))
        w[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)
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
