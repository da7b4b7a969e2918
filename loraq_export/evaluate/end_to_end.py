"""End-to-end quality against the FP model, for the bench: one reference computed once per run,
then each quantized model (its ONNX model in ONNX Runtime, and its torch model) measured against it.

Sentence encoders (kind "bert"): cosine between FP and quantized mean-pooled embeddings of the
bundled sentences (mean and min), and nearest-neighbour agreement: for each sentence, is its
nearest other sentence by embedding cosine the same as under FP (a retrieval-level check that a
high mean cosine can hide). Diffusion transformers: the 20-step sampling loop of sampling.py
from the same noise and conditioning, final latents against FP (PSNR and cosine).

``headline_error`` is the one number the bench plots and ranks by: 1 - cosine (mean sentence
cosine, or latent cosine) of the ONNX model, lower is better.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from loraq_export.evaluate.quality import cosine_rows, embeddings, onnx_runner, sentence_batches
from loraq_export.models.base import LoadedModel


@dataclass
class Reference:
    """What every pair is compared with: the FP model's outputs, computed once."""

    kind: str  # "embeddings" or "latents"
    fp: torch.Tensor
    batches: Optional[list] = None  # tokenized sentences (embeddings only)


def nearest_neighbours(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    e = torch.nn.functional.normalize(e.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def embedding_metrics(fp: torch.Tensor, q: torch.Tensor) -> dict:
    cos = cosine_rows(fp, q)
    agree = (nearest_neighbours(fp) == nearest_neighbours(q)).double().mean()
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "nn_agreement": float(agree)}


def build_reference_kind(loaded: LoadedModel) -> Optional[str]:
    """The kind of reference ``build_reference`` gives for ``loaded`` (None: no end-to-end metric)."""
    return {"bert": "embeddings", "pixart": "latents", "sana": "latents"}.get(loaded.kind)


def build_reference(loaded: LoadedModel, seed: int, texts: Optional[list] = None) -> Optional[Reference]:
    """The FP reference of ``loaded`` (None for a model kind with no end-to-end metric); ``texts``:
    the sentences of a sentence encoder (default: the bundled ones)."""
    kind = build_reference_kind(loaded)
    if kind == "embeddings":
        batches = sentence_batches(loaded, texts=texts)
        return Reference("embeddings", embeddings(loaded.wrapper, batches), batches)
    if kind == "latents":
        from loraq_export.evaluate.sampling import sample_latents, torch_denoiser
        return Reference("latents", sample_latents(loaded, torch_denoiser(loaded.wrapper), seed))
    return None


def _measure(loaded: LoadedModel, ref: Reference, run: Callable, seed: int, onnx: bool) -> dict:
    if ref.kind == "embeddings":
        return embedding_metrics(ref.fp, embeddings(run, ref.batches))
    from loraq_export.evaluate.sampling import latent_metrics, onnx_denoiser, sample_latents, torch_denoiser
    denoise = onnx_denoiser(run, loaded.input_names) if onnx else torch_denoiser(run)
    return latent_metrics(ref.fp, sample_latents(loaded, denoise, seed))


def quality_vs_fp(loaded: LoadedModel, ref: Optional[Reference], session, seed: int, torch_too: bool = True) -> dict:
    """Metrics of the ONNX model (``session``) and, with ``torch_too``, of ``loaded`` as it is now
    (its quantized layers swapped in) against the FP reference."""
    if ref is None:
        return {}
    runner = onnx_runner(session, loaded.input_names) if ref.kind == "embeddings" else session
    out = {"onnx": _measure(loaded, ref, runner, seed, onnx=True)}
    if torch_too:
        out["torch"] = _measure(loaded, ref, loaded.wrapper, seed, onnx=False)
    return out


def headline_error(quality: dict) -> Optional[float]:
    """1 - cosine of the ONNX model (mean sentence cosine, or latent cosine)."""
    onnx = (quality or {}).get("onnx") or {}
    cos = onnx.get("cos_mean", onnx.get("cosine"))
    return None if cos is None else 1.0 - cos


METRIC_NAMES = {"embeddings": "sentence-embedding cosine vs FP (mean pooling, bundled sentences)",
                "latents": "20-step sampling, final latents vs FP"}
