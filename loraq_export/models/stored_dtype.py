"""Large models held in their stored 16-bit dtype and computed in float32.

A 4.7B-parameter T5-XXL encoder is 19 GB in float32 but 9.5 GB as stored (bfloat16): on a 24 GiB
machine only the second leaves room for the input statistics and the fit. Every bfloat16 /
float16 value is exactly representable in float32, so a Linear that keeps its 16-bit weight and
upcasts it on each call computes bit for bit what the float32 copy of the same checkpoint
computes: the results (statistics, fits, FP reference) are those of the float32 flow.

Only Linear weights stay 16-bit (they are nearly all of a transformer's bytes); embeddings and
norms become float32, so activations are float32 throughout. Code that edits a weight in place
(rotation folds, LoRA merges) first makes that layer float32 with ``to_float32``; code that swaps
``.weight.data`` for a float32 tensor needs nothing, since the forward casts whatever it holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


class Float32ComputeLinear(nn.Linear):
    """An ``nn.Linear`` whose weight may be stored in 16 bits: computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return F.linear(x, self.weight.to(x.dtype), None if b is None else b.to(x.dtype))


def kept_in_float32(module: nn.Module, name: str) -> bool:
    """Whether the model class keeps submodule ``name`` in float32 itself (transformers'
    ``_keep_in_fp32_modules``, matched on whole name parts as transformers does: T5's ``wo``)."""
    keep32 = getattr(module, "_keep_in_fp32_modules", None) or ()
    return any(k in name.split(".") for k in keep32)


def keep_linear_weights_stored(module: nn.Module) -> int:
    """Make ``module`` float32 except the 16-bit weights of its Linear layers, which stay as they
    are and are upcast on each call. Layers the model class keeps in float32 itself
    (transformers' ``_keep_in_fp32_modules``: T5's ``wo``, whose input T5 casts to ``wo.weight``'s
    dtype) become float32 as well. Returns how many layers keep a 16-bit weight."""
    kept = 0
    for name, mod in module.named_modules():
        if isinstance(mod, Float32ComputeLinear):
            kept += 1
            continue
        if (type(mod) is nn.Linear and mod.weight.dtype in HALF_DTYPES
                and not kept_in_float32(module, name)):
            mod.__class__ = Float32ComputeLinear
            kept += 1
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.float()
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b.is_floating_point() and b.dtype != torch.float32:
                setattr(mod, bname, b.float())
    return kept


def to_float32(linear: nn.Linear) -> nn.Linear:
    """Upcast one layer's stored weight in place (before editing it); a no-op on a float32 layer."""
    if isinstance(linear, Float32ComputeLinear):
        linear.weight.data = linear.weight.data.float()
        linear.__class__ = nn.Linear
    return linear


def upcast_remaining(module: nn.Module) -> int:
    """After the swap: the layers left unquantized become plain float32 Linears (what the ONNX
    export writes), so the graph carries no 16-bit initializer. Returns how many."""
    layers = [m for m in module.modules() if isinstance(m, Float32ComputeLinear)]
    for m in layers:
        to_float32(m)
    return len(layers)


def replacement_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype for a weight swapped in through ``.data`` (a quantized peer's, a sensitivity
    probe's): float32 in a 16-bit stored layer, which computes in float32 anyway, so the swapped
    weight is not rounded to 16 bits; the layer's own dtype otherwise."""
    return torch.float32 if isinstance(linear, Float32ComputeLinear) else linear.weight.dtype
