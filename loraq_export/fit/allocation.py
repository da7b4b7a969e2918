"""``--budget BITS``: each quantized layer's group size and branch (rank, 0 allowed, and format)
chosen under a bits-per-weight budget (calibless/allocation.py predicts the errors and chooses),
written back as an ordinary recipe with one override per layer (``allocation.yaml``): it can be
reviewed, edited and passed again as ``--recipe``.

Candidates of a layer, from the recipe it would otherwise get: the same main format, activation
groups, rotation and symmetry, with every group size the target runs that divides the layer
(ONNX Runtime: 32, 64, 128; TensorRT: 64, 128, its only INT4 blocks) and, for methods that fit a
branch, ranks 0, 8, 16, 32, 64 (at most min(in, out)) in the recipe's branch format or the
cheapest one that fuses with its main path (w4a16 beside a W4A16 main, else w8a8). Beside a
weight-only main (w4a16), also its INT8 twin per output channel (``w8a16-gch``, no branch): 8.01
to 8.1 bits a weight, worth it on the few layers whose error reaches the output most.
Bits are counted as the report counts them (calibless/bits.py, equal to the stored tensors).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from calibless.allocation import Cost, candidate_bits, choose, predicted_errors
from calibless.input_stats import rotate_stats
from calibless.methods import get_method
from calibless.rotation import Rotation
from loraq_export.errors import UserError
from loraq_export.fit.input_stats import resolve_stats
from loraq_export.fit.parallel import default_workers, map_single_threaded
from loraq_export.fit.plan import LayerPlan
from loraq_export.fit.recipes import LayerRecipe, Recipe, fusing_branch, parse_layer_recipe
from loraq_export.fit.sensitivity import layer_sensitivity, online_block

TARGET_GROUPS = {"ort": (32, 64, 128), "tensorrt": (64, 128)}
RANKS = (0, 8, 16, 32, 64)
WIDE_MAIN = "w8a16"  # per channel: TensorRT takes INT8 weights per tensor or per channel only


def candidates(lr: LayerRecipe, k: int, n: int, uses_branch: bool, target: str) -> list[LayerRecipe]:
    """The layer recipes a layer of (in k, out n) may get in place of ``lr`` (see module docstring)."""
    tokens = lr.name.split("-")
    main = tokens[0]
    ag = [t for t in tokens if t.startswith("ag")]
    tail = [t for t in tokens if t.startswith("had")] + (["asym"] if tokens[-1] == "asym" else [])
    branches = [None]
    if uses_branch and lr.branch is not None:
        cheap = fusing_branch(main)
        fmts = [lr.branch.name] + ([cheap] if cheap != lr.branch.name else [])
        ranks = sorted({r for r in RANKS + (lr.rank,) if 0 < r <= min(k, n)})
        branches += [f"r{r}-{f}" for f in fmts for r in ranks]
    out = []
    for g in TARGET_GROUPS[target]:
        if k % g:
            continue
        for b in branches:
            out.append(parse_layer_recipe("-".join([main, f"g{g}", *ag, *([b] if b else []), *tail])))
    if not out:
        raise UserError(f"no group size the {target} target runs ({', '.join(map(str, TARGET_GROUPS[target]))}) "
                        f"divides the {k} inputs of a selected layer; exclude it or drop --budget")
    if main == "w4a16":
        out.append(parse_layer_recipe("-".join([WIDE_MAIN, "gch", *tail])))
    return out


def allocate(loaded, recipe: Recipe, plans: list[LayerPlan], budget: float, target: str, seed: int = 0,
             progress: bool = False, cache: Optional[dict] = None,
             workers: Optional[int] = None) -> tuple[Recipe, dict]:
    """The recipe with one override per quantized layer, and a summary for the report. ``cache``
    keeps predicted errors and layer sensitivities between calls on the same unchanged model (the
    bench's budgets); ``workers``: processes predicting the errors (None: one per core)."""
    from tqdm import tqdm
    method = get_method(recipe.method)
    mods = dict(loaded.module.named_modules())
    cache = {} if cache is None else cache
    chosen_from, keys, weights = {}, {}, 0
    todo = [p for p in plans if p.quantize]
    for p in todo:
        cands = candidates(recipe.layer_recipe(p.name), p.in_features, p.out_features, method.uses_branch, target)
        chosen_from[p.name] = cands
        keys[p.name] = ("costs", p.name, tuple(c.name for c in cands), recipe.method, target, p.folded_by, seed)
        weights += p.in_features * p.out_features
    missing = [p for p in todo if keys[p.name] not in cache]
    size = sum(p.in_features * p.out_features for p in missing)
    workers = 1 if size < POOL_MIN_WEIGHTS else min(workers or default_workers(), len(missing))
    bar = tqdm(total=len(missing), desc=f"allocating {budget:g} bits", unit="layer",
               disable=not progress or not missing, dynamic_ncols=True)

    by_name, specs_of = {p.name: p for p in missing}, {}

    def job(p: LayerPlan) -> tuple:
        specs = specs_of[p.name] = [_spec(recipe, c, target) for c in chosen_from[p.name]]
        rot = online_block(chosen_from[p.name][0], p)
        stats = None if p.input_stats is None else (p.input_stats if rot is not None else p.input_stats.mean_square())
        return (p.name, mods[p.name].weight.detach().float().T.contiguous(), rot, stats, specs, seed)

    def done(result: tuple) -> None:
        name, errors = result
        p = by_name[name]
        bits = candidate_bits(p.in_features, p.out_features, specs_of.pop(name), method.uses_branch, method.rotates)
        cache[keys[name]] = [Cost(b, e) for b, e in zip(bits, errors)]
        bar.update(1)

    try:
        map_single_threaded(_predict_layer, missing, job, workers, done)
    finally:
        bar.close()
    costs = {p.name: cache[keys[p.name]] for p in todo}
    sens = layer_sensitivity(loaded, todo, {n: (chosen_from[n][0], costs[n][0].error) for n in costs}, seed, progress,
                             cache)
    if sens is not None:  # each layer's errors in units of what they do to the model's output
        costs = {n: [Cost(c.bits, c.error * sens[n]) for c in cs] for n, cs in costs.items()}
    try:
        choice = choose(costs, budget * weights)
    except ValueError:
        cheapest = sum(min(c.bits for c in costs[n]) for n in costs) / weights
        raise UserError(f"--budget {budget:g} bits per weight is below the cheapest allocation of this recipe "
                        f"({cheapest:.4f}: the largest group and no branch on every layer); raise it to at least "
                        f"{cheapest:.4f}") from None
    overrides = tuple((n, chosen_from[n][i]) for n, i in choice.items())
    used = sum(costs[n][i].bits for n, i in choice.items())
    allocated = replace(recipe, overrides=overrides, source=f"allocation of {recipe.name} at {budget:g} bits")
    summary = {"budget": budget, "bits_per_weight": round(used / weights, 6),
               "error_proxy": ("E[x_k^2]-weighted squared weight error" if any(p.input_stats for p in todo)
                               else "squared weight error (no input statistics)")
                              + (", scaled per layer by its end-to-end sensitivity on the synthetic inputs"
                                 if sens is not None else ""),
               "layers": {n: lr.name for n, lr in overrides}}
    return allocated, summary


# below this many weights to predict, starting worker processes costs more than it saves (MiniLM,
# 21M weights: ~3 s single-threaded)
POOL_MIN_WEIGHTS = 32_000_000


def _predict_layer(name: str, w_kn: torch.Tensor, rot: Optional[int], stats, specs: list, seed: int) -> tuple:
    """(name, predicted errors) of one layer, single-threaded in a worker; ``stats``: the
    input statistics when the layer is rotated (its channel weights are the rotated input's), else
    the channel weights themselves, or None."""
    if rot is not None:
        rotation = Rotation(rot)
        w_kn = rotation.rotate_weight(w_kn)
        if stats is not None:
            stats = rotate_stats(resolve_stats(stats), rotation).mean_square()
    return name, predicted_errors(w_kn, specs, stats, seed)


def _spec(recipe: Recipe, lr: LayerRecipe, target: str):
    one = replace(recipe, layer=lr, overrides=()).for_target(target)
    return one.spec_for("")


def write_allocation(path: Path, recipe: Recipe, summary: dict) -> None:
    """The allocated recipe as a recipe file (loaded again by ``--recipe``)."""
    import yaml
    d = recipe.to_dict()
    d = {k: v for k, v in d.items() if v not in ([], {})}
    header = (f"# loraq --budget {summary['budget']:g}: {summary['bits_per_weight']:.4f} bits per weight over the "
              f"quantized layers.\n# Pass this file as --recipe to fit the same allocation again (edit it freely).\n")
    path.write_text(header + yaml.safe_dump(d, sort_keys=False, width=120))
