"""The Python entry point for any ``nn.Module`` (torchao's ``quantize_`` style):

    from loraq_export import quantize_
    quantize_(model, "w4a16-g64-r16-w4a16-asym", method="loraq",
              filter_fn=lambda mod, name: name.startswith("encoder."))

Every selected ``nn.Linear`` is fitted data-free and replaced in place by a ``LoraqLinear`` that
computes exactly what the exported QDQ graph computes. Layers whose in_features the group size
does not divide stay as they are (never padded). Bad input raises ``UserError`` (one line).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from calibless.methods import get_method
from loraq_export.errors import UserError
from loraq_export.fit.folds import fold_rotations
from loraq_export.fit.input_stats import collect_input_stats
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.plan import plan_layers
from loraq_export.fit.recipes import Recipe, load_recipe
from loraq_export.fit.swap import swap_in


def quantize_(module: nn.Module, recipe: Union[str, Recipe, None] = None, method: Optional[str] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, seed: int = 0,
              workers: Optional[int] = 1, progress: bool = False, example_inputs: Optional[tuple] = None,
              target: str = "ort") -> nn.Module:
    """Quantize ``module``'s Linear layers in place and return it.

    ``recipe``: a recipe string or file (default ``DEFAULT_RECIPE``, without a budget) or a loaded ``Recipe``;
    ``method``: overrides the recipe's method; ``filter_fn(linear, fully_qualified_name)``: which
    Linear layers to quantize (default: all; the recipe's include/exclude patterns apply first);
    ``workers``: fitting processes (None: one per core); ``example_inputs``: a tuple for
    ``module(*example_inputs)``, which lets -had<B> rotations be folded into attention value
    projections where exact (loraq_export/fit/folds.py; without it every rotation runs online),
    and gives methods that read input statistics (gptq, loraq) the layers' inputs on them (make
    them representative: many tokens; without them those methods round without statistics).
    ``target``: "ort" (signed scales on symmetric grids) or "tensorrt" (positive scales).
    The fitted records are on each ``LoraqLinear`` as ``.record``.
    """
    rec = load_recipe(recipe, method) if recipe is None or isinstance(recipe, str) else recipe.with_method(method)
    rec = rec.for_target(target)

    def select(name: str, linear: nn.Linear) -> tuple[bool, str]:
        if filter_fn is None or filter_fn(linear, name):
            return True, "selected" if filter_fn is None else "selected by filter_fn"
        return False, "not selected by filter_fn"

    plans = plan_layers(module, rec, select, type(module).__name__)
    if example_inputs is not None and not get_method(rec.method).rotates:
        fold_rotations(module, plans, lambda: _first_tensor(module(*example_inputs)))
    if example_inputs is not None and get_method(rec.method).uses_input_stats:
        try:
            stats = collect_input_stats(module, [p.name for p in plans if p.quantize], [(example_inputs, None)],
                                        lambda inputs: module(*inputs))
        except ValueError as e:
            raise UserError(str(e)) from None
        for p in plans:
            p.input_stats = stats.get(p.name)
    records = fit_layers(module, plans, rec.method, seed=seed, workers=workers, progress=progress)
    swap_in(module, records)
    return module


def _first_tensor(out):
    """The output to compare: a tensor, or the first tensor of a tuple / model output."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return next(t for t in out if isinstance(t, torch.Tensor))
