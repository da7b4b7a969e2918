"""Data-free rotation of a Linear's input: y = (x P H)(H^T P^T W) = x W for an orthogonal P H.

H is block-diagonal with normalized Walsh-Hadamard blocks of size B (a power of two), P an
optional fixed permutation of the input channels (a gather). Rotating spreads an outlier channel
of x (or a salient row of W) over its block, so both quantize better, with no data involved
(QuaRot, arXiv 2404.00456; ConvRot, arXiv 2512.03673; LoPRo, arXiv 2601.19675: docs/methods.md).
The online part runs in the graph as Gather(P) -> Reshape(-1, B) -> MatMul(H_B) -> Reshape back;
the offline part is applied to the weight before any method fits it.

Matrices are in calibless' (K, N) layout: x (..., K) @ W (K, N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from calibless.formats import is_block_size


@lru_cache(maxsize=16)
def _hadamard64(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def hadamard(b: int, dtype=torch.float32) -> torch.Tensor:
    """The normalized Walsh-Hadamard matrix of order ``b``: symmetric and orthogonal (H = H^T =
    H^-1), entries +-1/sqrt(b)."""
    if not is_block_size(b):
        raise ValueError(f"Hadamard block must be a power of two from 2 to 1024, got {b}")
    return _hadamard64(b).to(dtype)


def rotation_block(block: int, width: int) -> int:
    """The block that ``-had<block>`` rotates a ``width``-wide input with: ``block`` where it
    divides the width, else the largest smaller power of two that does (SANA-1.6B's 2240 inputs
    take 64 under -had128: 2240 = 64 x 35), so one recipe fits every layer of a model; 1 (no
    rotation possible) only for an odd width. Hadamard matrices of other orders exist only for
    some sizes (12, 20, ...) and have no fast structure, so non-power-of-two blocks are not used."""
    while block > 1 and width % block:
        block //= 2
    return block


def block_hadamard(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` times blockdiag(H_b, ..., H_b) along its last axis, computed as the graph does."""
    k = x.shape[-1]
    if k % b:
        raise ValueError(f"Hadamard block {b} does not divide the width {k}")
    return (x.reshape(-1, b) @ hadamard(b, x.dtype)).reshape(x.shape)


@dataclass
class Rotation:
    """The input rotation of one layer: block ``block``, after the channel gather ``perm`` (None:
    no permutation). ``folded``: the layer producing the input already applies it, and the model's
    weights were rotated to match: the record's weight is then in the model's own basis and
    nothing is applied online (the rotation is recorded for the report)."""

    block: int
    perm: Optional[torch.Tensor] = None  # int64 (K,), x' = x[..., perm]
    folded: Optional[str] = None  # the producer layer's name when folded

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[..., self.perm]
        return block_hadamard(x, self.block)

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """H^T P^T W for W (K, N): rows follow x's gather, then the block Hadamard along K. Made
        contiguous: the methods' passes over a transposed view ran 1.5x slower (a PixArt-Sigma
        block's fit with -had128, 1152x4608 layers 4.6 -> 8.6 s)."""
        if self.perm is not None:
            w = w[self.perm]
        return block_hadamard(w.T, self.block).T.contiguous()

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """P H W': the weight in the original input basis (inverse of ``rotate_weight``)."""
        w = block_hadamard(w.T, self.block).T
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[self.perm] = w
        return out

    def stored_bits(self) -> int:
        """The permutation is stored per layer (int32 gather indices); H is one shared constant."""
        return 0 if self.perm is None else self.perm.numel() * 32
