"""Benchmark: do input statistics drawn along the model's own sampling trajectories beat those
drawn at random noise levels? Latent PSNR vs FP of the default export (recipe and budget) of a
diffusion preset, 20 DPM-Solver steps, one row per statistics source:

    python tools/bench_stats_trajectory.py                        # pixart-sigma, 1 block, seeds 0,1,2
    python tools/bench_stats_trajectory.py --num-layers 2 --trajectories 2 4

``random``: the default (16 example inputs: noise latents at uniform random timesteps).
``N trajectories``: LORAQ_STATS_TRAJECTORY=N, the FP model sampling from N noises with the
pipeline's scheduler, 16 // N steps each, its inputs at every step (models/diffusion.py,
``trajectory_batches``). Every number comes from this run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]

from loraq_export.evaluate.sampling import latent_metrics, sample_latents, torch_denoiser  # noqa: E402
from loraq_export.fit.parallel import fit_layers  # noqa: E402
from loraq_export.fit.prepare import prepare_fit  # noqa: E402
from loraq_export.fit.recipes import load_recipe, with_defaults  # noqa: E402
from loraq_export.fit.swap import quantized  # noqa: E402
from loraq_export.models import load_model  # noqa: E402


def row(model: str, num_layers: int, trajectories: int, seeds: list[int], workers: int) -> str:
    if trajectories:
        os.environ["LORAQ_STATS_TRAJECTORY"] = str(trajectories)
    else:
        os.environ.pop("LORAQ_STATS_TRAJECTORY", None)
    loaded = load_model(model, num_layers, 0, None)
    text, budget = with_defaults(None, None, "ort")
    t = time.perf_counter()
    recipe, plans, alloc = prepare_fit(loaded, load_recipe(text).for_target("ort"), 0, budget, "ort")
    prep = time.perf_counter() - t
    records = fit_layers(loaded.module, plans, recipe.method, seed=0, workers=workers, progress=False)
    fp = [sample_latents(loaded, torch_denoiser(loaded.wrapper), s) for s in seeds]
    with quantized(loaded.module, records):
        q = [sample_latents(loaded, torch_denoiser(loaded.wrapper), s) for s in seeds]
    psnr = [latent_metrics(a, b)["psnr_db"] for a, b in zip(fp, q)]
    what = f"{trajectories} trajectories" if trajectories else "random"
    return (f"| {what} | {alloc['bits_per_weight']:.4f} | {prep:.0f} | " + " / ".join(f"{p:.2f}" for p in psnr)
            + f" | {statistics.mean(psnr):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixart-sigma")
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--trajectories", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.model}, {args.num_layers} block(s), default recipe and budget, latent PSNR vs FP (dB), seeds {seeds}")
    print("| statistics | bits/weight | statistics + allocation s | PSNR per seed | mean |\n|---|---|---|---|---|")
    for n in [0, *args.trajectories]:
        print(row(args.model, args.num_layers, n, seeds, args.workers), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
