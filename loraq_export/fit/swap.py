"""Module swap: quantized Linear layers that compute the exact reference from the one record."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn

from calibless.record import LayerRecord
from graphs.constants import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP

PLACEHOLDER = f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}"


# layer name -> reference function, filled while ``placeholders`` is active. The tracer accepts
# only tensors and strings as Function arguments, so the layer is passed by name.
_EXPORTING: dict = {}


class _Placeholder(torch.autograd.Function):
    """In torch: the reference result. In torch.onnx (TorchScript): one placeholder node naming
    the layer, which graphs.write_qdq later replaces by explicit QDQ."""

    @staticmethod
    def forward(ctx, x, layer, out_features):
        # The symbolic node replaces whatever this computes; tracing its ops would only record
        # them into a graph that is thrown away, and the TorchScript tracer fails on some of
        # them (a reshape of a placeholder's output, as the input rotation does).
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return _EXPORTING[layer](x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, layer, out_features):
        y = g.op(PLACEHOLDER, x, layer_s=layer)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter's shape inference what the custom op returns
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [out_features]))
        return y


def _reference(record: LayerRecord, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return record.forward(x.float(), bias).to(x.dtype)


class LoraqLinear(nn.Module):
    """A quantized Linear: computes, from its record, exactly what the exported QDQ graph computes."""

    # No float weight: the record holds the layer. Models that read a Linear's weight to pick a
    # dtype (transformers' T5DenseGatedActDense casts its input to ``wo.weight.dtype`` when that is
    # a tensor) see None and leave the input as it is.
    weight = None

    def __init__(self, record: LayerRecord, bias: Optional[torch.Tensor], name: str):
        super().__init__()
        self.record = record
        self.layer_name = name
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.emit_placeholder = False
        self.in_features, self.out_features = record.in_features, record.out_features

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return _reference(self.record, self.bias, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emit_placeholder:
            return _Placeholder.apply(x, self.layer_name, self.out_features)
        return self.reference(x)

    def extra_repr(self) -> str:
        b = self.record.branch
        return (f"{self.in_features} -> {self.out_features}, {self.record.method}, "
                f"branch={'none' if b is None else f'r{b.rank} {b.fmt.name}'}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_in(model: nn.Module, records: dict[str, LayerRecord]) -> dict[str, nn.Module]:
    """Replace each named Linear with a LoraqLinear; returns the originals for ``swap_out``."""
    originals = {}
    for name, rec in records.items():
        parent, attr = _parent(model, name)
        lin = getattr(parent, attr)
        originals[name] = lin
        setattr(parent, attr, LoraqLinear(rec, lin.bias, name))
    return originals


def swap_out(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, lin in originals.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, lin)


@contextmanager
def quantized(model: nn.Module, records: dict[str, LayerRecord]):
    """The model with its layers swapped for the quantized reference, restored on exit."""
    originals = swap_in(model, records)
    try:
        yield model
    finally:
        swap_out(model, originals)


@contextmanager
def placeholders(model: nn.Module):
    """Make every LoraqLinear export as a placeholder node (for torch.onnx)."""
    mods = [m for m in model.modules() if isinstance(m, LoraqLinear)]
    for m in mods:
        m.emit_placeholder = True
        # a closure over plain tensors: reading module attributes inside a traced Function breaks the tracer
        _EXPORTING[m.layer_name] = partial(_reference, m.record, None if m.bias is None else m.bias.detach().clone())
    try:
        yield
    finally:
        for m in mods:
            m.emit_placeholder = False
            _EXPORTING.pop(m.layer_name, None)
