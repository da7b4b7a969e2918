"""A pipeline's weight memory, per component, in float16 and quantized.

float16 bytes = parameters x 2 (how pipelines are deployed). Quantized bytes = the quantized
layers' stored bits (codes, scales, zero points, branch factors: the report's count, or
calibless.bits.layer_bits from shapes alone) / 8, plus every other parameter (embeddings, norms,
layers kept in high precision, biases) at 2 bytes. Components loraq does not quantize (the VAE)
count the same before and after.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

FP16_BYTES = 2


def row(name: str, params: int, quantized_params: int, quantized_bytes: float) -> dict:
    fp16 = params * FP16_BYTES
    after = int(round(quantized_bytes + (params - quantized_params) * FP16_BYTES))
    return {"component": name, "params": int(params), "quantized_params": int(quantized_params),
            "fp16_bytes": int(fp16), "quantized_bytes": after, "ratio": round(after / fp16, 4) if fp16 else 1.0}


def row_from_report(name: str, report: dict) -> dict:
    z = report["sizes"]
    return row(name, z["model_params"], z["quantized_weights"], z["quantized_layers_bytes"])


def row_from_module(name: str, module: nn.Module, recipe, select, method: str) -> dict:
    """From shapes alone (no fitting; a module on the meta device will do): the plan's decisions
    (recipe patterns, the model's selection, group sizes that divide) and layer_bits."""
    from calibless.bits import layer_bits
    from calibless.methods import get_method
    m = get_method(method)
    params = sum(p.numel() for p in module.parameters())
    q_params = q_bits = 0
    for lname, lin in module.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        quantize, _ = recipe.pattern_decision(lname) or select(lname, lin)
        if not quantize:
            continue
        spec = recipe.spec_for(lname)
        k, n = lin.in_features, lin.out_features
        if k % spec.main.weight.block_size(k):
            continue
        q_params += k * n
        q_bits += layer_bits(k, n, spec, m.uses_branch, permuted=method == "lopro")
    return row(name, params, q_params, q_bits / 8)


def folder_params(folder: Path) -> int:
    """Parameters in a component folder's safetensors files (from their headers, nothing loaded)."""
    from safetensors import safe_open
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                shape = sf.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def other_components(root: Path, quantized: list[str]) -> list[dict]:
    """Rows for a pipeline folder's other components with weights (the VAE), unchanged."""
    try:
        index = json.loads((Path(root) / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    rows = []
    for name in sorted(index):
        if name.startswith("_") or name in quantized or not (Path(root) / name).is_dir():
            continue
        params = folder_params(Path(root) / name)
        if params:
            rows.append({**row(name, params, 0, 0.0), "note": "not quantized"})
    return rows


def memory_table(rows: list[dict], note: Optional[str] = None) -> dict:
    before = sum(r["fp16_bytes"] for r in rows)
    after = sum(r["quantized_bytes"] for r in rows)
    out = {"rows": rows, "total": {"fp16_bytes": before, "quantized_bytes": after,
                                   "ratio": round(after / before, 4) if before else 1.0}}
    if note:
        out["note"] = note
    return out


def format_memory(table: dict) -> str:
    t = table["total"]
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if t["fp16_bytes"] >= s or s == 1e3)
    lines = [f"  {'component':<14} {'params':>10} {'fp16':>10} {'quantized':>10} {'ratio':>6}"]
    rows = table["rows"] + [{"component": "pipeline", "params": sum(r["params"] for r in table["rows"]), **t}]
    for r in rows:
        lines.append(f"  {r['component']:<14} {r['params'] / 1e6:>9.3f}M {r['fp16_bytes'] / scale:>8.3f}{unit} "
                     f"{r['quantized_bytes'] / scale:>8.3f}{unit} {r['ratio']:>6.3f}")
    if table.get("note"):
        lines.append(f"  ({table['note']})")
    return "\n".join(lines)


def preset_pipeline_memory(pipeline: str, recipe: str = None, method: str = None) -> dict:
    """The memory table of a full-size pipeline preset (pixart-sigma, sana-600m, sana-1.6b) from
    the published configs: modules built on the meta device (shapes only, no weights), the
    recipe's stored bits per layer from shapes (calibless.bits). The VAE is not counted."""
    import torch
    from loraq_export.fit.recipes import load_recipe
    from loraq_export.models.diffusion import diffusers_class, select_diffusion_linear
    from loraq_export.models.diffusion_presets import preset_config
    from loraq_export.models.text_encoder_presets import PIPELINES, text_encoder_preset
    from loraq_export.models.text_encoders import config_for, select_encoder_linear, transformers_class
    rec = load_recipe(recipe, method)
    transformer, encoder = PIPELINES[pipeline]
    t_cls, t_cfg = preset_config(transformer)
    e_cls, e_cfg = text_encoder_preset(encoder)
    with torch.device("meta"):
        t_mod = diffusers_class(t_cls)(**t_cfg)
        e_mod = transformers_class(e_cls)(config_for(e_cls, e_cfg))
    rows = [row_from_module("transformer", t_mod, rec, select_diffusion_linear, rec.method),
            row_from_module("text_encoder", e_mod, rec, select_encoder_linear, rec.method)]
    return memory_table(rows, f"{pipeline} from the published configs, recipe {rec.name}, method {rec.method}; "
                              "VAE not counted")
