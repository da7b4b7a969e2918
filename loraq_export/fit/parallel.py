"""Fitting the planned layers: in parallel across cores, resumable, sharded.

Every layer is fitted single-threaded with a seed derived from (seed, layer name), so its
result does not depend on which process or rank fitted it, nor on the order: a parallel or
distributed run is byte-identical to a single-process one.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from calibless.formats import FitSpec
from calibless.input_stats import InputStats
from calibless.methods import fit_layer, get_method
from calibless.record import LayerRecord
from loraq_export.errors import UserError
from loraq_export.fit.input_stats import resolve_stats
from loraq_export.fit.plan import LayerPlan

# jobs queued per worker process: enough to keep each busy, few enough that the weights and
# statistics shipped to them stay a small share of memory
IN_FLIGHT_PER_WORKER = 2


def layer_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def _fit_one(name: str, weight_kn: torch.Tensor, spec: FitSpec, method: str, seed: int,
             folded_by: Optional[str], input_stats: Optional[InputStats]) -> tuple[str, LayerRecord]:
    try:
        return name, fit_layer(weight_kn, spec, method, seed=layer_seed(seed, name), folded_by=folded_by,
                               input_stats=resolve_stats(input_stats))
    except ValueError as e:  # the method refusing this layer's input
        raise UserError(f"layer {name}: {e}") from None


def _worker_init():
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def fit_layers(module: nn.Module, plans: list[LayerPlan], method: str, seed: int = 0,
               workers: Optional[int] = None, progress: bool = True, done: Optional[dict] = None,
               on_fitted: Optional[Callable[[str, LayerRecord], None]] = None,
               shard: tuple[int, int] = (0, 1)) -> dict[str, LayerRecord]:
    """Fit the planned layers not already in ``done``; ``on_fitted`` is called as each finishes
    (a checkpoint writes it to disk there, which is what makes a run resumable). With
    ``shard=(rank, world)`` only every world-th planned layer from ``rank`` is fitted."""
    done = dict(done or {})
    mods = dict(module.named_modules())
    # shard over ALL planned layers, not the remaining ones: a resumed rank keeps its share
    todo = [p for p in plans if p.quantize][shard[0]::shard[1]]
    todo = [p for p in todo if p.name not in done]
    workers = min(workers or default_workers(), max(1, len(todo)))
    bar = tqdm(total=len(todo), desc=f"fitting ({method}, {workers} proc)", unit="layer", disable=not progress,
               dynamic_ncols=True)
    stats = get_method(method).uses_input_stats  # ship the statistics only to methods that read them

    def job(p: LayerPlan) -> tuple:
        # built when submitted: a float32 copy of every weight at once would double a large model's memory
        return (p.name, mods[p.name].weight.detach().float().T.contiguous(), p.spec, method, seed, p.folded_by,
                p.input_stats if stats else None)

    try:
        map_single_threaded(_fit_one, todo, job, workers, lambda r: _finish(done, *r, on_fitted, bar))
    finally:
        bar.close()
    return done


def map_single_threaded(fn: Callable, items: list, make_args: Callable, workers: int,
                        on_result: Callable) -> None:
    """``on_result(fn(*make_args(item)))`` for every item, in the order they finish: in ``workers``
    spawned processes, or in this one when 1, single-threaded either way, so that no result depends
    on the number of cores. Arguments are built as jobs are submitted (a few per worker): a copy of
    every layer's weight at once would double a large model's memory."""
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for item in items:
                on_result(fn(*make_args(item)))
        finally:
            torch.set_num_threads(threads)
        return
    ctx = mp.get_context("spawn")  # fork after torch started its thread pools can hang
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        queue, running = list(reversed(items)), set()
        while queue or running:
            while queue and len(running) < IN_FLIGHT_PER_WORKER * workers:
                running.add(pool.submit(fn, *make_args(queue.pop())))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                on_result(fut.result())


def _finish(done, name, rec, on_fitted, bar):
    done[name] = rec
    if on_fitted is not None:
        on_fitted(name, rec)
    bar.set_postfix_str(f"{name.split('.')[-1]} err {rec.stats['rel_error']:.4f}", refresh=False)
    bar.update(1)
