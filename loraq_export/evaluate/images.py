"""Image comparison (PSNR, SSIM) and the labelled FP | quantized grid of ``loraq generate``.

Both metrics are computed on the 8-bit RGB images as saved (what a user looks at), values 0..255:

- PSNR = 10 log10(255^2 / MSE) over all pixels and channels (inf for identical images);
- SSIM as Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 13(4), 2004: an 11x11 Gaussian window with sigma 1.5,
  C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255, the SSIM map averaged over the valid (unpadded)
  window positions and the three channels (the paper's parameters; scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255)`` computes the same). Images smaller than the window use a window cut to fit.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _array(img) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.astype(np.float64)


def psnr(ref, img) -> float:
    a, b = _array(ref), _array(img)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(ref, img, window: int = 11, sigma: float = 1.5) -> float:
    a, b = _array(ref), _array(img)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    size = min(window, a.shape[0], a.shape[1])
    size -= 1 - size % 2  # odd
    w = _gaussian(size, sigma)[None, None]
    x = torch.from_numpy(a).permute(2, 0, 1)[:, None]  # (C, 1, H, W)
    y = torch.from_numpy(b).permute(2, 0, 1)[:, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, w)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def labelled_grid(rows: list, headers: list, cell: int = 192, label_h: int = 18):
    """A PIL image: one row per entry of ``rows`` ((row label, [images...])), a header line naming
    the columns, each image scaled (nearest neighbour: pixels stay visible) to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (cols * cell, label_h + len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for j, head in enumerate(headers[:cols]):
        draw.text((j * cell + 4, 3), head, fill="black")
    for i, (label, images) in enumerate(rows):
        top = label_h + i * (cell + label_h)
        draw.text((4, top + 3), _fit(draw, label, cols * cell - 8), fill="black")
        for j, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (j * cell, top + label_h))
    return grid


def _fit(draw, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
