"""End-to-end quality of a quantized BERT-family encoder against its FP original: cosine between
mean-pooled sentence embeddings on the bundled real sentences. (Diffusion models: sampling.py.)"""
from __future__ import annotations

from typing import Callable

import torch

from loraq_export.models.base import LoadedModel


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def sentence_batches(loaded: LoadedModel, batch: int = 10, texts=None) -> list[tuple]:
    """Tokenized batches of ``texts`` (default: the bundled sentences)."""
    from loraq_export.models.minilm import sentences
    tok = loaded.source["tokenizer"]
    texts = sentences() if texts is None else list(texts)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    return out


def embeddings(run: Callable, batches: list[tuple]) -> torch.Tensor:
    """Mean-pooled sentence embeddings; ``run(*inputs)`` returns last_hidden_state."""
    with torch.no_grad():
        return torch.cat([mean_pool(torch.as_tensor(run(*b)), b[1]) for b in batches])


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def onnx_runner(session, input_names):
    def run(*inputs):
        return session.run(None, {n: t.numpy() for n, t in zip(input_names, inputs)})[0]
    return run


def bert_embedding_quality(loaded: LoadedModel, fp_embeddings: torch.Tensor, session=None) -> dict:
    """Cosine between FP and quantized sentence embeddings on the bundled real sentences."""
    batches = sentence_batches(loaded)
    q = cosine_rows(fp_embeddings, embeddings(loaded.wrapper, batches))
    out = {"metric": "sentence embedding cosine vs FP (mean pooling)", "sentences": int(q.numel()),
           "torch": {"mean": float(q.mean()), "min": float(q.min())}}
    if session is not None:
        o = cosine_rows(fp_embeddings, embeddings(onnx_runner(session, loaded.input_names), batches))
        out["onnx"] = {"mean": float(o.mean()), "min": float(o.min())}
    return out


def fp_embeddings(loaded: LoadedModel):
    """The FP model's sentence embeddings (None for models that are not sentence encoders)."""
    return embeddings(loaded.wrapper, sentence_batches(loaded)) if loaded.kind == "bert" else None


def embedding_quality(loaded: LoadedModel, fp: torch.Tensor, session=None) -> dict:
    """Report section: ``bert_embedding_quality`` where the FP embeddings exist, else None."""
    if loaded.kind != "bert" or fp is None:
        return None
    return bert_embedding_quality(loaded, fp, session)
