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
