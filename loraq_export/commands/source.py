"""What ``loraq export`` works on: an FP model to fit now, or a checkpoint that brings its records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraq_export.errors import UserError
from loraq_export.export.deploy import refuse_undeployable
from loraq_export.fit.prepare import prepare_fit
from loraq_export.fit.plan import LayerPlan
from loraq_export.fit.recipes import Recipe, load_recipe, recipe_from_json, with_defaults
from loraq_export.models import LoadedModel, load_model
from loraq_export.options import Options
from loraq_export.store.outputs import check_output_dir
from loraq_export.timing import Timer


@dataclass
class ExportSource:
    loaded: LoadedModel
    recipe: Recipe
    plans: list[LayerPlan]
    records: Optional[dict]  # fitted already (a checkpoint), else None
    fp: Optional[LoadedModel]  # the FP reference: the model itself before the swap, or a checkpoint's original
    allocation: Optional[dict] = None  # --budget: the allocation's summary (fit/allocation.py)
    qconfig: Optional[dict] = None  # a checkpoint's quantization_config


def load_source(opts: Options, timer: Timer) -> ExportSource:
    """Cheap checks first (recipe, target, output directory), then the model or checkpoint."""
    from loraq_export.store.checkpoint import is_checkpoint, load_checkpoint
    if opts.model is not None and is_checkpoint(Path(opts.model)):
        if opts.recipe is not None or opts.method is not None or opts.budget is not None:
            raise UserError("a checkpoint carries its own recipe and method; drop --recipe/--method/--budget")
        check_output_dir(opts.out, opts.overwrite)
        with timer("load"):
            loaded, records, q = load_checkpoint(Path(opts.model))
        recipe = recipe_from_json(q["recipe"])
        refuse_undeployable(recipe, opts)
        if opts.target == "tensorrt" and any(_signed(r) for r in records.values()):
            raise UserError(f"checkpoint {opts.model} was quantized for ONNX Runtime (signed scales, which TensorRT "
                            "cannot take); re-run loraq quantize with --target tensorrt")
        fp = fp_original(q, opts.seed if "seed" not in q else q["seed"])
        plans = [LayerPlan(n, r.in_features, r.out_features, True, "quantized in the checkpoint") for n, r in records.items()]
        plans += [LayerPlan(n, m.in_features, m.out_features, False, (q.get("skipped") or {}).get(n, "not quantized in the checkpoint"))
                  for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear) and n not in records]
        return ExportSource(loaded, recipe, plans, records, fp, qconfig=q)
    text, budget = with_defaults(opts.recipe, opts.budget, opts.target)
    recipe = load_recipe(text, opts.method).for_target(opts.target)
    check_budget(budget)
    refuse_undeployable(recipe, opts)
    check_output_dir(opts.out, opts.overwrite)
    with timer("load"):
        loaded = load_model(opts.model, opts.num_layers, opts.seed, opts.component)
    with timer("prepare"):
        recipe, plans, allocation = prepare_fit(loaded, recipe, opts.seed, budget, opts.target, opts.progress,
                                                workers=opts.workers)
    return ExportSource(loaded, recipe, plans, None, loaded, allocation)


def check_budget(budget: Optional[float]) -> None:
    import math
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserError(f"--budget must be a positive number of bits per weight (e.g. 4.8), got {budget}")


def fp_original(q: dict, seed: int) -> Optional[LoadedModel]:
    """The FP model a checkpoint was made from, when it can still be loaded (else None)."""
    src = q.get("source") or {}
    try:
        return load_model(src.get("model"), src.get("num_layers"), seed, src.get("component")) if "model" in src else None
    except UserError:
        return None


def _signed(rec) -> bool:
    """Any negative scale in the record's quantized tensors."""
    tensors = [rec.weight] + ([] if rec.branch is None else [f for f in (rec.branch.down, rec.branch.up) if hasattr(f, "scale")])
    return any(bool((t.scale < 0).any()) for t in tensors)
