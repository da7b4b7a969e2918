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
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

from docs_section import publish  # noqa: E402
from loraq_export.fit.parallel import default_workers, fit_layers  # noqa: E402
from loraq_export.fit.prepare import prepare_fit  # noqa: E402
from loraq_export.fit.recipes import load_recipe  # noqa: E402
from loraq_export.models import load_model  # noqa: E402


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
    ap.add_argument("--write-docs", action="store_true", help="also write the result into docs/benchmarks.md")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    loaded = load_model(args.model, args.num_layers)
    recipe = load_recipe(args.recipe, args.method)
    load_s = time.perf_counter() - t0
    t_prep = time.perf_counter()
    recipe, plans, _ = prepare_fit(loaded, recipe, seed=0)  # what export/quantize do: folds, input statistics
    prepare_s = time.perf_counter() - t_prep
    workers = args.workers or default_workers()
    print(f"model {args.model} ({sum(p.quantize for p in plans)} layers to fit), recipe {recipe.name}, "
          f"method {recipe.method}, {workers} worker processes, torch {torch.__version__}", flush=True)
    t1 = time.perf_counter()
    records = fit_layers(loaded.module, plans, recipe.method, workers=workers, progress=True)
    wall = time.perf_counter() - t1

    by_shape = defaultdict(list)
    for p in plans:
        if p.quantize:
            by_shape[(p.in_features, p.out_features)].append(records[p.name].stats["seconds"])
    mods = dict(loaded.module.named_modules())
    torch.set_num_threads(1)  # the fits run single-threaded: compare like with like
    lines = ["| layer (in x out) | layers | LoRaQ s/layer (median) | one SVD s (1 thread) | LoRaQ / SVD |",
             "|---|---|---|---|---|"]
    for shape, secs in sorted(by_shape.items()):
        name = next(p.name for p in plans if p.quantize and (p.in_features, p.out_features) == shape)
        svd = svd_seconds(mods[name].weight.detach().float())
        med = statistics.median(secs)
        lines.append(f"| {shape[0]} x {shape[1]} | {len(secs)} | {med:.2f} | {svd:.2f} | {med / svd:.2f} |")
    errs = [r.stats["rel_error"] for r in records.values()]
    lines += ["", f"fit wall time: {wall:.1f} s ({wall / 60:.2f} min) for {len(records)} layers with {workers} processes; "
                  f"model build/load {load_s:.1f} s; input statistics and folds {prepare_s:.1f} s; mean relative weight error {sum(errs) / len(errs):.4f}"]
    publish("\n".join(lines), f"bench_fit-{args.model}" if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
