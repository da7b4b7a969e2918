"""Embedding tables over the per-tensor limit export as row blocks: same rows, bit for bit."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import loraq_export.export.large_tensors as large
from graphs.runtime import ort_session
from loraq_export.export.large_tensors import RowBlockEmbedding, embeddings_in_row_blocks
from loraq_export.export.onnx_export import export_graph


@pytest.mark.parametrize("rows_per_block", [1, 7, 64, 100])
def test_row_blocks_give_the_table_rows_exactly(rows_per_block):
    table = torch.randn(100, 12, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 6, 7, 63, 64, 99], [99, 98, 1, 0, 50, 13]])
    got = RowBlockEmbedding(table, rows_per_block)(ids)
    assert torch.equal(got, torch.nn.functional.embedding(ids, table))


def test_tied_table_is_swapped_under_every_name_and_restored():
    emb = torch.nn.Embedding(64, 8)
    model = torch.nn.ModuleDict({"shared": emb, "encoder": torch.nn.ModuleDict({"embed_tokens": emb})})
    with embeddings_in_row_blocks(model, limit=700):  # 21 rows of 8 float32 values per block
        assert isinstance(model["shared"], RowBlockEmbedding) and model["encoder"]["embed_tokens"] is model["shared"]
        assert [b.shape[0] for b in model["shared"].blocks] == [21, 21, 21, 1]
    assert model["shared"] is emb and model["encoder"]["embed_tokens"] is emb


def _largest_initializer(model: onnx.ModelProto) -> int:
    return max(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_minilm_exports_its_word_table_in_blocks_with_the_same_outputs(minilm, monkeypatch):
    table = minilm.module.embeddings.word_embeddings
    assert table.weight.numel() * 4 > 8 << 20  # 30522 x 384: 47 MB
    inputs = minilm.make_inputs(seed=0, batch=2)
    whole, _ = export_graph(minilm, inputs)
    monkeypatch.setattr(large, "EMBEDDING_BLOCK_BYTES", 8 << 20)
    blocked, _ = export_graph(minilm, inputs)
    assert minilm.module.embeddings.word_embeddings is table
    assert _largest_initializer(whole) == table.weight.numel() * 4
    assert _largest_initializer(blocked) <= 8 << 20
    feed = {n: t.numpy() for n, t in zip(minilm.input_names, minilm.make_inputs(seed=5, batch=3))}
    np.testing.assert_array_equal(ort_session(blocked).run(None, feed)[0], ort_session(whole).run(None, feed)[0])
