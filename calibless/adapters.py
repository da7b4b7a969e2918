"""LoRA adapters as one more low-rank term of a quantized layer: pure tensors, no refit.

A LoRA adapter on a Linear changes its weight by ``s * c * B @ A`` (torch's (out, in) layout,
A = lora_A (r, in), B = lora_B (out, r), c = alpha / r, or alpha / sqrt(r) for rsLoRA; s the
user's scale). In calibless' (K, N) layout that delta is ``down @ up`` with down = A^T (K, r) and
up = s c B^T (r, N): exactly the shape of the layer's low-rank branch. Several adapters
concatenate along the rank, x [D1 | D2] [U1 ; U2] = x D1 U1 + x D2 U2, so one adapter term of
rank r1 + r2 carries them all. The main weight, its scales and the fitted branch are untouched:
the adapter is ``LayerRecord.adapter``, computed like the branch and added after the bias.

Storage (``ADAPTER_FORMATS``): fp16 factors (the default), INT8 factors per channel with float
activations, or the layer's own branch format; docs/lora.md gives the measurement behind the default.
"""
from __future__ import annotations

from dataclasses import replace
import torch

from calibless.formats import BranchFormat, WeightFormat
from calibless.record import Branch, LayerRecord

FP16 = BranchFormat("fp16", None)
INT8 = BranchFormat("w8a16", WeightFormat(8, True, None))
ADAPTER_FORMATS = ("fp16", "int8", "branch")


def adapter_format(name: str, record: LayerRecord) -> BranchFormat:
    """The format an adapter on ``record`` is stored in: fp16, int8, or the branch's own
    (fp16 where the layer has no branch)."""
    if name == "fp16":
        return FP16
    if name == "int8":
        return INT8
    if name == "branch":
        return FP16 if record.branch is None else record.branch.fmt
    raise ValueError(f"unknown adapter format {name!r}; choose one of {', '.join(ADAPTER_FORMATS)}")


def lora_factors(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (K, r), up (r, N)) in calibless' layout for lora_A ``a`` (r, K), lora_B ``b`` (N, r)
    and the product of every scale (``scaling`` = s * alpha / r)."""
    return a.detach().float().T.contiguous(), (b.detach().float() * scaling).T.contiguous()


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) weight change of a LoRA, for merging into a float weight."""
    return (b.detach().double() @ a.detach().double() * scaling).float()


def widen(record: LayerRecord, down: torch.Tensor, up: torch.Tensor, fmt: BranchFormat) -> LayerRecord:
    """``record`` with (down, up) joined to its adapter term (rank grows by down's columns).
    ``down`` is in the layer's unrotated input basis; it is rotated like the main weight so that
    the term reads the same (rotated) input as the branch. An existing fp16 adapter's factors stay
    bit-identical (fp16 -> float32 -> fp16 is exact)."""
    if record.rotation is not None:
        down = record.rotation.rotate_weight(down)
    if record.adapter is not None:
        old = record.adapter
        down = torch.cat([old.down_weight(), down], dim=1)
        up = torch.cat([old.up_weight(), up], dim=0)
    return replace(record, adapter=Branch.from_float(down, up, fmt))


def empty_slot(record: LayerRecord, rank: int) -> LayerRecord:
    """``record`` with an all-zero fp16 adapter of ``rank`` (a run-time slot): computes exactly
    what ``record`` computes, since the term adds +0 after everything else."""
    k, n = record.in_features, record.out_features
    return replace(record, adapter=Branch(torch.zeros(k, rank, dtype=torch.float16),
                                          torch.zeros(rank, n, dtype=torch.float16), FP16))
