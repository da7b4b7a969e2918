"""LoPRo, data-free (arXiv 2601.19675; no public code): a low-rank part from the fast rank-1-sketch
decomposition R1SVD, then the residual quantized after a column-block permutation and a block
Walsh-Hadamard rotation.

    1. A B = R1SVD_r(W); the branch is A, B in the recipe's branch format.
    2. Input channels ranked by the norm of their row of the residual R = W - Qb(A) Qb(B) (the
       paper ranks with calibration data; here the weights alone decide), permutation P sorting
       them so that each Hadamard block and each weight group holds channels of similar
       importance.
    3. The main weight is Q(H^T P^T R): round to nearest, or the clipping search of LoRaQ's
       initialisation (``quantizer: mse``). ``iters`` > 1 re-fits the low rank to what the
       quantized residual leaves (SVDQuant-style alternation), keeping the best iterate.
Deployed like any rotated layer: the input is rotated online by the same P and H (x P H), and
the branch reads the rotated input with A' = H^T P^T A. The block is the recipe's -had<B>, else
``block``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibless.lowrank import r1svd
from calibless.methods import register_method
from calibless.record import Branch, LayerRecord, QTensor
from calibless.rotation import Rotation, rotation_block


@dataclass(frozen=True)
class LoproOptions:
    block: int = 64  # Hadamard block when the recipe has no -had<B>
    iters: int = 1  # low-rank / quantize alternations (1: the paper's single pass)
    quantizer: str = "rtn"  # rtn | mse (per-group clipping search)
    power_iters: int = 2  # R1SVD's power iterations per rank-1 sketch

    def __post_init__(self):
        if self.quantizer not in ("rtn", "mse"):
            raise ValueError(f"lopro quantizer must be rtn or mse, got {self.quantizer!r}")
        if self.iters < 1:
            raise ValueError("lopro iters must be at least 1")


@register_method("lopro", options=LoproOptions, uses_branch=True, rotates=True)
def fit_lopro(w, spec, seed=0):
    from calibless.methods.loraq import quantize_mse
    opts = spec.options
    block = rotation_block(spec.rotation or opts.block, w.shape[0])
    if block == 1:
        raise ValueError(f"in_features {w.shape[0]} is odd: LoPRo's Hadamard rotation needs an even width; use "
                         "another method for this layer")
    a, b = r1svd(w, spec.rank, seed, opts.power_iters)
    first = Branch.from_float(a, b, spec.branch)
    residual_norms = (w - first.down_weight() @ first.up_weight()).norm(dim=1)
    rot = Rotation(block, torch.argsort(residual_norms, descending=True, stable=True))
    wr, ar = rot.rotate_weight(w), rot.rotate_weight(a)  # R1SVD of P^T H^T W would give the same factors
    best = None
    for _ in range(opts.iters):
        br = Branch.from_float(ar, b, spec.branch)
        res = wr - br.down_weight() @ br.up_weight()
        main = QTensor.from_float(res, spec.main.weight) if opts.quantizer == "rtn" else quantize_mse(res, spec.main.weight)[0]
        err = float(torch.linalg.norm(res - main.dequantize()))
        if best is not None and err >= best[0]:
            break
        best = (err, main, br)
        ar, b = r1svd(wr - main.dequantize(), spec.rank, seed, opts.power_iters)
    _, main, br = best
    return LayerRecord(main, spec.main, br, rot)
