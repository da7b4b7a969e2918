"""Input statistics of the layers to fit, gathered in one pass of the FP model over the inputs it
builds itself (``LoadedModel.synthetic_batches``; calibless/input_stats.py says what they are and
why they are no calibration data). Layers that read the same tensor (an attention's q, k and v
projections; every cross-attention's k and v of the same text states) share one accumulator."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from calibless.input_stats import InputStats
from loraq_export.errors import UserError

STATS_SEED_OFFSET = 707  # the synthetic inputs differ from every other example input the flow draws


class _GroupDone(Exception):
    """Raised by a hook once every layer of the group has seen this batch: the rest of the forward
    would only feed layers gathered in a later pass."""


@torch.no_grad()
def collect_input_stats(module: nn.Module, names: Iterable[str], batches: list,
                        run: Callable[[tuple], object], progress: bool = False,
                        stop_early: bool = False, desc: str = "input statistics") -> dict[str, InputStats]:
    """``batches``: (inputs, token mask or None); ``run(inputs)`` calls the model. Returns each named
    Linear's statistics over the unmasked rows of its input. ``stop_early``: end each forward as
    soon as every named layer has been called (a group of layers early in the model)."""
    names = list(names)
    mods = dict(module.named_modules())
    by_name: dict[str, InputStats] = {}
    state: dict = {"mask": None, "by_input": {}, "added": set(), "seen": set()}

    def hook(name: str):
        def pre(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            # the entry holds x, so that its memory is not reused by another tensor (same key) in this batch
            stats = by_name.get(name) or state["by_input"].get(key, (None,))[0] or InputStats.empty(x.shape[-1])
            by_name[name] = stats
            state["by_input"][key] = (stats, x)
            state["seen"].add(name)
            if id(stats) not in state["added"]:  # else another layer reading this tensor already counted it
                state["added"].add(id(stats))
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                mask = state["mask"]
                stats.add(rows[mask] if mask is not None and mask.numel() == rows.shape[0] else rows, lower_only=True)
            if stop_early and len(state["seen"]) == len(names):
                raise _GroupDone
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for inputs, mask in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            state.update(mask=mask, by_input={}, added=set(), seen=set())
            try:
                run(inputs)
            except _GroupDone:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"layer {missing[0]} was never called on the synthetic inputs; exclude it or use a method "
                         "without input statistics")
    for stats in {id(s): s for s in by_name.values()}.values():
        stats.fill_upper()
    return by_name


# ----------------------------------------------------------------------------------------------
# Models whose statistics do not fit in memory at once (a 4.7B T5-XXL: 15 GB of Gram matrices)
# ----------------------------------------------------------------------------------------------
STATS_MEMORY_FRACTION = 0.3  # of the memory available when the pass starts, for one group's Grams
STATS_MEMORY_ENV = "LORAQ_STATS_MEMORY_MB"  # or this many megabytes


def stats_bytes(k: int) -> int:
    """Memory of one layer's accumulator: the float32 Gram and the float64 sum."""
    return k * k * 4 + k * 8


def stats_memory_limit() -> int:
    """Bytes one group of accumulators may take: ``$LORAQ_STATS_MEMORY_MB`` when set, else a share
    of MemAvailable (Linux), else 4 GiB."""
    env = os.environ.get(STATS_MEMORY_ENV)
    if env:
        try:
            return max(1, int(float(env) * (1 << 20)))
        except ValueError:
            raise UserError(f"{STATS_MEMORY_ENV}={env!r} is not a number of megabytes; set it to e.g. 4096 or unset it") from None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = int((4 << 30) / STATS_MEMORY_FRACTION)
    return max(64 << 20, int(avail * STATS_MEMORY_FRACTION))


def stats_groups(names: list[str], widths: dict[str, int], limit: int,
                 sharing: frozenset = frozenset()) -> list[list[str]]:
    """``names`` (in model order) cut into consecutive groups whose accumulators fit ``limit`` (a
    layer that alone exceeds it is a group of its own). A layer in ``sharing`` reads the input of an
    earlier layer (attention's q, k, v) and shares its accumulator: it costs nothing."""
    groups, size = [[]], 0
    for n in names:
        b = 0 if n in sharing else stats_bytes(widths[n])
        if groups[-1] and size + b > limit:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    return groups


