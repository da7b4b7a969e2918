"""SVDQuant-style low rank (arXiv 2411.05007), data-free: SVD of W, then alternate "quantize the
residual, re-fit the low rank to what is left" until the weight error stops falling. (SVDQuant's
smoothing needs calibration activations, which this data-free tool does not take.)"""
from dataclasses import dataclass

import torch

from calibless.lowrank import top_r
from calibless.methods import register_method
from calibless.record import Branch, LayerRecord, QTensor


@dataclass(frozen=True)
class SvdquantOptions:
    max_iter: int = 100  # alternating iterations at most (SVDQuant's own cap); stops at the first that does not help


def alternate(w, spec, quantize_residual, max_iter: int, seed: int):
    """The alternating loop shared by SVDQuant and LoRaQ's initialisation.

    Returns (main QTensor, float A, float B, error) of the best iterate; the error counts the
    branch quantized in its own format, so the loop optimises what is actually deployed.
    """
    a, b = top_r(w, spec.rank, seed=seed)
    best = None
    for _ in range(max_iter):
        main = quantize_residual(w - a @ b)
        left = w - main.dequantize()  # dequantized once: a layer-sized pass the error and the SVD share
        br = Branch.from_float(a, b, spec.branch)
        err = float(torch.linalg.norm(left - br.down_weight() @ br.up_weight()))
        if best is not None and err >= best[3]:
            break
        best = (main, a, b, err)
        a, b = top_r(left, spec.rank, seed=seed, warm=b)
    return best


@register_method("svdquant", options=SvdquantOptions, uses_branch=True)
def fit_svdquant(w, spec, seed=0):
    main, a, b, _ = alternate(w, spec, lambda r: QTensor.from_float(r, spec.main.weight), spec.options.max_iter, seed)
    return LayerRecord(main, spec.main, Branch.from_float(a, b, spec.branch))
