"""Methods registered by name. A method is a function (w, spec, act_stats, seed) -> QuantizedLinear
where ``w`` is the float weight in (in, out) layout. Adding a method is one new module here
that calls ``register_method``, plus its import below."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from calibless.formats import FitSpec
from calibless.record import QuantizedLinear, relative_error

METHODS: dict[str, Callable] = {}
BRANCH_METHODS: set[str] = set()  # methods that produce a low-rank branch


def register_method(name: str, uses_branch: bool = False):
    def deco(fn):
        METHODS[name] = fn
        if uses_branch:
            BRANCH_METHODS.add(name)
        return fn
    return deco


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def fit_layer(w: torch.Tensor, spec: FitSpec, method: str, act_stats: Optional[torch.Tensor] = None, seed: int = 0) -> QuantizedLinear:
    """Fit one layer and record the method, time and relative weight error in ``stats``."""
    fn = get_method(method)
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    if method in BRANCH_METHODS and (spec.branch is None or spec.rank < 1):
        raise ValueError(f"method {method!r} fits a low-rank branch: give the recipe a rank and branch format, e.g. -r32-w8a8")
    r = spec.rank if method in BRANCH_METHODS else 0
    if r > min(w.shape):
        raise ValueError(f"rank {r} is larger than min(in, out) = {min(w.shape)}")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            q = fn(w, spec, act_stats=act_stats, seed=seed)
    except torch.linalg.LinAlgError as e:  # e.g. an SVD overflowing float32 on huge weights
        raise ValueError(f"method {method!r} failed on this layer ({str(e).splitlines()[0]}), max |w| = "
                         f"{float(w.abs().max()):.3g}; check the weights or use --method rtn") from None
    q.method = method
    q.stats.update(seconds=time.perf_counter() - t0, rel_error=relative_error(w, q))
    if not math.isfinite(q.stats["rel_error"]):  # never write a layer that computes inf / NaN
        raise ValueError(f"the fitted layer is not finite (max |w| = {float(w.abs().max()):.3g}; a float16 branch "
                         "holds at most 65504): check the weights, or use a quantized branch format such as w8a8")
    return q


from calibless.methods import rtn, lqer, svdquant, loraq  # noqa: E402,F401  (registration)
