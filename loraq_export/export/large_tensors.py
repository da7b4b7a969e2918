"""Embedding tables over ONNX's 2 GiB per-tensor limit, exported as row blocks under it.

An ONNX initializer is a protobuf message, and protobuf cannot serialize one over 2 GiB, even
into an external data file's graph (every graph pass copies tensors one message at a time:
graphs/protos.py). Gemma-2 2B's token table, 256000 x 2304 in float32, is 2.36 GB; Gemma-2 9B's
is 3.7 GB. While exporting, such a table is cut into row blocks of at most
EMBEDDING_BLOCK_BYTES; each block is a Gather of the ids that fall in it, and a Where keeps the
block's rows. The result is the same rows, bit for bit (no arithmetic on the values), and both
ONNX Runtime and TensorRT run Gather and Where.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# Under protobuf's 2 GiB, with room for the tensor message's own fields.
EMBEDDING_BLOCK_BYTES = 1 << 30


class RowBlockEmbedding(nn.Module):
    """``embedding(ids)`` of a table held as consecutive row blocks."""

    def __init__(self, weight: torch.Tensor, rows_per_block: int):
        super().__init__()
        self.blocks = nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in weight.split(rows_per_block))
        self.starts = [i * rows_per_block for i in range(len(self.blocks))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, block in zip(self.starts, self.blocks):
            local = ids - start
            inside = ((local >= 0) & (local < block.shape[0])).unsqueeze(-1)
            rows = nn.functional.embedding(local.clamp(0, block.shape[0] - 1), block)
            out = rows if out is None else torch.where(inside, rows, out)
        return out


def _too_large(module: nn.Module, limit: int) -> bool:
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.weight.numel() * 4 > limit)  # exported as float32


@contextmanager
def embeddings_in_row_blocks(model: nn.Module, limit: int = None):
    """Within: every plain ``nn.Embedding`` whose float32 table is over ``limit`` bytes
    (EMBEDDING_BLOCK_BYTES) is a RowBlockEmbedding of the same table (views, no copy)."""
    limit = EMBEDDING_BLOCK_BYTES if limit is None else limit
    swapped = []
    for name, module in list(model.named_modules()):
        if not _too_large(module, limit):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rows = max(1, limit // (4 * module.weight.shape[1]))
        # every parent that holds this module (a tied table is one module under two names)
        holders = [(p, a) for p in model.modules() for a, m in p._modules.items() if m is module]
        blocked = RowBlockEmbedding(module.weight.detach(), rows)
        for p, a in holders or [(parent, attr)]:
            setattr(p, a, blocked)
            swapped.append((p, a, module))
    try:
        yield
    finally:
        for p, a, module in swapped:
            setattr(p, a, module)
