"""Forwards that skip the blocks before a changed layer.

A budget measures each layer's sensitivity with one forward of the model per quantized layer,
that layer alone quantized (loraq_export/fit/allocation.py): on a 28-block PixArt-Sigma that is
280 full forwards, most of a default export's time. The blocks before the changed layer's block
see exactly the inputs they saw on the FP forward, so their outputs are recorded once and replayed:
on average half of the block stack is replayed instead of computed, and the output is the one a
full forward gives (checked on this model when the record is taken; replay is turned off if not).

The block stack is the model's largest ``nn.ModuleList`` (diffusers' ``transformer_blocks``, a
BERT's ``encoder.layer``, a T5 or Gemma encoder's layers), and replay is used only when the FP
forward called each of its blocks once, in order.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _clone(v)) for k, v in x.items())
    return x


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):  # a transformers ModelOutput is one
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True  # non-tensor parts (None, flags) are not outputs to compare


def block_stack(module: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """(name, list) of the ``nn.ModuleList`` of two or more modules holding the most parameters."""
    best, size = None, 0
    for name, mod in module.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and name:
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = (name, mod), n
    return best


class BlockReplay:
    """``run()`` is the model's forward on a fixed input. ``reference()`` runs it once, recording the
    block stack's outputs; ``run_from(j)`` then runs it with blocks 0..j-1 replayed."""

    def __init__(self, module: nn.Module, run: Callable[[], object]):
        self.run = run
        stack = block_stack(module)
        self.prefix, self.blocks = (stack[0] + ".", stack[1]) if stack else ("", None)
        self.record: Optional[list] = None

    @torch.no_grad()
    def reference(self):
        if self.blocks is None:
            return self.run()
        outputs, order = {}, []

        def hook(i):
            def record(mod, args, output):
                order.append(i)
                outputs[i] = _clone(output)
            return record

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        try:
            out = self.run()
        finally:
            for h in handles:
                h.remove()
        if order == list(range(len(self.blocks))):
            self.record = [outputs[i] for i in range(len(self.blocks))]
            # every block replayed: what runs is the model outside its stack, which must give the
            # same output from the recorded blocks (a model that keeps state in its blocks would not)
            if not _same(self.run_from(len(self.blocks)), out):
                self.record = None
        return out

    def block_of(self, name: str) -> int:
        """The index of the block holding layer ``name``; 0 (nothing to replay) outside the stack."""
        if self.record is None or not name.startswith(self.prefix):
            return 0
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.record) else 0

    @torch.no_grad()
    def run_from(self, j: int):
        if self.record is None or j <= 0:
            return self.run()
        replayed = list(self.blocks)[:j]
        try:
            for i, b in enumerate(replayed):
                b.forward = lambda *args, _out=self.record[i], **kwargs: _clone(_out)
            return self.run()
        finally:
            for b in replayed:
                if "forward" in b.__dict__:
                    del b.forward
