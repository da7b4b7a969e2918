"""Truncated SVD for the methods: a randomized range finder (Halko, Martinsson, Tropp 2011).

Returns balanced factors A (K, r) = U sqrt(S), B (r, N) = sqrt(S) V^T, so A and B have similar
ranges and quantize equally well. The sketch takes an explicit generator, so a layer's result
never depends on global RNG state (byte-identical across processes). Iterative methods pass the
previous B as ``warm``: the residual changes little between iterations, so its row space is an
excellent starting sketch and one power iteration suffices.
"""
from __future__ import annotations

from typing import Optional

import torch

OVERSAMPLE = 16


def top_r(m: torch.Tensor, r: int, seed: int = 0, warm: Optional[torch.Tensor] = None,
          power_iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    k, n = m.shape
    p = min(r + OVERSAMPLE, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    if warm is not None:
        extra = p - warm.shape[0]
        start = torch.cat([warm.T.to(m.dtype), torch.randn(n, extra, generator=gen, dtype=m.dtype)], 1) if extra > 0 else warm.T[:, :p]
        power_iters = 1
    else:
        start = torch.randn(n, p, generator=gen, dtype=m.dtype)
    q, _ = torch.linalg.qr(m @ start)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ z)
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    root = s[:r].sqrt()
    return (q @ u[:, :r]) * root, root[:, None] * vh[:r]


def r1svd(m: torch.Tensor, r: int, seed: int = 0, power_iters: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` approximation by ``r`` rank-1 sketches with deflation (LoPRo's R1SVD, from the
    same group's FLRQ, arXiv 2601.05684): p = (M M^T)^q M s with s Gaussian; u = p / |p|;
    k = M^T u (its norm estimates the singular value); deflate M -= u k^T; repeat. Only
    matrix-vector products: no QR, no SVD. Returns balanced factors like ``top_r``."""
    m = m.detach().clone()
    k, n = m.shape
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, r, generator=gen, dtype=m.dtype)
    left, right = torch.zeros(k, r, dtype=m.dtype), torch.zeros(r, n, dtype=m.dtype)
    for i in range(r):
        p = m @ s[:, i]
        for _ in range(power_iters):
            p = m @ (m.T @ p)
        norm = p.norm()
        if norm == 0:
            break  # the rest of the matrix is zero: the remaining factors stay zero
        u = p / norm
        kk = m.T @ u
        sigma = kk.norm()
        root = sigma.sqrt()
        left[:, i] = u * root
        right[i] = kk / sigma.clamp_min(1e-30) * root
        m -= torch.outer(u, kk)
    return left, right
