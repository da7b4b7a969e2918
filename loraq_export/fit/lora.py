"""LoRA adapters on a quantized model: each joins its quantized layer as one more low-rank term
(calibless/adapters.py), or merges into the float weight of a layer kept in high precision.

Commands call ``apply_adapters`` on the fitted records; Python users call ``load_lora`` /
``unload_lora`` on a model from ``load_quantized_model`` or ``quantize_``: the swapped-in
``LoraqLinear`` layers then compute, from their records, exactly what the exported graph computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from calibless.adapters import adapter_format, lora_delta, lora_factors, widen
from loraq_export.errors import UserError
from loraq_export.models.lora_files import LoraAdapter, model_linears, read_lora
from loraq_export.models.stored_dtype import to_float32

_STATE = "_loraq_lora_state"  # on a module: what load_lora changed, for unload_lora


def _refuse_folded(adapters: list[LoraAdapter], records: dict) -> None:
    """A layer whose output carries a folded rotation (fit/folds.py) computes in a rotated output
    basis: an adapter there would need its up factor rotated too, which loraq does not do yet."""
    producers = {r.rotation.folded: n for n, r in records.items() if r.rotation is not None and r.rotation.folded}
    for ad in adapters:
        hit = next((n for n in ad.layers if n in producers), None)
        if hit is not None:
            raise UserError(f"LoRA {ad.path} touches {hit}, whose output a -had rotation was folded into "
                            f"({producers[hit]}); use a recipe without -had for LoRA adapters")


def apply_adapters(module: nn.Module, records: dict, adapters: list[LoraAdapter], fmt: str = "fp16") -> tuple[dict, dict]:
    """(records with the adapters joined, a report). Layers without a record are merged into
    their float weight in ``module`` (in place)."""
    if not adapters:
        return records, {}
    _refuse_folded(adapters, records)
    records = dict(records)
    quantized, merged = set(), set()
    for ad in adapters:
        for name, layer in ad.layers.items():
            s = ad.total_scaling(name)
            if name in records:
                rec = records[name]
                records[name] = widen(rec, *lora_factors(layer.a, layer.b, s), adapter_format(fmt, rec))
                quantized.add(name)
            else:
                lin = to_float32(module.get_submodule(name))  # a merged delta is not a 16-bit value
                with torch.no_grad():
                    lin.weight.add_(lora_delta(layer.a, layer.b, s).to(lin.weight.dtype))
                merged.add(name)
    storage = {}
    for name in sorted(quantized):
        a = records[name].adapter
        storage[name] = {"rank": a.rank, "format": a.fmt.name,
                         "bytes": a.stored_bits() // 8}
    report = {"adapters": [a.describe() for a in adapters],
              "storage_format": fmt,
              "quantized_layers": storage,
              "merged_in_float": sorted(merged),
              "adapter_bytes": sum(v["bytes"] for v in storage.values()),
              "note": "each adapter is an extra low-rank term beside the quantized layer's branch (the main weight "
                      "and the fitted branch are untouched); layers kept in high precision have it merged into "
                      "their float weight"}
    return records, report


@contextmanager
def merged_in_float(module: Optional[nn.Module], adapters: list[LoraAdapter]):
    """``module`` (the FP model) with every adapter merged into its float weights, restored on
    exit: the reference a LoRA'd quantized model is measured against."""
    if module is None or not adapters:
        yield module
        return
    saved = {}
    try:
        with torch.no_grad():
            for ad in adapters:
                for name, layer in ad.layers.items():
                    lin = to_float32(module.get_submodule(name))
                    if name not in saved:
                        saved[name] = lin.weight.detach().clone()
                    lin.weight.add_(lora_delta(layer.a, layer.b, ad.total_scaling(name)).to(lin.weight.dtype))
        yield module
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                module.get_submodule(name).weight.copy_(w)


def _quantized_layers(model: nn.Module) -> dict:
    from loraq_export.fit.swap import LoraqLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraqLinear)}


def load_lora(model: nn.Module, path, scale: float = 1.0, fmt: str = "fp16") -> dict:
    """Add the LoRA adapter ``path`` (times ``scale``) to ``model``, a model from
    ``load_quantized_model`` or ``quantize_``: quantized layers gain it as a low-rank term (stored
    in ``fmt``: fp16, int8 or branch), the others merge it into their float weight. Several calls
    stack adapters. Returns what was applied (the report's "lora" section)."""
    quant = _quantized_layers(model)
    if not quant:
        raise UserError("load_lora takes a model from load_quantized_model or quantize_ (it has no quantized layers)")
    adapter = read_lora(path, model_linears(model), scale, type(model).__name__)
    state = model.__dict__.setdefault(_STATE, {"records": {}, "weights": {}, "adapters": []})
    records = {n: m.record for n, m in quant.items()}
    for name in adapter.layers:
        if name in quant:
            state["records"].setdefault(name, quant[name].record)
        else:
            state["weights"].setdefault(name, model.get_submodule(name).weight.detach().clone())
    records, report = apply_adapters(model, records, [adapter], fmt)
    for name in adapter.layers:
        if name in quant:
            quant[name].record = records[name]
    state["adapters"].append(adapter.describe())
    return report


def unload_lora(model: nn.Module) -> None:
    """Undo every ``load_lora``: records and float weights return to what they were before."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    quant = _quantized_layers(model)
    for name, rec in state["records"].items():
        quant[name].record = rec
    with torch.no_grad():
        for name, w in state["weights"].items():
            model.get_submodule(name).weight.copy_(w)


def loaded_adapters(model: nn.Module) -> list[dict]:
    """What ``load_lora`` has applied to ``model`` (file, scale, layout, alpha, ranks, layers)."""
    return list(model.__dict__.get(_STATE, {}).get("adapters", []))