class SpilledStats:
    """A layer's statistics written to disk (one group at a time): ``load()`` reads them back. The
    fit's workers load their layer's own, so the whole set is never in memory at once. The folder
    is deleted when the last handle on it goes."""

    def __init__(self, path: Path, folder, mean_square: torch.Tensor):
        self.path, self._folder, self._mean_square = path, folder, mean_square

    def load(self) -> InputStats:
        count, total, gram = torch.load(self.path, weights_only=True)
        return InputStats(int(count), total, gram)

    def mean_square(self) -> torch.Tensor:
        return self._mean_square

    def __getstate__(self):  # a worker process needs the path, not the folder's owner
        return {"path": self.path, "_folder": None, "_mean_square": self._mean_square}


def resolve_stats(stats) -> Optional[InputStats]:
    """The statistics themselves, from an ``InputStats`` or a ``SpilledStats``."""
    return stats.load() if isinstance(stats, SpilledStats) else stats


@torch.no_grad()
def layers_sharing_an_input(module: nn.Module, names: list[str], batch: tuple, run: Callable[[tuple], object]) -> frozenset:
    """The layers of ``names`` that read the same input tensor as an earlier one, seen on one
    forward of ``batch``. A tensor is known by its storage, shape, strides and sums: the probe holds
    no activations, so a freed tensor's memory may be reused, and the sums tell those apart."""
    mods = dict(module.named_modules())
    seen: dict = {}
    sharing = set()

    def hook(name: str):
        def pre(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride(), float(x.float().sum()), float(x.float().abs().sum()))
            if key in seen:
                sharing.add(name)
            else:
                seen[key] = name
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        run(batch[0])
    finally:
        for h in handles:
            h.remove()
    return frozenset(sharing)


def collect_in_groups(module: nn.Module, names: list[str], batches: list, run: Callable[[tuple], object],
                      limit: int, progress: bool = False) -> dict:
    """The statistics of ``names``, one forward pass per group of layers whose accumulators fit in
    ``limit`` bytes (each pass stops after its group's last layer), written to a temporary folder
    between groups. One group: the statistics themselves, in memory, as ``collect_input_stats``."""
    mods = dict(module.named_modules())
    widths = {n: mods[n].in_features for n in names}
    groups = stats_groups(names, widths, limit)
    if len(groups) > 1 and batches:  # one forward learns which layers share an input: fewer passes
        groups = stats_groups(names, widths, limit, layers_sharing_an_input(module, names, batches[0], run))
    if len(groups) == 1:
        return collect_input_stats(module, names, batches, run, progress)
    folder = tempfile.TemporaryDirectory(prefix="loraq-stats-")
    out: dict = {}
    for gi, group in enumerate(groups):
        stats = collect_input_stats(module, group, batches, run, progress, stop_early=True,
                                    desc=f"input statistics {gi + 1}/{len(groups)}")
        written: dict[int, SpilledStats] = {}
        for n in group:
            s = stats[n]
            if id(s) not in written:
                path = Path(folder.name) / f"{len(os.listdir(folder.name))}.pt"
                torch.save((torch.tensor(s.count), s.total, s.gram), path)
                written[id(s)] = SpilledStats(path, folder, s.mean_square())
            out[n] = written[id(s)]
        del stats, written  # this group's Grams leave memory before the next pass
    return out


def model_input_stats(loaded, names: Iterable[str], seed: int, progress: bool = False,
                      limit: Optional[int] = None) -> Optional[dict]:
    """The statistics of ``names`` over ``loaded``'s synthetic inputs (None if it builds none): in
    memory when they fit in ``limit`` bytes (default ``stats_memory_limit()``), else spilled to
    disk group by group (``SpilledStats``)."""
    if loaded.synthetic_batches is None:
        return None
    batches = loaded.synthetic_batches(seed + STATS_SEED_OFFSET)
    return collect_in_groups(loaded.module, list(names), batches, lambda inputs: loaded.wrapper(*inputs),
                             stats_memory_limit() if limit is None else limit, progress)
