"""Benchmark: wall time of fitting a whole model with the default LoRaQ recipe, and the ratio
of LoRaQ's per-layer time to one SVD of the same layer.

    python tools/bench_fit.py                      # full-size pixart-sigma (28 blocks, 280 layers)
    python tools/bench_fit.py --num-layers 2       # a quick look
    python tools/bench_fit.py --model sana-600m --recipe w4a4-g64-r32-w8a8

Prints a markdown table per layer shape (count, median LoRaQ seconds per layer measured inside
the worker, one full SVD of that layer's weight, ratio) and the end-to-end wall time with the
number of worker processes. Every number comes from this run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from loraq_export.fitting import default_workers, fit_layers, plan_layers
from loraq_export.models import load_model
from loraq_export.recipes import load_recipe


def svd_seconds(w: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.linalg.svd(w, full_matrices=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixart-sigma")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--method", default="loraq")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    loaded = load_model(args.model, args.num_layers)
    recipe = load_recipe(args.recipe, args.method)
    plans = plan_layers(loaded, recipe)
    load_s = time.perf_counter() - t0
    workers = args.workers or default_workers()
    print(f"model {args.model} ({sum(p.quantize for p in plans)} layers to fit), recipe {recipe.name}, "
          f"method {recipe.method}, {workers} worker processes, torch {torch.__version__}", flush=True)
    t1 = time.perf_counter()
    records = fit_layers(loaded, plans, recipe.method, workers=workers, progress=True)
    wall = time.perf_counter() - t1

    by_shape = defaultdict(list)
    for p in plans:
        if p.quantize:
            by_shape[(p.in_features, p.out_features)].append(records[p.name].stats["seconds"])
    mods = dict(loaded.module.named_modules())
    torch.set_num_threads(1)  # the fits run single-threaded: compare like with like
    print("\n| layer (in x out) | layers | LoRaQ s/layer (median) | one SVD s (1 thread) | LoRaQ / SVD |")
    print("|---|---|---|---|---|")
    for shape, secs in sorted(by_shape.items()):
        name = next(p.name for p in plans if p.quantize and (p.in_features, p.out_features) == shape)
        svd = svd_seconds(mods[name].weight.detach().float())
        med = statistics.median(secs)
        print(f"| {shape[0]} x {shape[1]} | {len(secs)} | {med:.2f} | {svd:.2f} | {med / svd:.2f} |")
    errs = [r.stats["rel_error"] for r in records.values()]
    print(f"\nfit wall time: {wall:.1f} s ({wall / 60:.2f} min) for {len(records)} layers with {workers} processes; "
          f"model build/load {load_s:.1f} s; mean relative weight error {sum(errs) / len(errs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
