"""Which layers to quantize, and fitting them: in parallel across cores, resumable, sharded.

Every layer is fitted single-threaded with a seed derived from (seed, layer name), so its
result does not depend on which process or rank fitted it, nor on the order: a parallel or
distributed run is byte-identical to a single-process one.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from calibless.formats import FitSpec
from calibless.methods import BRANCH_METHODS, fit_layer
from calibless.record import QuantizedLinear
from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel
from loraq_export.recipes import Recipe


@dataclass
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    quantize: bool
    reason: str
    spec: Optional[FitSpec] = None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": [self.in_features, self.out_features],
                "quantized": self.quantize, "reason": self.reason}


def plan_layers(loaded: LoadedModel, recipe: Recipe) -> list[LayerPlan]:
    """Every Linear of the model with the decision and its reason; checks the recipe fits."""
    from loraq_export.inputs import check_finite
    # the whole model, not only the layers to quantize: one NaN anywhere makes every output NaN
    check_finite(loaded.module.state_dict().items(), f"model {loaded.name}",
                 "the model file is damaged, re-export or re-download it")
    plans = []
    for name, mod in loaded.module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        k, n = mod.in_features, mod.out_features
        quantize, reason = recipe.pattern_decision(name) or loaded.select(name, mod)
        spec = recipe.spec_for(name) if quantize else None
        if quantize:
            g = spec.main.weight.block_size(k)
            if k % g:
                # Refused per layer (never padded): the layer stays in high precision and is reported.
                quantize, reason, spec = False, f"in_features {k} not divisible by group size {g}: kept in high precision", None
        if quantize and recipe.method in BRANCH_METHODS:
            if spec.branch is None:
                raise UserError(f"method {recipe.method!r} fits a low-rank branch but recipe {recipe.name!r} has none; "
                                f"use e.g. {recipe.name}-r32-w8a8 or --method rtn")
            if spec.rank > min(k, n):
                raise UserError(f"rank {spec.rank} is larger than min(in, out) = {min(k, n)} of layer {name}; "
                                "lower the rank or exclude the layer")
        plans.append(LayerPlan(name, k, n, quantize, reason, spec))
    if not any(p.quantize for p in plans):
        raise UserError(f"no Linear layer of {loaded.name} is selected for quantization; check the recipe's include/exclude patterns")
    return plans


def layer_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def _fit_one(name: str, weight_kn: torch.Tensor, spec: FitSpec, method: str, seed: int) -> tuple[str, QuantizedLinear]:
    torch.set_num_threads(1)
    try:
        return name, fit_layer(weight_kn, spec, method, seed=layer_seed(seed, name))
    except ValueError as e:  # the method refusing this layer's input
        raise UserError(f"layer {name}: {e}") from None


def _worker_init():
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def fit_layers(loaded: LoadedModel, plans: list[LayerPlan], method: str, seed: int = 0,
               workers: Optional[int] = None, progress: bool = True, done: Optional[dict] = None,
               on_fitted: Optional[Callable[[str, QuantizedLinear], None]] = None,
               shard: tuple[int, int] = (0, 1)) -> dict[str, QuantizedLinear]:
    """Fit the planned layers not already in ``done``; ``on_fitted`` is called as each finishes
    (a checkpoint writes it to disk there, which is what makes a run resumable). With
    ``shard=(rank, world)`` only every world-th planned layer from ``rank`` is fitted."""
    done = dict(done or {})
    mods = dict(loaded.module.named_modules())
    # shard over ALL planned layers, not the remaining ones: a resumed rank keeps its share
    todo = [p for p in plans if p.quantize][shard[0]::shard[1]]
    todo = [p for p in todo if p.name not in done]
    workers = min(workers or default_workers(), max(1, len(todo)))
    bar = tqdm(total=len(todo), desc=f"fitting ({method}, {workers} proc)", unit="layer", disable=not progress,
               dynamic_ncols=True)
    jobs = [(p.name, mods[p.name].weight.detach().float().T.contiguous(), p.spec, method, seed) for p in todo]
    try:
        if workers == 1:
            threads = torch.get_num_threads()
            try:
                for job in jobs:
                    name, rec = _fit_one(*job)
                    _finish(done, name, rec, on_fitted, bar)
            finally:
                torch.set_num_threads(threads)
        else:
            ctx = mp.get_context("spawn")  # fork after torch started its thread pools can hang
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = [pool.submit(_fit_one, *job) for job in jobs]
                for fut in as_completed(futures):
                    name, rec = fut.result()
                    _finish(done, name, rec, on_fitted, bar)
    finally:
        bar.close()
    return done


def _finish(done, name, rec, on_fitted, bar):
    done[name] = rec
    if on_fitted is not None:
        on_fitted(name, rec)
    bar.set_postfix_str(f"{name.split('.')[-1]} err {rec.stats['rel_error']:.4f}", refresh=False)
    bar.update(1)
