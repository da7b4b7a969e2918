"""Diffusion transformers (PixArt-Sigma, SANA): bundled presets, local diffusers folders, and the
``LoadedModel`` that the rest of the flow quantizes and exports.

ONNX interface (TorchScript exporter, ``dynamo=False``)::

    hidden_states          float32 (batch, in_channels, H, W)   latents
    timestep               float32 (batch,)                     scheduler time, 0..1000
    encoder_hidden_states  float32 (batch, text_len, caption_channels)
    encoder_attention_mask int64   (batch, text_len)            1 = keep, 0 = padding
    -> sample              float32 (batch, out_channels, H, W)

``batch`` and ``text_len`` are dynamic axes (checked in ONNX Runtime against torch). H and W
are dynamic only for models without a positional embedding (SANA at 512/1024 px): PixArt's
positional embedding is chosen by a Python comparison of the input size with ``sample_size`` and
the tracer freezes it to the traced size, so H, W stay static there (export once per resolution).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel
from loraq_export.models.diffusion_presets import PRESETS, preset_config, preset_names

__all__ = ["PRESETS", "SUPPORTED", "build_from_config", "build_preset", "diffusers_class", "make_diffusion_model",
           "preset_names"]

# diffusers class name -> model kind. Adding a class is one line here (and, if its forward differs,
# a branch in DiffusionWrapper).
SUPPORTED: dict[str, str] = {
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
}


def diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


# ----------------------------------------------------------------------------------------------
# Presets with seeded random weights
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _reinit_(module: nn.Module, seed: int) -> None:
    """Re-draw every Linear / Conv weight as N(0, 1/fan_in) and every bias as N(0, 0.02^2).

    std = 1/sqrt(fan_in) keeps activations at unit scale through each layer and gives Linear weights
    the magnitude of trained DiT weights (~0.03 at width 1152), with no all-zero layer (diffusers'
    own init, or an adaLN-zero init, can leave gates / output layers trivial).
    """
    gen = torch.Generator().manual_seed(seed)
    for _, mod in module.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = mod.weight
            fan_in = w[0].numel()  # in_features, or in_channels/groups * kernel area
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.02)


def build_from_config(cls_name: str, config: dict, seed: int = 0) -> nn.Module:
    """Instantiate ``cls_name`` from ``config`` with deterministic random weights (float32, eval)."""
    if cls_name not in SUPPORTED:
        raise UserError(f"unsupported diffusion class {cls_name!r}: supported are {', '.join(SUPPORTED)}")
    cls = diffusers_class(cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameters drawn in __init__ (scale_shift_table) become seeded
        try:
            module = cls(**config)
        except (TypeError, ValueError) as exc:
            raise UserError(f"invalid {cls_name} config: {exc}; fix the config values") from exc
    _reinit_(module, seed)
    return module.float().eval()


def build_preset(name: str, num_layers: int | None = None, seed: int = 0) -> nn.Module:
    """The preset's transformer with seeded random weights; ``num_layers`` overrides the depth.

    Full size is large (pixart-sigma ~610M parameters, 2.4 GB in float32): use ``num_layers`` for
    quick runs.
    """
    cls_name, config = preset_config(name)
    if num_layers is not None:
        if int(num_layers) < 1:
            raise UserError(f"num_layers must be >= 1, got {num_layers}")
        config["num_layers"] = int(num_layers)
    return build_from_config(cls_name, config, seed)


# ----------------------------------------------------------------------------------------------
# LoadedModel
# ----------------------------------------------------------------------------------------------
class DiffusionWrapper(nn.Module):
    """Calls the transformer with positional tensors and returns the ``sample`` tensor."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        params = inspect.signature(transformer.forward).parameters
        self.takes_mask = "encoder_attention_mask" in params
        self.takes_added_cond = "added_cond_kwargs" in params
        self.squeeze_fix = type(transformer).__name__ == "PixArtTransformer2DModel"
        self.vae_scale = 8  # latent -> pixel size, for PixArt's resolution micro-conditions

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None):
        kwargs = {}
        if self.takes_mask and encoder_attention_mask is not None:
            kwargs["encoder_attention_mask"] = encoder_attention_mask
        if self.takes_added_cond:
            kwargs["added_cond_kwargs"] = self._added_cond(hidden_states)
        hook = None
        if self.squeeze_fix:
            # PixArt calls proj_out(x).squeeze(1). With any dynamic axis the TorchScript exporter
            # cannot tell whether dim 1 is 1 and emits an If node that ONNX Runtime rejects
            # ("Squeeze ... Dimension of input 1 must be 1"). Adding a size-1 dim makes that squeeze
            # static; the reshape that follows ignores it, so the output is unchanged.
            hook = self.transformer.proj_out.register_forward_hook(lambda mod, inp, out: out.unsqueeze(1))
        try:
            out = self.transformer(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                return_dict=False,
                **kwargs,
            )
        finally:
            if hook is not None:
                hook.remove()
        return out[0]

    def _added_cond(self, hidden_states):
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        # PixArt-alpha style micro-conditions, as PixArtAlphaPipeline derives them from the size.
        b, _, h, w = hidden_states.shape
        res = torch.tensor([h * self.vae_scale, w * self.vae_scale], dtype=hidden_states.dtype)
        return {"resolution": res.repeat(b, 1), "aspect_ratio": torch.full((b, 1), h / w, dtype=hidden_states.dtype)}


