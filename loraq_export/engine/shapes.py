"""Input shapes for a TensorRT engine: one optimization profile (min / opt / max per dynamic
input) derived from the ONNX graph's symbolic dims, the equivalent ``trtexec`` command lines,
and feeds at the profile's opt shape for compare and bench. Needs no TensorRT.

TensorRT builds an engine for a range of shapes given per dynamic input as min, opt (the shape
its tactics are timed at) and max (``trtexec --minShapes/--optShapes/--maxShapes``; NVIDIA,
TensorRT developer guide, "Working with Dynamic Shapes", and ``samples/trtexec/README.md``).
loraq's exports name their dynamic dims (loraq_export/models): MiniLM ``batch`` and
``sequence``; the diffusion transformers ``batch``, ``text_len`` and, for SANA, ``height`` and
``width``. DIM_RANGES gives each a range fit for its model; ``--shapes DIM=MIN:OPT:MAX``
overrides any, and a dim not in the table must be given that way.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from graphs.runtime import input_specs, random_feed
from loraq_export.errors import UserError

# (min, opt, max) per symbolic dim name, as loraq's exports name them.
DIM_RANGES = {
    "batch": (1, 1, 8),  # one request at a time is the edge case; up to 8 batched
    "sequence": (1, 128, 512),  # BERT: 512 positions (max_position_embeddings); 128 is MiniLM's export length
    "text_len": (1, 300, 300),  # PixArt-Sigma and SANA pad captions to 300 tokens (max_sequence_length)
    "height": (16, 32, 64),  # SANA latents (DC-AE, 32x down): 512 px -> 16, 1024 px -> 32, 2048 px -> 64
    "width": (16, 32, 64),
}
# Diffusion pipelines run the transformer on [uncond, cond] together (classifier-free guidance).
DIFFUSION_BATCH = (1, 2, 4)
DIFFUSION_INPUTS = {"hidden_states", "timestep", "encoder_hidden_states"}
_SPEC = re.compile(r"^([A-Za-z_][\w.]*)=(\d+)(?::(\d+):(\d+))?$")


@dataclass(frozen=True)
class Profile:
    """Per input name: (min shape, opt shape, max shape); static inputs are left out."""

    shapes: dict

    def at(self, which: int) -> dict:
        """{input: shape} at min (0), opt (1) or max (2)."""
        return {name: s[which] for name, s in self.shapes.items()}


def parse_shapes(items: Optional[list]) -> dict:
    """``["batch=1:2:4", "sequence=128"]`` -> {"batch": (1, 2, 4), "sequence": (128, 128, 128)}."""
    out = {}
    for item in items or []:
        m = _SPEC.match(item.strip())
        if not m:
            raise UserError(f"--shapes {item!r}: expected DIM=MIN:OPT:MAX or DIM=N, e.g. batch=1:1:8 sequence=128")
        lo, opt, hi = (int(m.group(2)),) * 3 if m.group(3) is None else (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"--shapes {item!r}: need 1 <= MIN <= OPT <= MAX")
        out[m.group(1)] = (lo, opt, hi)
    return out


def derive_profile(model: onnx.ModelProto, overrides: Optional[dict] = None) -> Profile:
    """The optimization profile of ``model``'s dynamic inputs (see the module docstring)."""
    specs = input_specs(model)
    ranges = dict(DIM_RANGES)
    if DIFFUSION_INPUTS <= {name for name, _, _ in specs}:
        ranges["batch"] = DIFFUSION_BATCH
    ranges.update(overrides or {})
    named = {d for _, _, dims in specs for d in dims if isinstance(d, str)}
    unused = sorted(set(overrides or {}) - named)
    if unused:
        raise UserError(f"--shapes names {', '.join(unused)}, which no input of the model has; "
                        f"its dynamic dims are {', '.join(sorted(named)) or 'none'}")
    shapes = {}
    for name, _, dims in specs:
        if all(isinstance(d, int) for d in dims):
            continue
        unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise UserError(f"input {name} has dynamic dim {unknown[0] or '(unnamed)'!r} with no known range; "
                            f"pass --shapes {unknown[0] or 'DIM'}=MIN:OPT:MAX")
        shapes[name] = tuple(tuple(d if isinstance(d, int) else ranges[d][i] for d in dims) for i in range(3))
    return Profile(shapes)


def _shape_list(shapes: dict) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def trtexec_build_command(onnx_path: Path, plan: Path, profile: Profile, timing_cache: Path) -> str:
    """The trtexec line that builds the same engine: strongly typed, no precision flags."""
    args = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped"]
    if profile.shapes:
        args += [f"--minShapes={_shape_list(profile.at(0))}", f"--optShapes={_shape_list(profile.at(1))}",
                 f"--maxShapes={_shape_list(profile.at(2))}"]
    args += [f"--saveEngine={plan}", f"--timingCacheFile={timing_cache}"]
    return shlex.join(args)


def trtexec_timing_command(plan: Path, profile: Profile) -> str:
    """The trtexec line that times the engine at the opt shapes: GPU compute time percentiles."""
    args = ["trtexec", f"--loadEngine={plan}"]
    if profile.shapes:
        args.append(f"--shapes={_shape_list(profile.at(1))}")
    args += ["--warmUp=500", "--iterations=200", "--useCudaGraph", "--noDataTransfers", "--useSpinWait",
             "--percentile=50,90,99"]
    return shlex.join(args)


def feeds_at(model: onnx.ModelProto, shapes: dict, seed: int = 0) -> dict:
    """One feed at ``shapes`` ({input: shape}; static inputs at their own): standard normal
    floats, and ones for integer inputs (token id 1, attention masks all on)."""
    specs = []
    for name, dt, dims in input_specs(model):
        shape = shapes.get(name, dims)
        if not all(isinstance(d, int) for d in shape):
            raise UserError(f"input {name} has no shape to run at; pass --shapes for its dims {dims}")
        specs.append((name, dt, shape))
    return random_feed(specs, np.random.default_rng(seed), int_value=1)
