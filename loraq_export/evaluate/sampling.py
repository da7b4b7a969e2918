"""End-to-end diffusion quality harness: run the same sampling loop with the float transformer, a
quantized one, or an ONNX Runtime session, and compare the final latents.

A *denoiser* is ``denoise(latents, t, cond) -> prediction``: ``latents`` (B, C, H, W) float32,
``t`` the scheduler's current timestep (0-dim tensor), ``cond`` the remaining model inputs in
``input_names`` order after ``hidden_states, timestep`` (text embeddings, attention mask).
No classifier-free guidance: one model call per step.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from loraq_export.errors import UserError
from loraq_export.models.diffusion_presets import SCHEDULERS  # kind -> (scheduler class, kwargs)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]

_ALIASES = {"pixart-sigma": "pixart", "sana-600m": "sana", "sana-1.6b": "sana"}


def scheduler_for(kind: str):
    """A fresh scheduler for ``kind`` ("pixart", "sana", or a preset name)."""
    import diffusers

    key = _ALIASES.get(kind, kind)
    if key not in SCHEDULERS:
        raise UserError(f"no scheduler for model kind {kind!r}: choose one of {', '.join(SCHEDULERS)}")
    cls_name, config = SCHEDULERS[key]
    return getattr(diffusers, cls_name)(**config)


@torch.no_grad()
def run_sampling_loop(denoise: Denoiser, scheduler, latents: torch.Tensor, cond: Sequence[torch.Tensor],
                      steps: int = 20) -> torch.Tensor:
    """Sample ``steps`` steps from the initial noise ``latents`` with the scheduler's own
    ``set_timesteps`` / ``step``; returns the final latents (float32).

    A prediction with twice the latent channels (PixArt's learned sigma) is cut to its first half,
    the epsilon, as the PixArt pipelines do. Deterministic: the scheduler state is reset here.
    """
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device="cpu")
    x = latents.float() * float(getattr(scheduler, "init_noise_sigma", 1.0))
    channels = x.shape[1]
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        pred = torch.as_tensor(denoise(model_in, t, cond)).float()
        if pred.shape[1] == 2 * channels:
            pred = pred[:, :channels]
        if pred.shape != x.shape:
            raise UserError(
                f"denoiser returned shape {tuple(pred.shape)} for latents {tuple(x.shape)}; "
                "check that the model matches the latents"
            )
        x = scheduler.step(pred, t, x, return_dict=False)[0]
    return x


def _timesteps(t: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(batch).contiguous()


def torch_denoiser(wrapper: torch.nn.Module) -> Denoiser:
    """Adapter for a ``LoadedModel.wrapper`` (float or quantized): wrapper(latents, t, *cond)."""

    @torch.no_grad()
    def denoise(latents, t, cond):
        return wrapper(latents, _timesteps(t, latents.shape[0]), *cond)

    return denoise


def onnx_denoiser(session, input_names: Sequence[str]) -> Denoiser:
    """Adapter for an exported graph: an ``onnxruntime.InferenceSession`` or a runner of
    loraq_export/runtime (ONNX Runtime, TensorRT), run through the same ``GraphTransformer`` that
    ``loraq generate`` puts into diffusers pipelines. ``input_names``: the model's inputs
    (hidden_states, timestep, then ``cond``); inputs the graph lacks are skipped, dtypes follow
    the graph's declared input types."""
    from loraq_export.runtime import GraphTransformer, OrtRunner

    runner = session if hasattr(session, "backend") else OrtRunner(session)
    model = GraphTransformer(runner, {})

    def denoise(latents, t, cond):
        named = dict(zip(input_names[2:], cond))
        return model(latents, encoder_hidden_states=named["encoder_hidden_states"],
                     timestep=_timesteps(t, latents.shape[0]),
                     encoder_attention_mask=named.get("encoder_attention_mask"), return_dict=False)[0]

    return denoise


def latent_metrics(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) against the reference's dynamic range (max - min) and cosine similarity."""
    ref64 = torch.as_tensor(ref).detach().double().flatten()
    x64 = torch.as_tensor(x).detach().double().flatten()
    if ref64.shape != x64.shape:
        raise UserError(f"cannot compare latents of {ref64.numel()} and {x64.numel()} values; shapes differ")
    mse = float(torch.mean((ref64 - x64) ** 2))
    peak = float(ref64.max() - ref64.min())
    if not math.isfinite(mse):
        psnr = float("-inf")
    elif mse == 0.0:
        psnr = float("inf")
    else:
        psnr = 10.0 * math.log10(peak**2 / mse) if peak > 0 else float("-inf")
    denom = float(ref64.norm() * x64.norm())
    cosine = float(ref64 @ x64) / denom if denom > 0 else float("nan")
    return {"psnr_db": psnr, "cosine": cosine}


SAMPLING_STEPS = 20


def sample_latents(loaded, denoise: Denoiser, seed: int, steps: int = SAMPLING_STEPS) -> torch.Tensor:
    """The pipeline's own scheduler class, ``steps`` steps from noise and conditioning fixed by ``seed``."""
    inputs = loaded.make_inputs(seed=seed + 7, batch=1)
    return run_sampling_loop(denoise, scheduler_for(loaded.kind), inputs[0], inputs[2:], steps)


def sampling_report(fp_latents, q_torch, q_onnx, kind: str) -> dict:
    """Final latents of the quantized torch and ONNX models against FP (when FP is available)."""
    out = {"steps": SAMPLING_STEPS, "scheduler": type(scheduler_for(kind)).__name__,
           "onnx_vs_torch_quantized": latent_metrics(q_torch, q_onnx), "vs_fp": {}}
    if fp_latents is not None:  # a checkpoint has no FP weights to compare with
        out["vs_fp"] = {"torch_quantized": latent_metrics(fp_latents, q_torch),
                        "onnx_quantized": latent_metrics(fp_latents, q_onnx)}
    return out
