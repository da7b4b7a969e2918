"""SVDQuant-style low rank (arXiv 2411.05007): SVD of W, then alternate "quantize the residual,
re-fit the low rank to what is left" until the error stops falling. Optional smoothing
(X' = X / l, W' = l W) when per-input-channel activation maxima are given; without data the
error is the weight error (with activation maxima: the activation-weighted weight error)."""
import torch

from calibless.lowrank import top_r
from calibless.methods import register_method
from calibless.record import Branch, QTensor, QuantizedLinear


def smoothing_factors(w: torch.Tensor, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """l_i = max|x_i|^alpha / max|W_i,:|^(1 - alpha), per input channel i (w is (in, out))."""
    wmax = w.abs().amax(dim=1).clamp_min(1e-5)
    return (act_max.float().clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp_min(1e-5)


def alternate(w, spec, quantize_residual, max_iter: int, seed: int, weight=None):
    """The alternating loop shared by SVDQuant and LoRaQ's initialisation.

    Returns (main QTensor, float A, float B, error) of the best iterate; the error counts the
    branch quantized in its own format, so the loop optimises what is actually deployed.
    """
    a, b = top_r(w, spec.rank, seed=seed)
    best = None
    for _ in range(max_iter):
        main = quantize_residual(w - a @ b)
        br = Branch.from_float(a, b, spec.branch)
        e = w - main.dequantize() - br.down_weight() @ br.up_weight()
        if weight is not None:
            e = e * weight[:, None]
        err = float(torch.linalg.norm(e))
        if best is not None and err >= best[3]:
            break
        best = (main, a, b, err)
        a, b = top_r(w - main.dequantize(), spec.rank, seed=seed, warm=b)
    return best


@register_method("svdquant", uses_branch=True)
def fit_svdquant(w, spec, act_stats=None, seed=0):
    smooth = None
    if act_stats is not None:
        smooth = smoothing_factors(w, act_stats, spec.option("alpha", 0.5))
        w = w * smooth[:, None]
    weight = None if act_stats is None else act_stats.float() / smooth
    main, a, b, _ = alternate(w, spec, lambda r: QTensor.from_float(r, spec.main.weight),
                              spec.option("max_iter", 100), seed, weight)
    return QuantizedLinear(main, spec.main, Branch.from_float(a, b, spec.branch), smooth=smooth)
