"""``loraq quantize``: fit every selected layer and write a checkpoint; resumable, shardable."""
from __future__ import annotations

import time
from pathlib import Path

from loraq_export.errors import UserError
from loraq_export.fit.distributed import Dist
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.allocation import write_allocation
from loraq_export.fit.prepare import prepare_fit
from loraq_export.fit.recipes import load_recipe, with_defaults
from loraq_export.commands.lora import check_lora_options, join_adapters, read_user_adapters
from loraq_export.commands.source import check_budget
from loraq_export.models import load_model
from loraq_export.report import ALLOCATION_FILE
from loraq_export.report import build_report, format_summary
from loraq_export.store.checkpoint import quantization_config, write_checkpoint
from loraq_export.store.outputs import check_output_dir, staged_dir, write_json_atomic
from loraq_export.store.resume import PartialRun


def fp_source(opts) -> dict:
    model = opts.model
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    out = {"model": model, "num_layers": opts.num_layers}
    if opts.component is not None:
        out["component"] = opts.component  # absent otherwise: checkpoints of single models stay byte-identical
    return out


def run_identity(opts, recipe, loaded) -> dict:
    src = {k: v for k, v in loaded.source.items() if isinstance(v, (str, int, float, bool, type(None)))}
    out = {"model": opts.model or "minilm", "source": src, "recipe": recipe.to_dict(), "seed": opts.seed,
           "num_layers": opts.num_layers}
    if opts.component is not None:
        out["component"] = opts.component
    return out


def fit_checkpointable(opts, dist: Dist):
    """Load, plan and fit with resume and sharding; returns (loaded, recipe, plans, records, times, partial)."""
    times = {}
    t = time.perf_counter()
    text, budget = with_defaults(opts.recipe, opts.budget, opts.target)
    recipe = load_recipe(text, opts.method).for_target(opts.target)
    check_budget(budget)
    problem = None
    if dist.is_main:
        try:
            check_output_dir(opts.out, opts.overwrite)
        except UserError as e:
            problem = str(e)
    dist.broadcast_error(problem)
    loaded = load_model(opts.model, opts.num_layers, opts.seed, opts.component)
    adapters = read_user_adapters(opts, loaded)  # a bad adapter fails before minutes of fitting
    times["load"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    workers = opts.workers if not dist.active else (opts.workers or 1)
    recipe, plans, allocation = prepare_fit(loaded, recipe, opts.seed, budget, opts.target,
                                            opts.progress and dist.is_main, workers=workers)
    times["prepare"] = round(time.perf_counter() - t, 3)
    partial = PartialRun(opts.out, run_identity(opts, recipe, loaded))
    done = partial.load()
    dist.barrier()  # every rank has read the partial state before anyone writes to it
    if dist.is_main:
        partial.start()
    dist.barrier()
    t = time.perf_counter()
    records = fit_layers(loaded.module, plans, recipe.method, seed=opts.seed, workers=workers,
                         progress=opts.progress and dist.is_main, done=done, on_fitted=partial.save,
                         shard=(dist.rank, dist.world))
    times["fit"] = round(time.perf_counter() - t, 3)
    records = dist.gather_records(records)
    return loaded, recipe, plans, records, times, partial, allocation, adapters


def run_quantize(opts, echo=print) -> dict:
    dist = Dist.from_env()
    try:
        check_lora_options(opts)
        loaded, recipe, plans, records, times, partial, allocation, adapters = fit_checkpointable(opts, dist)
        if not dist.is_main:
            return {}
        records, lora_report = join_adapters(opts, loaded, records, adapters)
        skipped = {p.name: p.reason for p in plans if not p.quantize}
        t = time.perf_counter()
        with staged_dir(opts.out, opts.overwrite) as stage:
            qconfig = quantization_config(recipe, opts.seed, records, skipped, fp_source(opts), opts.target)
            if lora_report:
                qconfig["lora"] = {k: lora_report[k] for k in ("adapters", "storage_format", "merged_in_float")}
            write_checkpoint(stage, loaded, records, qconfig)
            times["write"] = round(time.perf_counter() - t, 3)
            report = build_report(loaded, recipe, plans, records, times, opts.seed, stage, allocation=allocation)
            if allocation is not None:
                write_allocation(stage / ALLOCATION_FILE, recipe, allocation)
            if lora_report:
                report["lora"] = lora_report
            report["distributed"] = {"world_size": dist.world, "backend": "gloo" if dist.active else None}
            write_json_atomic(stage / "report.json", report)
        partial.remove()
        echo(format_summary(report, Path(opts.out)))
        return report
    finally:
        dist.close()
