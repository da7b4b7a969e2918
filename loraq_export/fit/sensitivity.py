"""How much one unit of a layer's predicted error costs at the model's output (``--budget``).

Layer errors do not reach the output alike (a residual branch's last projection, a value
projection, a feed-forward input...), which the per-layer predicted error cannot see, so the
allocation scales each layer's predicted errors by

    sensitivity = |J_L D_L|^2 / |y|^2 / predicted error of the layer's reference candidate,

where y is the model's output on a few of its synthetic inputs, D_L = X_L dW_L^T what the reference
candidate's weight error dW_L adds to the layer's output on those inputs, and J_L the Jacobian of
y with respect to that output.

|J_L D_L|^2 is estimated for every layer at once from one forward and one backward pass (the
probes: copies of the sample along the batch, each with its own v; Hutchinson's estimator, "A
stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines", 1989;
HAWQ-V2, Dong et al., arXiv 1911.03852, uses it for the same purpose, mixed precision): with v ~
N(0, I) over the output and g = J_L^T v the gradient reaching the layer's output, E_v[(g . D)^2] =
|J_L D|^2. One probe's (g . D)^2 is a single noisy number, so the sum is split by sample b and
output channel o: sum_{b,o} (sum_t g_bto D_bto)^2. The terms it leaves out pair different output
channels, whose errors come from different rows of dW (rounding errors that are independent from
row to row), so they vanish in expectation, and what is left averages over samples x channels
terms: a few probes are as steady as many (docs/methods.md, "Bit allocation under a budget", has
the measurements).

Before this the sensitivity was measured exactly: one forward per quantized layer with that layer
alone quantized (280 forwards on PixArt-Sigma, most of a budgeted export's time). That is still
the path for a model whose forward cannot be differentiated (its output does not require grad,
or its backward pass fails).
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch

from calibless.rotation import Rotation, rotation_block
from loraq_export.fit.block_replay import BlockReplay, block_stack
from loraq_export.fit.plan import LayerPlan
from loraq_export.fit.recipes import LayerRecipe
from loraq_export.models.stored_dtype import replacement_dtype

# samples of the model's synthetic inputs the sensitivities are measured on (MiniLM: 8 sequences
# of one batch, as the exact forwards used; a diffusion transformer: 8 of its single-sample
# batches, at 8 noise levels), and backward probes. PixArt-Sigma, 4 blocks, against the exact
# sensitivities on 8 other samples: Spearman 0.97-0.98 (the exact forwards on one sample, as
# before: 0.91-0.95); one probe was as steady there but measured 4-6% more held-out error on
# MiniLM at 4.56 and 4.8 bits, two as little as the exact forwards (docs/methods.md, "Bit
# allocation under a budget")
SENSITIVITY_SAMPLES = 8
SENSITIVITY_PROBES = 2


def online_block(lr: LayerRecipe, p: LayerPlan) -> Optional[int]:
    """The Hadamard block the fit will apply to layer ``p``'s weight under ``lr`` (None: no
    rotation, or one folded into the producer, where the model's weight is already rotated)."""
    if lr.rotation is None or p.folded_by is not None:
        return None
    return rotation_block(lr.rotation, p.in_features)


def sensitivity_sample(loaded, seed: int) -> Optional[tuple]:
    """Up to SENSITIVITY_SAMPLES samples of the model's synthetic inputs, batch-first: the first
    batch's, then further batches' appended while their shapes agree. None without synthetic inputs."""
    from loraq_export.fit.input_stats import STATS_SEED_OFFSET
    if loaded.synthetic_batches is None:
        return None
    parts, count = [], 0
    for inputs, _ in loaded.synthetic_batches(seed + STATS_SEED_OFFSET):
        take = tuple(t[:SENSITIVITY_SAMPLES - count] for t in inputs)
        if parts and any(a.shape[1:] != b.shape[1:] for a, b in zip(parts[0], take)):
            break
        parts.append(take)
        count += take[0].shape[0]
        if count >= SENSITIVITY_SAMPLES:
            break
    return tuple(torch.cat(ts, 0) for ts in zip(*parts))


def _quantized_weight(lin: torch.nn.Linear, lr: LayerRecipe, p: LayerPlan) -> torch.Tensor:
    """(out, in) float32: the layer's weight quantized as the reference candidate ``lr`` on its
    clipping-searched grid (rotated and back when the fit rotates it online)."""
    from calibless.methods.loraq import quantize_mse
    w = lin.weight.detach().float().T
    block = online_block(lr, p)
    rot = None if block is None else Rotation(block)
    q = quantize_mse(w if rot is None else rot.rotate_weight(w), lr.main.weight)[0].dequantize()
    return (q if rot is None else rot.unrotate_weight(q)).T.contiguous()


