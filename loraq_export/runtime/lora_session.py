"""LoRA adapters into an exported graph's slots (``loraq export --lora-slot R``), without re-export.

    from loraq_export.runtime.lora_session import LoraSession
    s = LoraSession("out/model.onnx")
    s.set_lora("style.safetensors", scale=0.8)        # or several: s.set_lora([a, b], scale=[1, .5])
    y = s.run(None, feeds)                            # the adapter applies
    s.clear(); y0 = s.run(None, feeds)                # the base model (slots hold zeros)

The slots are ONNX Runtime overridable initializers (graphs/lora_slots.py): the session is built
once, and each ``run`` feeds the current adapter's fp16 factors under the slot names. ``slot_values``
is what ``loraq lora set`` writes into the file and ``loraq engine refit`` into a TensorRT engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx
import torch

from calibless.adapters import lora_factors
from graphs.lora_slots import SlotError, overridable
from graphs.lora_slots import slot_values as _slot_values
from graphs.qdq import lora_slots
from loraq_export.errors import UserError
from loraq_export.models.lora_files import read_lora


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def slot_values(slots: dict, files, scales=None, what: str = "this graph") -> tuple[dict, list]:
    """({initializer: fp16 array} for every slot, the adapters read) for LoRA ``files`` (one or a
    list) at ``scales`` (one per file, default 1); several adapters concatenate along the rank."""
    files = _as_list(files)
    scales = [1.0] * len(files) if scales is None else _as_list(scales)
    if len(scales) != len(files):
        raise UserError(f"{len(scales)} scales for {len(files)} LoRA files; give one scale per file")
    linears = {layer: (k, n) for layer, (k, n, _) in slots.items()}
    adapters = [read_lora(f, linears, s, f"the slots of {what}") for f, s in zip(files, scales)]
    factors: dict = {}
    for ad in adapters:
        for name, layer in ad.layers.items():
            d, u = lora_factors(layer.a, layer.b, ad.total_scaling(name))
            if name in factors:
                d, u = torch.cat([factors[name][0], d], 1), torch.cat([factors[name][1], u], 0)
            factors[name] = (d, u)
    try:
        values = _slot_values(slots, {n: (d.numpy(), u.numpy()) for n, (d, u) in factors.items()})
    except SlotError as e:
        fix = "re-export with a larger --lora-slot" if "rank" in str(e) else "use an adapter for this model"
        raise UserError(f"{e}; {fix}") from None
    return values, adapters


def graph_slots(model: onnx.ModelProto, path) -> dict:
    slots = lora_slots(model)
    if not slots:
        raise UserError(f"{path} has no LoRA slots; export it with loraq export --lora-slot RANK")
    return slots


class LoraSession:
    """An ONNX Runtime session of a slot graph whose adapter can be swapped between runs."""

    def __init__(self, model: Union[str, Path, onnx.ModelProto], session_options=None, providers: Optional[Sequence] = None):
        import onnxruntime as ort
        proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
        self.slots = graph_slots(proto, model if not isinstance(model, onnx.ModelProto) else "the model")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # ORT warns about every overridable initializer, which is the point
        self.session = ort.InferenceSession(overridable(proto, self.slots).SerializeToString(), session_options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.feeds: dict[str, np.ndarray] = {}
        self.adapters: list = []

    def set_lora(self, files, scale=None) -> None:
        """Use LoRA ``files`` (one or several) at ``scale`` (one per file) from the next run on."""
        self.feeds, ads = slot_values(self.slots, files, scale)
        self.adapters = [a.describe() for a in ads]

    def clear(self) -> None:
        """Back to the slot values stored in the file (zeros for a fresh --lora-slot export)."""
        self.feeds, self.adapters = {}, []

    def run(self, output_names, feeds: dict, run_options=None):
        return self.session.run(output_names, {**feeds, **self.feeds}, run_options)
