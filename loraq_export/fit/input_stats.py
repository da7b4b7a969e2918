"""Input statistics of the layers to fit, gathered in one pass of the FP model over the inputs it
builds itself (``LoadedModel.synthetic_batches``; calibless/input_stats.py says what they are and
why they are no calibration data). Layers that read the same tensor (an attention's q, k and v
projections; every cross-attention's k and v of the same text states) share one accumulator."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from calibless.input_stats import InputStats

STATS_SEED_OFFSET = 707  # the synthetic inputs differ from every other example input the flow draws


@torch.no_grad()
def collect_input_stats(module: nn.Module, names: Iterable[str], batches: list,
                        run: Callable[[tuple], object], progress: bool = False) -> dict[str, InputStats]:
    """``batches``: (inputs, token mask or None); ``run(inputs)`` calls the model. Returns each named
    Linear's statistics over the unmasked rows of its input."""
    names = list(names)
    mods = dict(module.named_modules())
    by_name: dict[str, InputStats] = {}
    state: dict = {"mask": None, "by_input": {}, "added": set()}

    def hook(name: str):
        def pre(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            # the entry holds x, so that its memory is not reused by another tensor (same key) in this batch
            stats = by_name.get(name) or state["by_input"].get(key, (None,))[0] or InputStats.empty(x.shape[-1])
            by_name[name] = stats
            state["by_input"][key] = (stats, x)
            if id(stats) in state["added"]:
                return  # another layer reading this tensor already counted it
            state["added"].add(id(stats))
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            mask = state["mask"]
            stats.add(rows[mask] if mask is not None and mask.numel() == rows.shape[0] else rows)
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for inputs, mask in tqdm(batches, desc="input statistics", unit="batch", disable=not progress,
                                 dynamic_ncols=True):
            state.update(mask=mask, by_input={}, added=set())
            run(inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"layer {missing[0]} was never called on the synthetic inputs; exclude it or use a method "
                         "without input statistics")
    return by_name


def model_input_stats(loaded, names: Iterable[str], seed: int, progress: bool = False) -> Optional[dict[str, InputStats]]:
    """The statistics of ``names`` over ``loaded``'s synthetic inputs (None if it builds none)."""
    if loaded.synthetic_batches is None:
        return None
    batches = loaded.synthetic_batches(seed + STATS_SEED_OFFSET)
    return collect_input_stats(loaded.module, names, batches, lambda inputs: loaded.wrapper(*inputs), progress)
