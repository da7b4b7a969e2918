"""Synthetic LoRA adapter files in the layouts loraq reads (peft/diffusers, older diffusers, kohya), with
seeded random factors: what the tests and tools/bench_lora_storage.py load when no published adapter
can be downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ATTN_FF = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_v",
           "ff.net.0.proj", "ff.net.2")


def lora_factors(module: nn.Module, rank: int = 8, seed: int = 0, suffixes=ATTN_FF, strength: float = 0.5,
                 extra=()) -> dict:
    """{layer: (A (r, in), B (out, r))} on every Linear whose name ends with one of ``suffixes``
    (plus the names in ``extra``): B A has about ``strength`` times the weight's norm at scale 1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and (name.endswith(suffixes) or name in extra):
            a = torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5
            b = torch.randn(m.out_features, rank, generator=gen)
            b *= strength * m.weight.detach().norm() / (b @ a).norm()
            out[name] = (a, b)
    return out


def save_peft(path: Path, factors: dict, prefix: str = "transformer.", alpha=None, where: str = "metadata") -> Path:
    """peft / diffusers layout; ``alpha`` in the file's lora_adapter_metadata or adapter_config.json."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = a.clone().contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.clone().contiguous()
    meta = None
    rank = next(iter(factors.values()))[0].shape[0]
    cfg = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(factors)}
    if alpha is not None and where == "metadata":
        meta = {"lora_adapter_metadata": json.dumps(cfg)}
    if alpha is not None and where == "adapter_config":
        (Path(path).parent / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def save_old_diffusers(path: Path, factors: dict) -> Path:
    """diffusers' older layout: ``<module>.lora.down.weight`` / ``.lora.up.weight``."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora.down.weight"] = a.contiguous()
        tensors[f"{name}.lora.up.weight"] = b.contiguous()
    save_file(tensors, str(path))
    return Path(path)


def save_kohya(path: Path, factors: dict, alpha=None) -> Path:
    """kohya: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    tensors = {}
    for name, (a, b) in factors.items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = a.contiguous()
        tensors[f"{stem}.lora_up.weight"] = b.contiguous()
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return Path(path)


def merge_in_float(module: nn.Module, factors: dict, scaling: float) -> None:
    """The reference: W += scaling * B A, in place, in float64 then rounded."""
    with torch.no_grad():
        for name, (a, b) in factors.items():
            w = module.get_submodule(name).weight
            w.copy_((w.double() + scaling * (b.double() @ a.double())).to(w.dtype))
