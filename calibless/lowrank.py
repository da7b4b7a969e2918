"""Low-rank factorizations used by the methods: exact and randomized truncated SVD.

Both return balanced factors A (K, r) = U sqrt(S), B (r, N) = sqrt(S) V^T, so A and B have
similar ranges and quantize equally well. The randomized SVD takes an explicit generator so a
layer's result never depends on global RNG state (byte-identical across processes).
"""
from __future__ import annotations

import torch

# Above this many elements, the randomized SVD is used (full SVD is cubic and dominates time).
EXACT_SVD_MAX_ELEMENTS = 0


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def svd_exact(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    a, b = _balanced(u, s, vh, r)
    return a.to(m.dtype), b.to(m.dtype)


def svd_randomized(m: torch.Tensor, r: int, oversample: int = 16, power_iters: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Halko et al. randomized range finder with power iterations (QR re-orthonormalized)."""
    k, n = m.shape
    p = min(r + oversample, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(m @ torch.randn(n, p, generator=gen, dtype=m.dtype))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ z)
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return _balanced(q @ u, s, vh, r)


def top_r(m: torch.Tensor, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if m.numel() <= EXACT_SVD_MAX_ELEMENTS:
        return svd_exact(m, r)
    return svd_randomized(m, r, seed=seed)
