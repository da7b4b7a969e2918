"""``loraq bench``: every (method, recipe) pair fitted, exported, validated and measured side by
side on the user's own model, with tables and a plot of quality against bits.

A method without a branch uses a recipe's main format only (the ``-r<rank>-<branch>`` part is
dropped), HQQ is asymmetric by definition (its recipe gets ``-asym``), so pairs that collapse
to the same thing are computed once. Bad input (an unknown method, a malformed recipe, a branch
method with a recipe that has no branch, a format a peer cannot express, a rank a layer cannot
take) fails before any fitting, with one line and no output directory.

Each finished pair is stored at once (store/bench_pairs.py): a re-run with the same ``--out``
skips it. Under torchrun each rank takes every world-th pair of the grid, and rank 0 gathers the
rows and writes the results.
"""
from __future__ import annotations

import hashlib

import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from calibless.methods import METHODS
from loraq_export import __version__
from loraq_export.errors import UserError
from loraq_export.evaluate.peers import PEER_METHODS, check_peer_format
from loraq_export.fit.distributed import Dist
from loraq_export.fit.recipes import LayerRecipe, load_recipe, parse_layer_recipe

ASYMMETRIC_ONLY = ("hqq",)  # HQQ solves for a zero point: published and benched on asymmetric grids
DEFAULT_METHODS = "rtn,hqq,ort-rtn,lqer,svdquant,loraq"
DEFAULT_RECIPES = "w4a16-g128-r16-w4a16-asym,w4a16-g64-r32-w8a8,w4a16-g32-r16-w4a16-asym"


@dataclass
class BenchOptions:
    model: Optional[str] = None
    methods: str = DEFAULT_METHODS
    recipes: str = DEFAULT_RECIPES
    out: Path = Path("loraq-bench")
    num_layers: Optional[int] = None
    seed: int = 0
    workers: Optional[int] = None
    latency: bool = False
    budgets: Optional[str] = None  # comma-separated bits per weight: each method x recipe also allocated at each
    sentences: Optional[Path] = None  # sentence encoders: a text file, one sentence per line (default: bundled)
    progress: bool = True
    command: str = "loraq bench"


@dataclass
class Pair:
    method: str
    recipe: str  # what it is fitted with: canonical, main only for a method without a branch
    requested: list = field(default_factory=list)  # the --recipes entries it stands for


def _names(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))


def all_methods() -> list[str]:
    return sorted(METHODS) + list(PEER_METHODS)


def main_only(lr: LayerRecipe) -> str:
    """The recipe without its ``-r<rank>-<branch>`` part."""
    tokens = lr.name.split("-")
    for i, t in enumerate(tokens):
        if t.startswith("r") and t[1:].isdigit():
            tokens = tokens[:i] + tokens[i + 2:]
            break
    return "-".join(tokens)


def fitted_recipe(method: str, lr: LayerRecipe) -> str:
    """The recipe a method is fitted with, for the recipe the user asked for."""
    if method in METHODS and METHODS[method].uses_branch:
        if lr.branch is None:
            raise UserError(f"pair {method} x {lr.name}: method {method!r} fits a low-rank branch but the recipe has "
                            "none; give every recipe a branch (e.g. w4a16-g64-r32-w8a8: methods without one use its "
                            "main format) or bench branch methods separately")
        return lr.name
    name = main_only(lr)
    if method in ASYMMETRIC_ONLY and not name.endswith("-asym"):
        name += "-asym"
    fitted = parse_layer_recipe(name)
    if method in PEER_METHODS:
        if fitted.main.act.enabled or getattr(fitted, "rotation", None):
            raise UserError(f"pair {method} x {lr.name}: ONNX Runtime's quantizer is weight-only and does not "
                            f"rotate; use a w4a16 recipe without -had")
        check_peer_format(method, fitted.main.weight, lr.name)
    return fitted.name


