"""A drop-in diffusers transformer backed by an exported graph (ONNX Runtime or TensorRT).

What diffusers' PixArtSigmaPipeline and SanaPipeline use of ``self.transformer`` (diffusers 0.42,
``pipelines/pixart_alpha/pipeline_pixart_sigma.py`` and ``pipelines/sana/pipeline_sana.py``,
``__call__``):

- ``config``: in_channels (latent channels), out_channels (twice in_channels: learned sigma, the
  pipeline keeps the first half), sample_size (default size; resolution binning), patch_size,
  timestep_scale (SANA multiplies the timestep by it);
- ``dtype``: SANA casts latents and text states to it; PixArt encodes prompts in it when there is
  no text encoder. The graph transformer says float32: the pipeline's tensors stay float32 and are
  cast to the graph's own input types (float16 for a TensorRT export) at the boundary;
- the call ``transformer(latents, encoder_hidden_states=, encoder_attention_mask=, timestep=,
  added_cond_kwargs=, return_dict=False)[0]`` (SANA passes attention_kwargs instead of
  added_cond_kwargs). With classifier-free guidance the batch is doubled (negative prompt first);
  PixArt passes int64 timesteps from DPM-Solver, SANA float32 ones; the text mask is the
  tokenizer's int64 attention mask. The exported graph takes float32 timesteps and an int64 mask
  (loraq_export/models/diffusion.py) and the torch models cast the timestep to float first, so
  int64 -> float32 is exact for timesteps below 2^24.
"""
from __future__ import annotations

from typing import Optional

import torch

from loraq_export.errors import UserError
from loraq_export.runtime.runners import GraphModule

REQUIRED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states")


class GraphTransformer(GraphModule):
    """``pipe.transformer`` replacement that runs ``runner`` (see runners.py) on each call.

    ``config``: the pipeline transformer's config (its ``config.json`` as a dict or diffusers
    FrozenDict). ``calls`` counts the graph runs (a test can see that the graph ran, not torch)."""

    def __init__(self, runner, config):
        from diffusers.configuration_utils import FrozenDict

        super().__init__(runner, FrozenDict(dict(config)))

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, encoder_attention_mask=None,
                added_cond_kwargs=None, attention_kwargs=None, return_dict: bool = True, **_):
        batch = hidden_states.shape[0]
        if timestep is None or encoder_hidden_states is None:
            raise UserError("the graph transformer needs timestep and encoder_hidden_states, as diffusers' "
                            "PixArt and SANA pipelines pass them")
        t = torch.as_tensor(timestep).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        named = {"hidden_states": hidden_states.float(), "timestep": t.float(),
                 "encoder_hidden_states": encoder_hidden_states.float()}
        if encoder_attention_mask is not None:
            named["encoder_attention_mask"] = encoder_attention_mask
        elif "encoder_attention_mask" in self.runner.inputs:  # no mask given: every text token counts
            named["encoder_attention_mask"] = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.int64)
        sample = self.run_graph(named, hidden_states.device)
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)


def check_fits(runner, config, latent_hw: Optional[tuple] = None, source: str = "the ONNX") -> None:
    """One UserError line when ``runner``'s inputs do not fit a transformer with ``config``
    (latent channels, text width, output channels, fixed latent size)."""
    missing = [n for n in REQUIRED_INPUTS if n not in runner.inputs]
    if missing:
        what = ("a text encoder's graph: pass it with --text-encoder-onnx" if "input_ids" in runner.inputs
                else "not a diffusion transformer exported by loraq export; pass that model.onnx")
        raise UserError(f"{source} has no input {', '.join(missing)} (it has {', '.join(runner.inputs)}): it is {what}")
    hs, text = runner.inputs["hidden_states"], runner.inputs["encoder_hidden_states"]
    wants = [("hidden_states channels", hs.dim(1), config.get("in_channels")),
             ("encoder_hidden_states width", text.dim(2), config.get("caption_channels"))]
    out_shape = getattr(runner, "output_shapes", {}).get(runner.output_names[0], ())
    if len(out_shape) > 1 and isinstance(out_shape[1], int):
        wants.append(("output channels", out_shape[1], config.get("out_channels")))
    for what, got, want in wants:
        if got is not None and want is not None and got != want:
            raise UserError(f"{source} does not fit the pipeline's transformer: {what} {got}, the pipeline's "
                            f"transformer has {want}; export the transformer of this pipeline (loraq export "
                            "PIPELINE_FOLDER)")
    if latent_hw is not None:
        fixed = (hs.dim(2), hs.dim(3))
        if all(d is not None for d in fixed) and fixed != tuple(latent_hw):
            raise UserError(f"{source} was exported for {fixed[0]}x{fixed[1]} latents and the requested size needs "
                            f"{latent_hw[0]}x{latent_hw[1]}; leave out --height/--width (they default to the "
                            "ONNX's size) or export at that size")


def fixed_latent_hw(runner) -> Optional[tuple]:
    """The latent (H, W) a graph was exported for, or None where they are dynamic."""
    hs = runner.inputs.get("hidden_states")
    if hs is None:
        return None
    h, w = hs.dim(2), hs.dim(3)
    return (h, w) if h is not None and w is not None else None
