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


TEXT_ENCODER_KINDS = ("t5", "gemma2")  # models/text_encoders.py


def prompt_batches(loaded: LoadedModel, batch: int = 10, texts=None) -> list[tuple]:
    """(input_ids, attention_mask) batches of ``texts`` (default: the bundled sentences), tokenized
    by a text encoder's own tokenizer."""
    from loraq_export.models.minilm import sentences
    tok = loaded.source["tokenizer"]
    texts = sentences() if texts is None else list(texts)
    return [tuple(tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")[k]
                  for k in ("input_ids", "attention_mask")) for i in range(0, len(texts), batch)]


def token_states(run: Callable, batches: list[tuple]) -> torch.Tensor:
    """The hidden states of the real tokens (attention mask 1; padding rows are what no pipeline reads
    as text), one row per token, over all batches."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(*b))[b[1].bool()] for b in batches])


def text_encoder_quality(loaded: LoadedModel, fp_states: torch.Tensor, session=None, texts=None) -> dict:
    """Cosine and relative L2 of each real token's hidden state vs FP on real prompts."""
    batches = prompt_batches(loaded, texts=texts)

    def measure(states: torch.Tensor) -> dict:
        c = cosine_rows(fp_states, states)
        rel = float((states.double() - fp_states.double()).norm() / fp_states.double().norm())
        return {"mean": float(c.mean()), "min": float(c.min()), "rel_l2": rel}

    out = {"metric": "hidden-state cosine vs FP per real token", "sentences": sum(int(b[0].shape[0]) for b in batches),
           "tokens": int(fp_states.shape[0]), "torch": measure(token_states(loaded.wrapper, batches))}
    if session is not None:
        out["onnx"] = measure(token_states(onnx_runner(session, loaded.input_names), batches))
    return out


def fp_embeddings(loaded: LoadedModel):
    """The FP model's sentence embeddings, or a text encoder's token states on real prompts (None for
    other models, and for a text encoder preset, which has no tokenizer)."""
    if loaded.kind == "bert":
        return embeddings(loaded.wrapper, sentence_batches(loaded))
    if loaded.kind in TEXT_ENCODER_KINDS and "tokenizer" in loaded.source:
        return token_states(loaded.wrapper, prompt_batches(loaded))
    return None


def embedding_quality(loaded: LoadedModel, fp: torch.Tensor, session=None) -> dict:
    """Report section: ``bert_embedding_quality`` / ``text_encoder_quality`` where the FP reference
    exists, else None."""
    if fp is None:
        return None
    if loaded.kind == "bert":
        return bert_embedding_quality(loaded, fp, session)
    if loaded.kind in TEXT_ENCODER_KINDS:
        return text_encoder_quality(loaded, fp, session)
    return None
