"""Which Linear layers of a model to quantize, with what, and why: the plan every command fits.

A layer is quantized when the recipe's include/exclude patterns (or else the model's own rule)
select it and its in_features is divisible by the recipe's group size (never padded: otherwise it
stays in high precision and the report says why). A rank above min(in, out), an activation group
that does not divide a selected layer's in_features, or a Hadamard rotation of an odd width, is an
error (a -had<B> block that does not divide the width is lowered to one that does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from calibless.formats import FitSpec
from calibless.input_stats import InputStats
from calibless.methods import get_method
from calibless.rotation import rotation_block
from loraq_export.errors import UserError
from loraq_export.fit.recipes import Recipe, fusing_branch

# (name, Linear) -> (quantize?, reason): a model's default layer selection.
Selector = Callable[[str, nn.Linear], tuple[bool, str]]


@dataclass
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    quantize: bool
    reason: str
    spec: Optional[FitSpec] = None
    folded_by: Optional[str] = None  # the producer layer that applies this layer's input rotation (fit/folds.py)
    input_stats: Optional[InputStats] = None  # its input's statistics (fit/input_stats.py), when gathered

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": [self.in_features, self.out_features],
                "quantized": self.quantize, "reason": self.reason}


def recipe_with_branch(name: str) -> str:
    """``name`` with a rank-16 branch that fuses with its main path, where the grammar puts it
    (after the group and ``-ag<N>``, before ``-had<B>`` and ``-asym``)."""
    parts = name.split("-")
    at = 3 if len(parts) > 2 and parts[2].startswith("ag") else 2
    return "-".join(parts[:at] + ["r16", fusing_branch(parts[0])] + parts[at:])


def plan_layers(module: nn.Module, recipe: Recipe, select: Selector, model_name: str = "the model") -> list[LayerPlan]:
    """Every Linear of ``module`` with the decision and its reason; checks the recipe fits."""
    from loraq_export.inputs import check_finite
    # the whole model, not only the layers to quantize: one NaN anywhere makes every output NaN
    check_finite(module.state_dict().items(), f"model {model_name}",
                 "the model file is damaged, re-export or re-download it")
    uses_branch = get_method(recipe.method).uses_branch
    if uses_branch and recipe.layer.branch is None and not any(lr.branch for _, lr in recipe.overrides):
        raise UserError(f"method {recipe.method!r} fits a low-rank branch but recipe {recipe.name!r} has none; "
                        f"use e.g. {recipe_with_branch(recipe.name)}, or --method gptq (no branch)")
    plans = []
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        k, n = mod.in_features, mod.out_features
        quantize, reason = recipe.pattern_decision(name) or select(name, mod)
        spec = recipe.spec_for(name) if quantize else None
        if quantize:
            g = spec.main.weight.block_size(k)
            if k % g:
                # Refused per layer (never padded): the layer stays in high precision and is reported.
                quantize, reason, spec = False, f"in_features {k} not divisible by group size {g}: kept in high precision", None
        if quantize:
            _check_blocks(name, k, spec, recipe.name)
        if quantize and uses_branch and spec.branch is not None:
            if spec.rank > min(k, n):
                raise UserError(f"rank {spec.rank} is larger than min(in, out) = {min(k, n)} of layer {name}; "
                                "lower the rank or exclude the layer")
        plans.append(LayerPlan(name, k, n, quantize, reason, spec))
    if not any(p.quantize for p in plans):
        narrow = [p for p in plans if p.reason.startswith("in_features")]
        if narrow:  # selected, but too narrow for the recipe's group size
            raise UserError(f"no Linear layer of {model_name} can be quantized with recipe {recipe.name}: "
                            f"{len(narrow)} selected layer(s) have in_features ({narrow[0].in_features} for "
                            f"{narrow[0].name}) that group size {recipe.spec_for(narrow[0].name).main.weight.block_size(narrow[0].in_features)} "
                            "does not divide; use a recipe with a group size that divides them")
        raise UserError(f"no Linear layer of {model_name} is selected for quantization; check the recipe's include/exclude patterns")
    return plans


def _check_blocks(name: str, k: int, spec: FitSpec, recipe: str) -> None:
    """-ag<N> must split every selected layer's input width (never padded); -had<B> takes the
    largest power of two up to B that does (calibless.rotation.rotation_block), so it fails only
    on an odd width."""
    if spec.rotation is not None and rotation_block(spec.rotation, k) == 1:
        raise UserError(f"recipe {recipe}: no Hadamard block divides the {k} inputs of layer {name} (an odd "
                        "width); exclude the layer or drop -had")
    acts = [spec.main.act] + ([spec.branch.act] if spec.branch is not None else [])
    for what, n in (("activation group -ag", a.group_size) for a in acts):
        if n is not None and k % n:
            raise UserError(f"recipe {recipe}: {what}{n} does not divide the {k} inputs of layer {name}; "
                            f"use a block that divides {k}, or exclude the layer")
