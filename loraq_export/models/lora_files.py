"""Reading LoRA adapter files and mapping their keys onto a model's Linear layers.

Layouts read (docs/lora.md, "File layouts"):
- peft / diffusers: ``[transformer.]<module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
  (out, r); also peft's ``base_model.model.`` prefix. delta W = (alpha / r) B A (alpha / sqrt(r)
  with ``use_rslora``); alpha and per-module ``rank_pattern`` / ``alpha_pattern`` come from the
  file's ``lora_adapter_metadata`` (diffusers, loaders/lora_base.py LORA_ADAPTER_METADATA_KEY),
  else an ``adapter_config.json`` beside the file (peft), else alpha = r (peft's default scaling 1).
- older diffusers layouts (``.lora.down.weight`` / ``.lora.up.weight``, ``to_q_lora.down``):
  converted by diffusers' own ``convert_unet_state_dict_to_peft`` (utils/state_dict_utils.py),
  the call diffusers' ``load_lora_adapter`` makes for SANA's and PixArt's transformer classes.
- kohya (``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``):
  diffusers converts these only for UNets and Flux-family models, not for PixArt or SANA, so the
  module is found by matching the key against the model's own Linear names with '.' -> '_'.

Every problem is one ``UserError`` line naming the first bad key and the fix; nothing is applied
before the whole file has been checked.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
import torch
from torch import nn

from loraq_export.errors import UserError
from loraq_export.inputs import check_finite, readable

PEFT_PREFIXES = ("transformer.", "base_model.model.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
KOHYA_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.")
# diffusers' key for the LoraConfig JSON in a LoRA file's safetensors metadata (diffusers
# loaders/lora_base.py LORA_ADAPTER_METADATA_KEY; spelled out: importing diffusers' loaders takes seconds)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


@dataclass
class LoraLayer:
    a: torch.Tensor  # lora_A (r, in), float32
    b: torch.Tensor  # lora_B (out, r), float32
    scaling: float  # alpha / r (or alpha / sqrt(r)), without the user's scale

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraAdapter:
    """One adapter file, its keys mapped onto the model's Linear layers."""

    path: Path
    scale: float
    layout: str  # "peft", "diffusers (old, converted by diffusers)", "kohya"
    alpha_source: str
    layers: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({l.rank for l in self.layers.values()})

    def total_scaling(self, name: str) -> float:
        return self.scale * self.layers[name].scaling

    def describe(self) -> dict:
        return {"file": str(self.path), "scale": self.scale, "layout": self.layout, "alpha": self.alpha_source,
                "ranks": self.ranks, "layers": len(self.layers)}


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise UserError(f"LoRA folder {path} holds {len(found)} .safetensors files; pass the adapter file itself")
    return path


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"LoRA file {path} is corrupted, truncated or not a safetensors file "
                        f"({str(e).splitlines()[0][:200]}); download or save it again") from None
    return tensors, meta


def _lora_config(path: Path, meta: dict) -> tuple[dict, str]:
    """The adapter's LoraConfig fields (lora_alpha, rank_pattern, ...) and where they came from."""
    raw = meta.get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            cfg = json.loads(raw)
        except ValueError:
            raise UserError(f"LoRA file {path}: its {LORA_ADAPTER_METADATA_KEY} metadata is not JSON; "
                            "save the adapter again") from None
        # diffusers prefixes each field with the component ("transformer.lora_alpha") when saving a pipeline's LoRA
        cfg = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in cfg.items()}
        return cfg, "file metadata (lora_adapter_metadata)"
    side = path.parent / "adapter_config.json"
    if side.is_file():
        try:
            return json.loads(side.read_text()), f"{side.name} beside the file"
        except (OSError, ValueError) as e:
            raise UserError(f"{side} is not readable JSON ({e}); fix or remove it") from None
    return {}, "rank (no alpha in the file or beside it)"


def _pattern_value(patterns: dict, module: str):
    """peft's rank_pattern / alpha_pattern lookup: '^regex' matches the whole module name, any
    other key matches the name's dotted suffix (peft utils/other.py get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if key.startswith("^"):
            if re.fullmatch(key[1:], module):
                return value
        elif re.fullmatch(rf"(.*\.)?{re.escape(key)}", module):
            return value
    return None


def _strip_prefix(key: str) -> str:
    for p in PEFT_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _kohya_modules(tensors: dict, linears: dict) -> dict:
    """kohya key stem -> model module name, by the model's own names with '.' -> '_'."""
    by_flat = {n.replace(".", "_"): n for n in linears}
    out = {}
    for key in tensors:
        stem = key.split(".", 1)[0]
        flat = next((stem[len(p):] for p in KOHYA_PREFIXES if stem.startswith(p)), None)
        if flat is None or flat not in by_flat:
            raise UserError(f"LoRA key {key!r} names no Linear layer of this model (kohya layout); "
                            "is the adapter for another model? Use an adapter trained for it")
        out[stem] = by_flat[flat]
    return out


