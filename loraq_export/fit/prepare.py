"""Everything between loading a model and fitting it: the plan, the folded rotations, the input
statistics (for methods that read them, and for a budget's error weights) and, with a budget, the
per-layer allocation, which replaces the recipe by one with an override per layer."""
from __future__ import annotations

from typing import Optional

from calibless.methods import get_method
from loraq_export.fit.allocation import allocate
from loraq_export.fit.folds import plan_and_fold
from loraq_export.fit.input_stats import model_input_stats
from loraq_export.fit.plan import LayerPlan, plan_layers
from loraq_export.fit.recipes import Recipe


def prepare_fit(loaded, recipe: Recipe, seed: int, budget: Optional[float] = None, target: str = "ort",
                progress: bool = False, fold: bool = True, stats: Optional[dict] = None,
                allocation_cache: Optional[dict] = None,
                workers: Optional[int] = None) -> tuple[Recipe, list[LayerPlan], Optional[dict]]:
    """(recipe to fit, plans, allocation summary or None). ``fold`` False leaves the model as it is
    (the bench shares one loaded model between pairs); ``stats``: a cache of input statistics by
    layer name, filled as needed, and ``allocation_cache`` the allocation's (both valid only
    for an unfolded model); ``workers``: processes predicting the allocation's errors (None: one
    per core)."""
    plans = plan_and_fold(loaded, recipe, seed) if fold else plan_layers(loaded.module, recipe, loaded.select, loaded.name)
    if get_method(recipe.method).uses_input_stats or budget is not None:
        attach_input_stats(loaded, plans, seed, progress, stats)
    if budget is None:
        return recipe, plans, None
    recipe, summary = allocate(loaded, recipe, plans, budget, target, seed, progress, allocation_cache, workers)
    before = {p.name: p for p in plans}
    plans = plan_layers(loaded.module, recipe, loaded.select, loaded.name)
    for p in plans:  # the allocation changes formats only: folds and statistics still hold
        p.folded_by, p.input_stats = before[p.name].folded_by, before[p.name].input_stats
    return recipe, plans, summary


def attach_input_stats(loaded, plans: list[LayerPlan], seed: int, progress: bool = False,
                       cache: Optional[dict] = None) -> None:
    cache = {} if cache is None else cache
    missing = [p.name for p in plans if p.quantize and p.name not in cache]
    if missing:
        cache.update(model_input_stats(loaded, missing, seed, progress) or {n: None for n in missing})
    for p in plans:
        p.input_stats = cache.get(p.name)
