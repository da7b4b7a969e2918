"""Embedding tables over the per-tensor limit export as row blocks: same rows, bit for bit."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import loraq_export.export.large_tensors as large
from graphs.runtime import ort_session
from loraq_export.export.large_tensors import embeddings_in_row_blocks, row_block_lookup
from loraq_export.export.onnx_export import export_graph


@pytest.mark.parametrize("rows_per_block", [1, 7, 64, 100])
def test_row_blocks_give_the_table_rows_exactly(rows_per_block):
    table = torch.randn(100, 12, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 6, 7, 63, 64, 99], [99, 98, 1, 0, 50, 13]])
    got = row_block_lookup(ids, table.split(rows_per_block))
    assert torch.equal(got, torch.nn.functional.embedding(ids, table))


class ScaledEmbedding(torch.nn.Embedding):
    """What Gemma-2's Gemma2TextScaledWordEmbedding does: the lookup, then a scale."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


@pytest.mark.parametrize("cls", [torch.nn.Embedding, ScaledEmbedding])
def test_tied_table_is_changed_once_its_own_forward_kept_and_restored(cls):
    emb = cls(64, 8)
    model = torch.nn.ModuleDict({"shared": emb, "encoder": torch.nn.ModuleDict({"embed_tokens": emb})})
    ids = torch.tensor([[0, 20, 21, 63]])
    want = emb(ids)
    with embeddings_in_row_blocks(model, limit=700):  # 21 rows of 8 float32 values per block
        assert model["encoder"]["embed_tokens"] is emb and type(emb) is not cls and isinstance(emb, cls)
        assert [b.shape[0] for b in (emb.row_block_0, emb.row_block_1, emb.row_block_2, emb.row_block_3)] == [21, 21, 21, 1]
        assert torch.equal(emb(ids), want)
    assert type(emb) is cls and not hasattr(emb, "row_block_0") and list(emb.state_dict()) == ["weight"]
    assert torch.equal(emb(ids), want)


def _largest_tensor(model: onnx.ModelProto) -> int:
    """Over initializers and Constant nodes' values (a serialized message either way)."""
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return max(numpy_helper.to_array(t).nbytes for t in tensors)


def test_minilm_exports_its_word_table_in_blocks_with_the_same_outputs(minilm, monkeypatch):
    table = minilm.module.embeddings.word_embeddings
    assert table.weight.numel() * 4 > 8 << 20  # 30522 x 384: 47 MB
    inputs = minilm.make_inputs(seed=0, batch=2)
    whole, _ = export_graph(minilm, inputs)
    monkeypatch.setattr(large, "EMBEDDING_BLOCK_BYTES", 8 << 20)
    blocked, _ = export_graph(minilm, inputs)
    assert minilm.module.embeddings.word_embeddings is table and type(table) is torch.nn.Embedding
    assert _largest_tensor(whole) == table.weight.numel() * 4
    assert _largest_tensor(blocked) <= 8 << 20
    blocks = [t for t in blocked.graph.initializer if "row_block_" in t.name]
    assert sum(numpy_helper.to_array(t).nbytes for t in blocks) == table.weight.numel() * 4
    feed = {n: t.numpy() for n, t in zip(minilm.input_names, minilm.make_inputs(seed=5, batch=3))}
    np.testing.assert_array_equal(ort_session(blocked).run(None, feed)[0], ort_session(whole).run(None, feed)[0])