def _return_large_frees_to_the_system() -> None:
    """glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed, and
    from then on serves such blocks from its heaps, which it rarely gives back: the probe's
    block-by-block temporaries then grew the process by 8 GB (PixArt-Sigma at full size) while
    what was live grew by under 1 GB. A fixed 4 MB threshold (mallopt M_MMAP_THRESHOLD) keeps
    blocks above it in their own mappings, returned on free (8 PixArt-Sigma blocks, 16 samples:
    peak 3.13 -> 1.44 GB, the same time). Process-wide and kept: the fit runs in other processes.
    Nothing happens where there is no glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _OutputErrorProbe(torch.autograd.Function):
    """Identity on a layer's output that keeps the layer's input for the backward pass, where the
    gradient reaching the output meets D = X dW^T (``add`` takes (layer output gradient, input)).
    The input is saved as autograd saves anything, so inside a checkpointed block it is dropped
    after the forward and recomputed when this backward asks for it."""

    @staticmethod
    def forward(ctx, out, x, add):
        ctx.save_for_backward(x)
        ctx.add = add
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        ctx.add(g, ctx.saved_tensors[0])
        return g, None, None


def _probed_output_errors(loaded, plans: list[LayerPlan], refs: dict, sample: tuple, seed: int, bar
                          ) -> Optional[dict]:
    """{layer: estimated |J_L D_L|^2 / |y|^2} (see the module docstring), or None when the
    model's output does not depend differentiably on the layers' outputs.

    Memory: each block of the block stack runs under non-reentrant activation checkpointing, so
    the forward keeps only the blocks' inputs; in the backward pass each block is recomputed, and
    a layer's D is formed from its recomputed input when its gradient arrives and dropped at once.
    What is held is one block's graph, not the whole model's (PixArt-Sigma, 8 samples of 256 tokens,
    two backward passes over the whole graph: the process grew by 10 GB)."""
    from torch.utils.checkpoint import checkpoint
    _return_large_frees_to_the_system()
    mods = dict(loaded.module.named_modules())
    stack = block_stack(loaded.module)
    squares = {p.name: 0.0 for p in plans}
    params = list(loaded.module.parameters())
    grads = [q.requires_grad for q in params]

    def hook(p: LayerPlan):
        def add(g, x):
            dw = _quantized_weight(mods[p.name], refs[p.name], p).sub_(mods[p.name].weight.detach().float())
            gd = torch.nn.functional.linear(x.float(), dw).mul_(g)
            c = gd.reshape(gd.shape[0], -1, gd.shape[-1]).sum(1) if gd.dim() >= 3 else gd
            if squares[p.name] == 0.0:
                bar.update(1)
            squares[p.name] += float(torch.linalg.vecdot(c.reshape(-1), c.reshape(-1)))

        def forward(mod, args, out):
            if not out.requires_grad:  # nothing before it is probed: its output starts the graph
                out = out.detach().requires_grad_()
            return _OutputErrorProbe.apply(out, args[0].detach(), add)
        return forward

    handles = [mods[p.name].register_forward_hook(hook(p)) for p in plans]
    blocks = list(stack[1]) if stack else []
    try:
        for q in params:  # gradients reach the layers' outputs only: no weight gradients computed
            q.requires_grad_(False)
        for b in blocks:
            b.forward = functools.partial(checkpoint, b.forward, use_reentrant=False)
        with torch.enable_grad():
            # the probes as copies of the sample along the batch, each its own direction v: one
            # forward, one backward and one clipping search per layer for all of them
            y = loaded.wrapper(*(torch.cat([t] * SENSITIVITY_PROBES, 0) for t in sample))
            if not torch.is_tensor(y) or not y.requires_grad:
                return None
            y = y.float()
            energy = max(float(torch.linalg.vecdot(y.detach().reshape(-1), y.detach().reshape(-1))), 1e-30)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)))
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            b.__dict__.pop("forward", None)
        for q, flag in zip(params, grads):
            q.requires_grad_(flag)
    return {n: s / energy for n, s in squares.items()}  # both summed over the copies


@torch.no_grad()
def _exact_output_errors(loaded, plans: list[LayerPlan], refs: dict, sample: tuple, bar) -> dict:
    """{layer: |y(only that layer quantized) - y|^2 / |y|^2}: one forward per layer, the blocks
    before its block replayed (loraq_export/fit/block_replay.py)."""
    replay = BlockReplay(loaded.module, lambda: loaded.wrapper(*sample))
    fp = replay.reference().float()
    energy = max(float((fp ** 2).sum()), 1e-30)
    mods = dict(loaded.module.named_modules())
    out = {}
    for p in plans:
        lin = mods[p.name]
        saved = lin.weight.data
        try:
            lin.weight.data = _quantized_weight(lin, refs[p.name], p).to(replacement_dtype(lin))
            out_q = replay.run_from(replay.block_of(p.name)).float()
            out[p.name] = float(((out_q - fp) ** 2).sum()) / energy
        finally:
            lin.weight.data = saved
        bar.update(1)
    return out


def layer_sensitivity(loaded, plans: list[LayerPlan], reference: dict, seed: int, progress: bool = False,
                      cache: Optional[dict] = None) -> Optional[dict]:
    """Per layer: the estimated relative output error with only that layer quantized
    (``reference[name]``: its first candidate, on the clipping-searched grid, with that candidate's
    predicted error), divided by the predicted error. None when the model builds no synthetic inputs."""
    from tqdm import tqdm
    sample = sensitivity_sample(loaded, seed)
    if sample is None:
        return None
    cache = {} if cache is None else cache
    key = {p.name: ("sensitivity", p.name, reference[p.name][0].name, p.folded_by, seed) for p in plans}
    missing = [p for p in plans if key[p.name] not in cache]
    if missing:
        refs = {p.name: reference[p.name][0] for p in missing}
        with tqdm(total=len(missing), desc="layer sensitivity", unit="layer", disable=not progress,
                  dynamic_ncols=True) as bar:
            try:
                errors = _probed_output_errors(loaded, missing, refs, sample, seed, bar)
            except RuntimeError as e:  # an in-place op autograd refuses, or no memory for the graph
                print(f"loraq: layer sensitivity: the model's backward pass failed ({str(e).splitlines()[0]}); "
                      "measuring each layer with its own forward instead (slower)", file=sys.stderr)
                errors = None
            if errors is None:
                bar.reset()
                errors = _exact_output_errors(loaded, missing, refs, sample, bar)
        cache.update({key[p.name]: errors[p.name] for p in missing})
    return {p.name: cache[key[p.name]] / max(reference[p.name][1], 1e-30) for p in plans}
