"""What every model source hands to the rest of the flow."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class LoadedModel:
    """A model ready to quantize and export.

    ``module`` is the model itself (eval mode, float32); ``wrapper`` calls it with positional
    tensors in ``input_names`` order and returns the single tensor named ``output_names[0]``:
    it is what ``torch.onnx.export`` sees, so the ONNX graph keeps the model's natural interface.
    ``make_inputs(seed, batch, seq)`` returns example inputs in ``input_names`` order (``seq`` is
    the token count: sentence length, or image tokens for a diffusion transformer).
    ``select(name, linear)`` returns (quantize?, reason) for the default layer selection.
    ``synthetic_batches(seed)`` returns a list of (inputs, token mask or None) the model's input
    statistics are gathered on (fit/input_stats.py): inputs the model builds itself, never a
    dataset; the mask marks the rows that are real tokens (not padding).
    ``linear_root`` is the prefix of the module names that layer patterns are matched against
    (names are relative to ``module``).
    """

    name: str
    kind: str  # "bert", "pixart", "sana", ...
    module: nn.Module
    wrapper: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    make_inputs: Callable[..., tuple[torch.Tensor, ...]]
    select: Callable[[str, nn.Linear], tuple[bool, str]]
    source: dict = field(default_factory=dict)  # provenance for the report (path, preset, class, seed)
    synthetic_batches: Optional[Callable[[int], list]] = None
    # node-name regular expression -> why: what a float16 graph keeps in float32 because the model
    # itself computes it in float32 (graphs/float16.py; T5's wo projections)
    float32_regions: dict = field(default_factory=dict)


def names_preset(name, names, path=None) -> bool:
    """``name`` is one of the preset ``names`` and no folder ``path`` (default: ``name``) exists:
    a local folder that happens to share a preset's name (``./pixart-sigma``) is loaded as the folder."""
    import os

    return name is not None and name in names and not os.path.isdir(path if path is not None else name)