_OUTSIDE = {
    "pos_embed": "patch embedding",
    "patch_embed": "patch embedding",
    "adaln_single": "timestep embedding / adaLN-single",
    "time_embed": "timestep embedding / adaLN-single",
    "caption_projection": "caption projection",
    "proj_out": "final projection",
}


def select_diffusion_linear(name: str, linear: nn.Linear) -> tuple[bool, str]:
    """Default selection: every Linear inside ``transformer_blocks.*`` (attention q/k/v/out,
    feed-forward); embeddings, adaLN, caption projection and the final projection stay high precision."""
    if name.startswith("transformer_blocks."):
        part = name.split(".")
        what = "feed-forward" if len(part) > 2 and part[2] == "ff" else "attention" if "attn" in name else "block"
        return True, f"inside transformer blocks ({what})"
    return False, f"outside transformer blocks ({_OUTSIDE.get(name.split('.')[0], 'other')})"


# Input statistics (fit/input_stats.py): 16 example inputs of 256 image tokens, 4096 token rows per
# layer, about as many as the widest input (a 4608-wide feed-forward down projection) has channels.
SYNTHETIC_BATCHES = 16
SYNTHETIC_TOKENS = 256


def _latent_side(config, seq: int | None) -> int:
    """Latent H = W: the largest patch grid with at most ``seq`` (default 256) tokens, <= sample_size."""
    p = int(config.patch_size)
    tokens = 256 if seq is None else int(seq)
    if tokens < 1:
        raise UserError(f"seq (image tokens) must be >= 1, got {seq}")
    grid = max(1, min(math.isqrt(tokens), int(config.sample_size) // p))
    return grid * p


def make_diffusion_model(module: nn.Module, name: str, source: dict | None = None) -> LoadedModel:
    """Wrap a PixArt / SANA transformer as a ``LoadedModel`` (see the module docstring)."""
    cls_name = type(module).__name__
    if cls_name not in SUPPORTED:
        raise UserError(f"unsupported diffusion class {cls_name!r}: supported are {', '.join(SUPPORTED)}")
    module = module.float().eval()
    wrapper = DiffusionWrapper(module).eval()
    cfg = module.config
    input_names = ["hidden_states", "timestep", "encoder_hidden_states"]
    dynamic_axes = {
        "hidden_states": {0: "batch"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "text_len"},
        "sample": {0: "batch"},
    }
    embed = getattr(module, "pos_embed", None) or getattr(module, "patch_embed", None)
    if embed is not None and getattr(embed, "pos_embed", None) is None:  # no positional table
        dynamic_axes["hidden_states"].update({2: "height", 3: "width"})
        dynamic_axes["sample"].update({2: "height", 3: "width"})
    if wrapper.takes_mask:
        input_names.append("encoder_attention_mask")
        dynamic_axes["encoder_attention_mask"] = {0: "batch", 1: "text_len"}

    def make_inputs(seed: int = 0, batch: int = 1, seq: int | None = None, text_len: int = 16):
        """Deterministic example inputs in ``input_names`` order; ``seq`` bounds the image tokens."""
        if batch < 1 or text_len < 1:
            raise UserError(f"batch and text_len must be >= 1, got {batch} and {text_len}")
        g = torch.Generator().manual_seed(seed)
        side = _latent_side(cfg, seq)
        latents = torch.randn(batch, cfg.in_channels, side, side, generator=g)
        timestep = 1.0 + 998.0 * torch.rand(batch, generator=g)  # scheduler range [0, 1000)
        text = torch.randn(batch, text_len, cfg.caption_channels, generator=g)
        inputs = [latents, timestep, text]
        if wrapper.takes_mask:
            # int64 like the pipelines' tokenizer mask; diffusers turns it into an additive bias.
            inputs.append(torch.ones(batch, text_len, dtype=torch.int64))
        return tuple(inputs)

    def synthetic_batches(seed: int = 0):
        """Example inputs at several seeds (noise levels, latents, text states): the statistics of
        a diffusion transformer's layers over its own input distribution."""
        n = _trajectories()
        if n:  # an experiment, not the default: tools/bench_stats_trajectory.py measured no gain
            return trajectory_batches(wrapper, SUPPORTED[cls_name], make_inputs, seed, n)
        return [(make_inputs(seed=seed + i, batch=1, seq=SYNTHETIC_TOKENS), None) for i in range(SYNTHETIC_BATCHES)]

    src = {"class": cls_name, **(source or {})}
    return LoadedModel(
        name=name,
        kind=SUPPORTED[cls_name],
        module=module,
        wrapper=wrapper,
        input_names=input_names,
        output_names=["sample"],
        dynamic_axes=dynamic_axes,
        make_inputs=make_inputs,
        select=select_diffusion_linear,
        synthetic_batches=synthetic_batches,
        source=src,
    )


TRAJECTORY_ENV = "LORAQ_STATS_TRAJECTORY"


def _trajectories() -> int:
    import os
    value = os.environ.get(TRAJECTORY_ENV, "")
    if not value:
        return 0
    if not value.isdigit() or not 1 <= int(value) <= SYNTHETIC_BATCHES:
        raise UserError(f"{TRAJECTORY_ENV}={value!r}: set it to a number of trajectories from 1 to {SYNTHETIC_BATCHES}, or unset it")
    return int(value)


@torch.no_grad()
def trajectory_batches(wrapper, kind: str, make_inputs, seed: int, trajectories: int = 2) -> list:
    """The model's inputs along its own sampling trajectories: ``trajectories`` runs of the
    pipeline's scheduler from noise, SYNTHETIC_BATCHES // trajectories steps each."""
    from loraq_export.evaluate.sampling import _timesteps, run_sampling_loop, scheduler_for
    out = []
    for i in range(trajectories):
        inputs = make_inputs(seed=seed + i, batch=1, seq=SYNTHETIC_TOKENS)

        def denoise(x, t, cond):
            ts = _timesteps(t, x.shape[0])
            out.append(((x.clone(), ts, *cond), None))
            return wrapper(x, ts, *cond)
        run_sampling_loop(denoise, scheduler_for(kind), inputs[0], inputs[2:], SYNTHETIC_BATCHES // trajectories)
    return out
