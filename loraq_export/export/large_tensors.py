"""Embedding tables over ONNX's 2 GiB per-tensor limit, exported as row blocks under it.

An ONNX initializer is a protobuf message, and protobuf cannot serialize one over 2 GiB, even
into an external data file's graph (every graph pass copies tensors one message at a time:
graphs/protos.py). Gemma-2 2B's token table, 256000 x 2304 in float32, is 2.36 GB; Gemma-2 9B's
is 3.7 GB. While exporting, such a table's lookup reads row blocks of at most
EMBEDDING_BLOCK_BYTES: each block is a Gather of the ids that fall in it, and a Where keeps the
block's rows. The result is the same rows, bit for bit (no arithmetic on the values), and both
ONNX Runtime and TensorRT run Gather and Where.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# Under protobuf's 2 GiB, with room for the tensor message's own fields.
EMBEDDING_BLOCK_BYTES = 1 << 30


def row_block_lookup(ids: torch.Tensor, blocks) -> torch.Tensor:
    """``embedding(ids, cat(blocks))`` without the concatenated table."""
    out, start = None, 0
    for block in blocks:
        local = ids - start
        inside = ((local >= 0) & (local < block.shape[0])).unsqueeze(-1)
        rows = nn.functional.embedding(local.clamp(0, block.shape[0] - 1), block)
        out = rows if out is None else torch.where(inside, rows, out)
        start += block.shape[0]
    return out


class _RowBlockLookup(nn.Embedding):
    """Put just before ``nn.Embedding`` in a table's class order: the lookup the table's own class
    makes (``super().forward``, as Gemma-2's scaled embedding does) reads the row blocks."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return row_block_lookup(ids, [getattr(self, n) for n in self._row_block_names])


def _too_large(module: nn.Module, limit: int) -> bool:
    return isinstance(module, nn.Embedding) and module.weight.numel() * 4 > limit  # exported as float32


@contextmanager
def embeddings_in_row_blocks(model: nn.Module, limit: int = None):
    """Within: every ``nn.Embedding`` (or subclass) whose float32 table is over ``limit`` bytes
    (EMBEDDING_BLOCK_BYTES) looks its rows up in blocks under it (views of the table, no copy). A
    tied table is one module under several names, so it is changed once."""
    limit = EMBEDDING_BLOCK_BYTES if limit is None else limit
    changed = []
    for module in {id(m): m for m in model.modules() if _too_large(m, limit)}.values():
        cls = type(module)
        rows = max(1, limit // (4 * module.weight.shape[1]))
        names = []
        for i, block in enumerate(module.weight.detach().split(rows)):
            names.append(f"row_block_{i}")
            # persistent: torch.onnx writes the state dict as initializers, anything else as Constant nodes
            module.register_buffer(names[-1], block)
        module._row_block_names = names
        module.__class__ = _RowBlockLookup if cls is nn.Embedding else type(f"RowBlock{cls.__name__}", (cls, _RowBlockLookup), {})
        changed.append((module, cls, names))
    try:
        yield
    finally:
        for module, cls, names in changed:
            module.__class__ = cls
            for n in names:
                delattr(module, n)
            del module._row_block_names
