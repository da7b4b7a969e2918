"""Run-time LoRA slots in an exported graph: find them, fill them, make them overridable.

A slot is a layer's adapter term written by graphs.qdq with float16 factors and float
activations: initializers ``<layer>.lora_down`` (K, r) and ``<layer>.lora_up`` (r, N), listed in
the model metadata ``loraq.lora_slots`` (layer -> [K, N, r]). Filling a slot replaces those two
initializers' values; an adapter of lower rank is zero-padded (x [D | 0] [U ; 0] = x D U), a
higher one does not fit. Slots no adapter names are set to zero (they add exactly +0).

ONNX Runtime: an initializer that is also a graph input is "overridable": a value fed to
``run()`` under its name replaces it for that call (onnxruntime/capi/
onnxruntime_inference_collection.py, ``InferenceSession.get_overridable_initializers``).
``overridable`` lists the slots as graph inputs for that.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphs.protos import copy_model
from graphs.qdq import lora_slots

FP16_MAX = float(np.finfo(np.float16).max)


def slot_names(layer: str) -> tuple[str, str]:
    return f"{layer}.lora_down", f"{layer}.lora_up"


class SlotError(ValueError):
    pass


def slot_values(slots: dict, factors: dict) -> dict[str, np.ndarray]:
    """{initializer name: float16 array} for every slot: ``factors`` (layer -> (down (K, r),
    up (r, N)), float, scales folded in) zero-padded to the slot's rank; zeros elsewhere."""
    unknown = sorted(set(factors) - set(slots))
    if unknown:
        raise SlotError(f"layer {unknown[0]} has no adapter slot in this graph (only quantized layers have one)")
    out = {}
    for layer, (k, n, rank) in slots.items():
        down_name, up_name = slot_names(layer)
        down, up = np.zeros((k, rank), np.float16), np.zeros((rank, n), np.float16)
        if layer in factors:
            d, u = (np.asarray(f, np.float32) for f in factors[layer])
            r = d.shape[1]
            if d.shape != (k, r) or u.shape != (r, n):
                raise SlotError(f"layer {layer}: adapter factors {d.shape} x {u.shape} do not fit the slot's {k}x{n}")
            if r > rank:
                raise SlotError(f"layer {layer}: adapter rank {r} exceeds the slot's rank {rank}")
            big = max(float(np.abs(d).max(initial=0)), float(np.abs(u).max(initial=0)))
            if big > FP16_MAX:
                raise SlotError(f"layer {layer}: an adapter factor of {big:.3g} overflows the fp16 slot")
            down[:, :r], up[:r] = d.astype(np.float16), u.astype(np.float16)
        out[down_name], out[up_name] = down, up
    return out


def fill_slots(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Replace the slot initializers' values in place (same names, shapes and type)."""
    inits = {t.name: t for t in model.graph.initializer}
    for name, v in values.items():
        t = inits.get(name)
        if t is None:
            raise SlotError(f"the graph lists slot {name} but has no such initializer; re-export it")
        if tuple(t.dims) != v.shape or t.data_type != onnx.TensorProto.FLOAT16:
            raise SlotError(f"initializer {name} is {list(t.dims)} of type {t.data_type}, not the fp16 slot {list(v.shape)}")
        t.CopyFrom(numpy_helper.from_array(v, name))


def overridable(model: onnx.ModelProto, slots: Optional[dict] = None) -> onnx.ModelProto:
    """A copy of ``model`` whose slot initializers are also graph inputs (ONNX Runtime overrides)."""
    out = copy_model(model)
    slots = lora_slots(out) if slots is None else slots
    have = {i.name for i in out.graph.input}
    for layer, (k, n, rank) in slots.items():
        for name, shape in zip(slot_names(layer), ([k, rank], [rank, n])):
            if name not in have:
                out.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT16, shape))
    return out