def parse_budgets(text: Optional[str]) -> list[float]:
    import math
    out = []
    for b in ([] if text is None else _names(text, "budget")):
        try:
            v = float(b)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--budget {b!r} is not a positive number of bits per weight; e.g. --budget 4.56,4.8,5.125")
        out.append(v)
    return out


BUDGET_SEP = "@"  # a pair's recipe "<recipe>@<bits>": that recipe's formats allocated per layer under the budget


def build_grid(methods: str, recipes: str, budgets: Optional[str] = None) -> list[Pair]:
    """Pairs in method order, then recipe order (then budgets); collapsed pairs listed once. With
    budgets, every calibless method also gets each recipe allocated under each budget (``r@b``); a
    recipe entry written ``r@b`` is allocated under b only. ONNX Runtime's quantizer has no per-layer
    allocation and keeps the plain recipes. No model needed."""
    known = all_methods()
    ms = _names(methods, "methods")
    unknown = [m for m in ms if m not in known]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(known)}")
    bs = parse_budgets(budgets)
    pairs: dict[tuple, Pair] = {}

    def add(m: str, name: str) -> None:
        pairs.setdefault((m, name), Pair(m, name)).requested.append(entry)

    for m in ms:
        for entry in _names(recipes, "recipes"):
            text, sep, own = entry.partition(BUDGET_SEP)
            lr = parse_layer_recipe(text)
            if sep:  # <recipe>@<bits>: this recipe allocated under that budget only
                if m not in PEER_METHODS:
                    add(m, f"{fitted_recipe(m, lr)}{BUDGET_SEP}{parse_budgets(own)[0]:g}")
                continue
            add(m, fitted_recipe(m, lr))
            for b in bs if m not in PEER_METHODS else []:
                add(m, f"{fitted_recipe(m, lr)}{BUDGET_SEP}{b:g}")
    return list(pairs.values())


def plan_pair(loaded, pair: Pair, seed: int = 0, cache: Optional[dict] = None):
    """(recipe, plans) of a pair; ``cache`` keeps the input statistics and layer sensitivities that
    every pair shares (the bench never folds, so the model does not change between pairs)."""
    from loraq_export.fit.prepare import prepare_fit
    name, _, budget = pair.recipe.partition(BUDGET_SEP)
    # the bench exports for ONNX Runtime: symmetric grids use its signed scales
    recipe = load_recipe(name, "rtn" if pair.method in PEER_METHODS else pair.method).for_target("ort")
    cache = {} if cache is None else cache
    recipe, plans, _ = prepare_fit(loaded, recipe, seed, float(budget) if budget else None, "ort", fold=False,
                                   stats=cache.setdefault("stats", {}), allocation_cache=cache.setdefault("allocation", {}))
    return recipe, plans


def identity(opts: BenchOptions, loaded, texts: Optional[list[str]] = None) -> dict:
    """What a bench directory's pairs were measured on (``texts``: the --sentences, if any)."""
    src = {k: v for k, v in loaded.source.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"model": opts.model or "minilm", "source": src, "num_layers": opts.num_layers, "seed": opts.seed,
            "loraq_version": __version__,
            "sentences": None if texts is None else hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]}


def read_sentences(path: Optional[Path]) -> Optional[list[str]]:
    """The non-empty lines of ``path`` (None: the bundled sentences)."""
    if path is None:
        return None
    try:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--sentences {path}: cannot read it ({e.__class__.__name__}); pass a UTF-8 text file, "
                        "one sentence per line") from None
    if len(texts) < 2:
        raise UserError(f"--sentences {path}: needs at least 2 non-empty lines (one sentence per line)")
    return texts


def versions_and_machine() -> tuple[dict, dict]:
    import onnx
    import onnxruntime
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ({"loraq": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "onnx": onnx.__version__, "python": platform.python_version()},
            {"cpu": cpu, "cores": cores, "platform": platform.platform()})


def _measure(ctx, pair: Pair, recipe, plans) -> dict:
    from loraq_export.evaluate.bench_rows import measure_method, measure_ort_rtn
    if pair.method == "ort-rtn":
        return measure_ort_rtn(ctx, pair.recipe, recipe.layer.main.weight, plans)
    return measure_method(ctx, pair.method, pair.recipe, plans)