def _group(tensors: dict, linears: dict, path: Path) -> tuple[dict, str, dict]:
    """{module: {"A": t, "B": t}}, the layout's name and kohya alphas {module: alpha}."""
    keys = list(tensors)
    first_te = next((k for k in keys if k.startswith(KOHYA_TEXT_ENCODER)), None)
    if first_te is not None:
        raise UserError(f"LoRA key {first_te!r} is for a text encoder, which loraq does not quantize here; "
                        "pass an adapter for the transformer (or strip the text-encoder keys)")
    bad = next((k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k or ".lokr_" in k), None)
    if bad is not None:
        raise UserError(f"LoRA key {bad!r} belongs to a DoRA or LoKr adapter, which is not a low-rank term; "
                        "merge it into the FP model and quantize that instead")
    groups: dict = {}
    alphas: dict = {}
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        stems = _kohya_modules(tensors, linears)
        for key, t in tensors.items():
            stem, _, part = key.partition(".")
            name = stems[stem]
            if part == "alpha":
                alphas[name] = float(t.float().reshape(-1)[0])
            elif part in ("lora_down.weight", "lora_up.weight"):
                groups.setdefault(name, {})["A" if "down" in part else "B"] = t
            else:
                raise UserError(f"LoRA key {key!r} is not a lora_down/lora_up/alpha tensor; "
                                "the file is not a LoRA adapter loraq can read")
        return groups, "kohya", alphas
    layout = "peft"
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
        tensors = convert_unet_state_dict_to_peft(tensors)
        layout = "diffusers (older layout, converted by diffusers' convert_unet_state_dict_to_peft)"
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.(?:[^.]+\.)?weight", key)
        if m is None:
            fix = ("a LoRA with a bias on lora_B is not a low-rank term; merge it in float instead"
                   if ".lora_B." in key and key.endswith("bias") else "the file is not a LoRA adapter loraq can read")
            raise UserError(f"LoRA key {key!r} is not a lora_A/lora_B weight; {fix}")
        groups.setdefault(_strip_prefix(m.group(1)), {})[m.group(2)] = t
    return groups, layout, alphas


def read_lora(path, linears: dict[str, tuple[int, int]], scale: float = 1.0, model_name: str = "this model") -> LoraAdapter:
    """Read ``path`` (a .safetensors file, or a folder holding one) and map it onto ``linears``
    (module name -> (in_features, out_features) of every Linear of the model). Checks every key,
    shape and value before returning."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise UserError(f"LoRA scale must be a finite number, got {scale!r}")
    path = _weights_file(readable(path, "LoRA file", "pass a .safetensors adapter file"))
    tensors, meta = _read_safetensors(path)
    if not tensors:
        raise UserError(f"LoRA file {path} holds no tensors; pass a LoRA adapter file")
    check_finite(sorted(tensors.items()), f"LoRA file {path}", "the adapter is damaged; use another file")
    cfg, alpha_source = _lora_config(path, meta)
    groups, layout, kohya_alpha = _group(tensors, linears, path)
    if kohya_alpha:
        alpha_source = "kohya .alpha tensors"
    adapter = LoraAdapter(Path(path), float(scale), layout, alpha_source)
    for name in sorted(groups):
        parts = groups[name]
        key = f"{name}.lora_{'A' if 'A' in parts else 'B'}"
        if name not in linears:
            raise UserError(f"LoRA key {key!r} names no Linear layer of {model_name}; is the adapter for another "
                            "model? Use an adapter trained for this one")
        if set(parts) != {"A", "B"}:
            raise UserError(f"LoRA key {key!r} has no lora_{'B' if 'A' in parts else 'A'} partner; the file is incomplete")
        a, b = parts["A"].float(), parts["B"].float()
        k, n = linears[name]
        if a.dim() != 2 or b.dim() != 2:
            raise UserError(f"LoRA key {name}.lora_A is {a.dim()}-D and lora_B {b.dim()}-D, a Linear LoRA is 2-D; "
                            "is the adapter for another model? Use an adapter trained for this one")
        r = a.shape[0]
        if b.shape[1] != r:
            raise UserError(f"LoRA key {name}.lora_B has rank {b.shape[1]} but lora_A rank {r}; the file is damaged")
        if a.shape[1] != k or b.shape[0] != n:
            raise UserError(f"LoRA key {name}.lora_A/lora_B is {b.shape[0]}x{a.shape[1]} but the layer is {n}x{k} "
                            f"(out x in) in {model_name}; is the adapter for another size of the model? "
                            "Use an adapter trained for this one")
        alpha = kohya_alpha.get(name)
        if alpha is None:
            alpha = _pattern_value(cfg.get("alpha_pattern"), name)
        if alpha is None:
            alpha = cfg.get("lora_alpha")
        if alpha is None:
            alpha = r
        scaling = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        adapter.layers[name] = LoraLayer(a.contiguous(), b.contiguous(), scaling)
    if cfg.get("use_dora"):
        raise UserError(f"LoRA file {path}: its config says use_dora, which is not a low-rank term; "
                        "merge it into the FP model and quantize that instead")
    return adapter


def model_linears(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear-like layer of ``module`` (nn.Linear or a swapped-in LoraqLinear): name -> (in, out)."""
    return {n: (m.in_features, m.out_features) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) or (hasattr(m, "record") and hasattr(m, "in_features"))}


def read_adapters(files, scales, module: nn.Module, model_name: str) -> list[LoraAdapter]:
    """``--lora FILE ... --lora-scale S ...``: one scale per file, in order, default 1."""
    files = list(files or [])
    scales = list(scales or [])
    if len(scales) > len(files):
        raise UserError(f"{len(scales)} --lora-scale values for {len(files)} --lora files; give one scale per file")
    scales += [1.0] * (len(files) - len(scales))
    linears = model_linears(module)
    return [read_lora(f, linears, s, model_name) for f, s in zip(files, scales)]
