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
# values in one tile of the tiled passes (clipping search, refinement step): its few float32
# buffers (512 KiB each) stay in a core's L2 cache; 2^16 and 2^18 measured no better
TILE_ELEMENTS = 1 << 17


def code_range(fmt: WeightFormat, zero_point):
    """Bounds for the codes ``round(x / s)`` before the zero point is added: clamping to them is
    clamp(c + z, qmin, qmax) - z in one pass, the same numbers (codes are integer-valued floats)."""
    if zero_point is None:
        return fmt.qmin, fmt.qmax
    return fmt.qmin - zero_point[:, None, :], fmt.qmax - zero_point[:, None, :]


def quantize_mse(r: torch.Tensor, fmt: WeightFormat, ratios=CLIP_RATIOS) -> tuple[QTensor, torch.Tensor]:
    """Per-block clipping search over ``ratios`` (floats, or tensors shaped like the scales; an
    asymmetric grid keeps its min/max zero point), then a least-squares refit of each block's
    scale. Returns the quantized tensor and each block's chosen ratio to its min/max scale.

    Searched tile by tile (whole blocks, a cache-sized span of columns): every candidate reads the
    tile from cache instead of the whole layer from memory."""
    base, zp = choose_qparams(r, fmt)
    k, n = r.shape
    nb = base.shape[0]
    g = k // nb
    blocks = r.reshape(nb, g, n)
    best = base.clone()
    lo, hi = code_range(fmt, zp)
    ratios = [torch.clamp(torch.as_tensor(c, dtype=base.dtype), max=1.0) for c in ratios]
    rows, cols = _tile_shape(g, n)
    for b0 in range(0, nb, rows):
        for c0 in range(0, n, cols):
            at = (slice(b0, b0 + rows), slice(c0, c0 + cols))
            x, s0 = blocks[at[0], :, at[1]], base[at]
            tlo, thi = (lo, hi) if zp is None else (lo[at[0], :, at[1]], hi[at[0], :, at[1]])
            q, e = torch.empty_like(x), torch.empty_like(x)

            def block_err(s):
                sc = s[:, None, :]
                torch.div(x, sc, out=q).round_().clamp_(tlo, thi)
                return torch.mul(q, sc, out=e).sub_(x).square_().sum(1)

            best_err, pick = None, s0
            for c in ratios:
                cand = s0 * (c if c.dim() == 0 else c[at])
                err = block_err(cand)
                if best_err is None:
                    best_err, pick = err, cand
                else:
                    better = err < best_err
                    pick, best_err = torch.where(better, cand, pick), torch.where(better, err, best_err)
            block_err(pick)
            qq = torch.linalg.vecdot(q, q, dim=1)
            ls = torch.where(qq > 0, torch.linalg.vecdot(q, x, dim=1) / qq.clamp_min(1e-30), pick)
            ls = torch.where(ls * pick > 0, ls, pick)  # keep each block's sign (scales may be negative)
            best[at] = torch.where(block_err(ls) < best_err, ls, pick)
    return QTensor.from_float(r, fmt, scale=best, zero_point=zp), best / base


def _tile_shape(g: int, n: int) -> tuple[int, int]:
    """(blocks, columns) of a tile of about TILE_ELEMENTS values: whole blocks, all columns when
    one block row fits, else one block row and a span of columns."""
    if g * n <= TILE_ELEMENTS:
        return max(1, TILE_ELEMENTS // (g * n)), n
    return 1, max(16, TILE_ELEMENTS // g)


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
    step_error = _TiledError(w, g, lo, hi)
    best_err, best = float("inf"), params
    with torch.no_grad():
        for step in range(steps + 1):  # step i sees the iterate after i updates
            A, B, log_s = params
            scale = sign * log_s.exp()
            aq = A if fa is None else fake_quant_weight(A, fa)
            bq = B if fb is None else fake_quant_weight(B, fb)
            evaluate = step % eval_every == 0 or step == steps
            grad_a, grad_b, grad_s, err = step_error(aq, bq, scale, evaluate, gradients=step < steps)
            if evaluate and err < best_err:
                best_err, best = err, [p.clone() for p in params]
            if step == steps:
                break
            opt.step([grad_a, grad_b, grad_s.mul_(scale)])
    A, B, log_s = best
    return (*_deployed(w, sign * log_s.exp(), A, B, spec, z), A, B)


class _TiledError:
    """One refinement step's error and gradients, computed tile by tile.

    E = W - Aq Bq - codes * s with the codes re-rounded from W - Aq Bq; returns dL/dA = -2 E Bq^T,
    dL/dB = -2 Aq^T E, -2 sum_block(E * codes) (times s, the caller's, is dL/ds) and ||E||. Over
    the whole layer these are ~10 passes over layer-sized tensors per step, each from main memory
    (a 1152x4608 layer's are 21 MB); over tiles of whole blocks a tile's E and codes stay in cache
    for every pass (a 1152x4608 layer's 80 steps 4.76 -> 2.66 s, one thread)."""

    def __init__(self, w: torch.Tensor, g: int, lo, hi):
        k, n = w.shape
        nb = k // g
        self.shape, self.nb = (k, n), nb
        rows, cols = _tile_shape(g, n)
        buffers = {}
        self.tiles = []
        for b0 in range(0, nb, rows):
            b1 = min(b0 + rows, nb)
            for c0 in range(0, n, cols):
                c1 = min(c0 + cols, n)
                shape = (b1 - b0, g, c1 - c0)
                if shape not in buffers:
                    buffers[shape] = (torch.empty(shape), torch.empty(shape))
                e, codes = buffers[shape]
                bounds = [x if not torch.is_tensor(x) else x[b0:b1, :, c0:c1] for x in (lo, hi)]
                self.tiles.append((slice(b0 * g, b1 * g), slice(b0, b1), slice(c0, c1), w[b0 * g:b1 * g, c0:c1],
                                   e, e.view(-1, c1 - c0), codes, *bounds))

    def __call__(self, aq, bq, scale, evaluate: bool, gradients: bool):
        k, n = self.shape
        if gradients:
            grad_a, grad_b, grad_s = torch.zeros(k, aq.shape[1]), torch.zeros(bq.shape[0], n), torch.empty(self.nb, n)
        sq = 0.0
        bqt, aqt = bq.T, aq.T
        for rows, blocks, cols, w, e, flat, codes, lo, hi in self.tiles:
            torch.addmm(w, aq[rows], bq[:, cols], alpha=-1, out=flat)
            sc = scale[blocks, None, cols]
            torch.div(e, sc, out=codes).round_().clamp_(lo, hi)
            e.addcmul_(codes, sc, value=-1)
            if evaluate:
                sq += float(torch.linalg.vecdot(e.view(-1), e.view(-1)))
            if gradients:
                grad_s[blocks, cols] = torch.linalg.vecdot(e, codes, dim=1)
                grad_a[rows].addmm_(flat, bqt[cols], alpha=-2)
                grad_b[:, cols].addmm_(aqt[:, rows], flat, alpha=-2)
        if not gradients:
            return None, None, None, sq ** 0.5
        return grad_a, grad_b, grad_s.mul_(-2), sq ** 0.5


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