def _gather(dist: Dist, rows: list[dict]) -> list[dict]:
    if not dist.active:
        return rows
    import torch.distributed as tdist
    parts = [None] * dist.world if dist.is_main else None
    tdist.gather_object(rows, parts, dst=0)
    return [r for p in parts for r in p] if dist.is_main else rows


def run_bench(opts: BenchOptions, echo=print) -> Optional[dict]:
    from loraq_export.commands.bench_report import write_results
    from loraq_export.models import load_model
    from loraq_export.store.bench_pairs import BenchDir
    grid = build_grid(opts.methods, opts.recipes, opts.budgets)  # names and recipes first: no model loaded for a typo
    texts = read_sentences(opts.sentences)
    dist = Dist.from_env()
    try:
        loaded = load_model(opts.model, opts.num_layers, opts.seed)
        if opts.sentences is not None and loaded.kind != "bert":
            raise UserError(f"--sentences applies to sentence encoders; {loaded.name} is a {loaded.kind} model "
                            "(its quality is measured on sampled latents): drop --sentences")
        cache = {}
        planned = {(p.method, p.recipe): plan_pair(loaded, p, opts.seed, cache) for p in grid}  # before fitting
        store = BenchDir(opts.out, identity(opts, loaded, texts))
        store.check()
        dist.barrier()
        if dist.is_main:
            store.start()
        dist.barrier()
        mine = grid[dist.rank::dist.world]
        todo = [p for p in mine if store.finished(p.method, p.recipe) is None]
        rows = [dict(store.finished(p.method, p.recipe), requested=p.requested) for p in mine if p not in todo]
        if todo:
            rows += _run_pairs(loaded, opts, store, todo, planned, dist, texts)
        rows = _gather(dist, rows)
        if not dist.is_main:
            return None
        for row in rows:
            if store.finished(row["method"], row["recipe"]) is None:
                store.save(row)  # rows of ranks on other hosts (no shared filesystem)
        return write_results(opts, loaded, rows, echo)
    finally:
        dist.close()


def _run_pairs(loaded, opts: BenchOptions, store, todo: list[Pair], planned: dict, dist: Dist,
               texts: Optional[list[str]] = None) -> list[dict]:
    from loraq_export.evaluate.bench_rows import make_context
    from loraq_export.evaluate.end_to_end import build_reference
    from loraq_export.export.onnx_export import export_graph, save_onnx
    workers = opts.workers if not dist.active else (opts.workers or 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loraq-bench-fp-") as tmp:
        fp_onnx = None
        if opts.latency or any(p.method in PEER_METHODS for p in todo):
            fp_onnx = Path(tmp) / "model_fp.onnx"
            save_onnx(export_graph(loaded, loaded.make_inputs(seed=opts.seed, batch=2))[0], fp_onnx)
        ctx = make_context(loaded, build_reference(loaded, opts.seed, texts), opts.seed,
                           workers, opts.latency, fp_onnx)
        bar = tqdm(todo, desc=f"bench ({len(todo)} pairs)", unit="pair", disable=not (opts.progress and dist.is_main),
                   dynamic_ncols=True)
        for pair in bar:
            bar.set_postfix_str(f"{pair.method} {pair.recipe}", refresh=True)
            row = _measure(ctx, pair, *planned[(pair.method, pair.recipe)])
            store.save(row)
            rows.append(dict(row, requested=pair.requested))
            e = row["e2e_error"]
            bar.write(f"  {pair.method:>9} {pair.recipe:<28} {row['bits_per_weight']:.3f} b/w  "
                      f"weight err {row['weight_error']['mean']:.4f}  1-cos {'n/a' if e is None else f'{e:.4g}'}  "
                      f"fit {row['timings_s'].get('fit', 0):.1f} s")
        bar.close()
    return rows
