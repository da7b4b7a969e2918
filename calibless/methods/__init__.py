"""Methods registered by name, each with a typed options dataclass.

A method is a function ``(w, spec, seed) -> LayerRecord`` where ``w`` is the float weight in
(in, out) layout and ``spec.options`` an instance of the options class it registered. Adding a
method is one new module here that calls ``register_method``, plus its import at the bottom.
Options come from users as a mapping (recipe files: ``options: {steps: 100}``) and are read by
``method_options``: an unknown key or a value of the wrong type is one clear error, never ignored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from calibless.config import ConfigError, from_dict
from calibless.formats import FitSpec
from calibless.input_stats import InputStats, rotate_stats
from calibless.record import LayerRecord, relative_error
from calibless.rotation import Rotation, rotation_block


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that takes none."""


@dataclass(frozen=True)
class Method:
    name: str
    fit: Callable[..., LayerRecord]
    options: type
    uses_branch: bool  # fits a low-rank branch (a recipe for it must give one, at least for some layers)
    rotates: bool  # chooses its own input rotation (else the recipe's -had<B>, applied here, if any)
    # how a branch method fits a layer that its recipe gives no branch (rank 0, e.g. in a budget
    # allocation); None: round to nearest
    without_branch: Optional[Callable[..., LayerRecord]] = None
    uses_input_stats: bool = False  # takes ``input_stats`` (calibless/input_stats.py): the layer's input statistics


METHODS: dict[str, Method] = {}


def register_method(name: str, options: type = NoOptions, uses_branch: bool = False, rotates: bool = False,
                    without_branch: Optional[Callable[..., LayerRecord]] = None, uses_input_stats: bool = False):
    def deco(fn):
        METHODS[name] = Method(name, fn, options, uses_branch, rotates, without_branch, uses_input_stats)
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_options(name: str, raw: Optional[dict] = None):
    """The typed options of method ``name`` from a user's mapping (None: the defaults)."""
    method = get_method(name)
    try:
        return from_dict(method.options, dict(raw or {}), f"options of method {name!r}")
    except ConfigError as e:
        raise ValueError(str(e)) from None


def fit_layer(w: torch.Tensor, spec: FitSpec, method: str, seed: int = 0,
              folded_by: Optional[str] = None, input_stats: Optional[InputStats] = None) -> LayerRecord:
    """Fit one layer and record the method, time and relative weight error in ``stats``.

    With ``spec.rotation`` the weight is rotated offline (H^T W, blocks of
    ``rotation_block(spec.rotation, in_features)``) and the method fits that; the record carries
    the rotation, applied online to the input. ``folded_by`` names the producer
    layer that already applies it: ``w`` is then the model's weight, already rotated (see
    loraq_export/fit/folds.py), and the rotation is recorded, not applied. ``input_stats``: the
    statistics of the layer's (unrotated, or already folded) input, for methods that take them."""
    m = get_method(method)
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    if spec.options is None:
        spec = replace(spec, options=m.options())
    elif not isinstance(spec.options, m.options):
        raise ValueError(f"method {method!r} takes {m.options.__name__}, got {type(spec.options).__name__}")
    fit = m.fit
    if m.uses_branch and (spec.branch is None or spec.rank < 1):
        spec = replace(spec, rank=0, branch=None)
        fit = m.without_branch or METHODS["rtn"].fit
    r = spec.rank if m.uses_branch else 0
    if r > min(w.shape):
        raise ValueError(f"rank {r} is larger than min(in, out) = {min(w.shape)}")
    if folded_by is not None and (m.rotates or spec.rotation is None):
        raise ValueError(f"method {method!r}: a folded rotation needs the recipe's -had<B> and a method that does "
                         "not choose its own rotation")
    block = None if spec.rotation is None else rotation_block(spec.rotation, w.shape[0])
    if block == 1:
        raise ValueError(f"-had{spec.rotation}: in_features {w.shape[0]} is odd, no Hadamard block (a power of two "
                         "from 2) divides it")
    if input_stats is not None and input_stats.total.shape[0] != w.shape[0]:
        raise ValueError(f"input statistics are {input_stats.total.shape[0]} wide, the layer has {w.shape[0]} inputs")
    takes_stats = m.uses_input_stats and (fit is m.fit or fit is m.without_branch)
    kwargs = {"input_stats": input_stats} if takes_stats else {}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            if folded_by is not None:  # the model's weight is already in the rotated basis
                q = fit(w, spec, seed=seed, **kwargs)
                q.rotation = Rotation(block, folded=folded_by)
            elif spec.rotation is not None and not m.rotates:
                rot = Rotation(block)
                if kwargs.get("input_stats") is not None:
                    kwargs["input_stats"] = rotate_stats(input_stats, rot)
                q = fit(rot.rotate_weight(w), spec, seed=seed, **kwargs)
                q.rotation = rot
            else:
                q = fit(w, spec, seed=seed, **kwargs)
    except torch.linalg.LinAlgError as e:  # e.g. an SVD overflowing float32 on huge weights
        raise ValueError(f"method {method!r} failed on this layer ({str(e).splitlines()[0]}), max |w| = "
                         f"{float(w.abs().max()):.3g}; check the weights or use --method rtn") from None
    q.method = method
    q.stats.update(seconds=time.perf_counter() - t0, rel_error=relative_error(w, q))
    if not math.isfinite(q.stats["rel_error"]):  # never write a layer that computes inf / NaN
        raise ValueError(f"the fitted layer is not finite (max |w| = {float(w.abs().max()):.3g}; a float16 branch "
                         "holds at most 65504): check the weights, or use a quantized branch format such as w8a8")
    return q


from calibless.methods import rtn, lqer, svdquant, loraq, lopro  # noqa: E402,F401  (registration)
from calibless.methods import hqq  # noqa: E402,F401  (registration: HQQ)
from calibless.methods import lrq  # noqa: E402,F401  (registration: LRQ)
from calibless.methods import gptq  # noqa: E402,F401  (registration: GPTQ on synthetic input statistics)
