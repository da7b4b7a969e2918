"""What a layer's inputs look like, from the model's own synthetic inputs (no dataset): the mean
and the covariance of the input vectors of a Linear, accumulated over tokens.

Methods that take them weigh the weight error by what reaches the output: with E = W - W_eff in
(in, out) layout and inputs x of mean mu and covariance C,

    E[|x E|^2] = tr(E^T C E) + |mu E|^2,

and the second term is removed exactly by shifting the bias by mu E (bias correction), so a
method minimises tr(E^T C E) and then corrects the bias. The statistics come from the model run
on inputs it builds itself (for a BERT encoder: token sequences drawn from its own vocabulary;
for a diffusion transformer: its example latents, timesteps and text states), which is
composition, not calibration: no dataset enters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibless.rotation import Rotation


GRAM_BLOCK_ROWS = 4  # block rows of the Gram's lower triangle in add(lower_only=True)
GRAM_MIN_BLOCK = 64  # narrower layers take the plain product (the blocking saves nothing there)
FILL_STRIP = 256  # rows per step of fill_upper


@dataclass
class InputStats:
    """Running sums of a layer's input vectors. The sum of x is float64 (the covariance subtracts the
    mean's square from the Gram's diagonal); the Gram is float32, which keeps a 4608-wide layer's at
    85 MB, and its ~1e-6 relative rounding is far below the 1% damping GPTQ adds to it."""

    count: int
    total: torch.Tensor  # (K,) sum of x
    gram: torch.Tensor  # (K, K) sum of x x^T

    @classmethod
    def empty(cls, k: int) -> "InputStats":
        return cls(0, torch.zeros(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float32))

    def add(self, x: torch.Tensor, lower_only: bool = False) -> None:
        """Accumulate the rows of ``x`` (tokens, K). ``lower_only``: only the Gram's block lower
        triangle (4 block rows, each with the blocks up to its diagonal: 5/8 of x^T x's flops, 1.45x
        faster at K = 1152 and 1.9x at K = 4608 measured; the statistics pass spends most of its
        time here); the caller makes it whole with ``fill_upper()`` once every batch is in."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.total += x.sum(0, dtype=torch.float64)
        k = x.shape[1]
        if not lower_only or k < GRAM_BLOCK_ROWS * GRAM_MIN_BLOCK:
            self.gram += x.T @ x
            return
        edges = [k * i // GRAM_BLOCK_ROWS for i in range(GRAM_BLOCK_ROWS + 1)]
        for lo, hi in zip(edges, edges[1:]):
            self.gram[lo:hi, :hi].addmm_(x[:, lo:hi].T, x[:, :hi])

    def fill_upper(self) -> None:
        """Make the Gram whole after ``add(x, lower_only=True)``: its lower triangle mirrored above
        the diagonal (exactly symmetric). In place, a strip of rows at a time: the whole-matrix
        tril(G) + tril(G, -1)^T made three Gram-sized temporaries, 7 s of a full PixArt-Sigma's
        78 s statistics pass."""
        g = self.gram
        k = g.shape[0]
        for lo in range(0, k, FILL_STRIP):
            hi = min(lo + FILL_STRIP, k)
            d = g[lo:hi, lo:hi]
            d.copy_(torch.tril(d) + torch.tril(d, -1).T)
            g[lo:hi, hi:].copy_(g[hi:, lo:hi].T)

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()

    def covariance(self) -> torch.Tensor:
        """C = E[x x^T] - mu mu^T, float32, symmetrised. In float32 like the Gram it comes from (the
        subtraction rounds no worse than the Gram's own accumulation; float64 took 0.8 s of a
        4608-wide layer's GPTQ pass)."""
        n = max(self.count, 1)
        mu = (self.total / n).float()
        c = torch.div(self.gram.float(), n).addr_(mu, mu, alpha=-1)
        return c.add_(c.T.clone()).mul_(0.5)

    def mean_square(self) -> torch.Tensor:
        """E[x_k^2] per input channel (K,)."""
        return (torch.diagonal(self.gram).double() / max(self.count, 1)).float()


def output_error(e: torch.Tensor, cov: torch.Tensor) -> float:
    """tr(E^T C E): the mean squared output error, over the inputs' covariance, of a weight error
    ``e`` (in, out), once the bias absorbs the mean's share."""
    return float(((cov @ e) * e).sum())


def rotate_stats(stats: InputStats, rot: Rotation) -> InputStats:
    """The statistics of the rotated input x R: sum R^T sum x, Gram R^T G R."""
    gram = rot.rotate_input(rot.rotate_input(stats.gram.float()).T.contiguous())
    return InputStats(stats.count, rot.rotate_input(stats.total.float()).double(), (gram + gram.T) / 2)
