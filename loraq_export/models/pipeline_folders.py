"""Whole local diffusers pipeline folders (text encoder + tokenizer, VAE, scheduler, transformer)
with seeded random weights, built offline and written by the pipeline's own ``save_pretrained``:
what ``PixArtSigmaPipeline.from_pretrained(folder)`` / ``SanaPipeline.from_pretrained(folder)``
load. Size "tiny" builds and runs in seconds on a CPU (tests); size "preset" has the published
transformer (docs, examples; see SIZES).

Components per kind (the published pipelines' classes):

- ``pixart-sigma``: T5EncoderModel + T5 tokenizer (Unigram), AutoencoderKL (8x downsampling, 4
  latent channels, SDXL-VAE scaling factor 0.13025), DPMSolverMultistepScheduler,
  PixArtTransformer2DModel.
- ``sana``: Gemma2Model + Gemma tokenizer (BPE), AutoencoderDC (scaling factor 0.41407, as
  dc-ae-f32c32-sana-1.0), FlowMatchEulerDiscreteScheduler (shift 3.0), SanaTransformer2DModel.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from loraq_export.errors import UserError
from loraq_export.models.diffusion import build_from_config
from loraq_export.models.diffusion_presets import SCHEDULERS, tiny_config
from loraq_export.models.random_text_encoders import (  # noqa: F401  (re-exported builders)
    build_gemma2_encoder,
    build_gemma_tokenizer,
    build_t5_encoder,
    build_t5_tokenizer,
)

KINDS = ("pixart-sigma", "sana")
# tiny: every component at toy width (tests: seconds on a CPU). preset: the published transformer
# config (loraq_export/models/diffusion_presets.py; ``num_layers`` makes it shallower) with text
# encoders of the published output width (T5-XXL 4096, Gemma-2-2B 2304) but one thin layer, and
# toy VAEs of the published downsampling and latent channels (8x / 4 for PixArt, 32x / 32 for SANA).
SIZES = ("tiny", "preset")
PRESET_OF = {"pixart-sigma": "pixart-sigma", "sana": "sana-600m"}
PRESET_T5 = {"d_kv": 16, "num_heads": 4, "d_ff": 64, "num_layers": 1}
PRESET_GEMMA2 = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
                 "num_hidden_layers": 1}

# Tiny VAEs whose latent channels match the tiny transformers (PixArt 4, SANA 8).
TINY_AUTOENCODER_KL = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),  # 4 blocks: 8x downsampling, as the SDXL VAE
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64,
    "scaling_factor": 0.13025,  # SDXL VAE (PixArt-Sigma's), vae/config.json
}
TINY_AUTOENCODER_DC = {
    "in_channels": 3, "latent_channels": 8, "attention_head_dim": 8,
    "encoder_block_types": ("ResBlock", "ResBlock", "EfficientViTBlock"),
    "decoder_block_types": ("ResBlock", "ResBlock", "EfficientViTBlock"),
    "encoder_block_out_channels": (8, 16, 16), "decoder_block_out_channels": (8, 16, 16),  # 4x downsampling
    "encoder_layers_per_block": (1, 1, 1), "decoder_layers_per_block": (1, 1, 1),
    "encoder_qkv_multiscales": ((), (), (5,)), "decoder_qkv_multiscales": ((), (), (5,)),
    "scaling_factor": 0.41407,  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, config.json
}
PRESET_AUTOENCODER_DC = {  # 6 blocks: 32x downsampling, 32 latent channels, as dc-ae-f32c32-sana-1.0
    **TINY_AUTOENCODER_DC, "latent_channels": 32,
    "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "encoder_block_out_channels": (8, 8, 16, 16, 32, 32), "decoder_block_out_channels": (8, 8, 16, 16, 32, 32),
    "encoder_layers_per_block": (1,) * 6, "decoder_layers_per_block": (1,) * 6,
    "encoder_qkv_multiscales": ((),) * 3 + ((5,),) * 3, "decoder_qkv_multiscales": ((),) * 3 + ((5,),) * 3,
}


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().float().eval()


def build_scheduler(kind: str):
    import diffusers

    cls_name, config = SCHEDULERS["pixart" if kind == "pixart-sigma" else "sana"]
    return getattr(diffusers, cls_name)(**config)


def build_pipeline(kind: str = "pixart-sigma", size: str = "tiny", seed: int = 0, num_layers: int | None = None):
    """The diffusers pipeline object (float32, CPU) with seeded random weights in every component;
    ``num_layers``: the preset transformer's depth (size "preset" only)."""
    import diffusers

    from loraq_export.models.diffusion import build_preset

    if kind not in KINDS:
        raise UserError(f"unknown pipeline kind {kind!r}: choose one of {', '.join(KINDS)}")
    if size not in SIZES:
        raise UserError(f"unknown pipeline size {size!r}: choose one of {', '.join(SIZES)}")
    if num_layers is not None and size != "preset":
        raise UserError("num_layers applies to size 'preset' only")
    if size == "preset":
        transformer = build_preset(PRESET_OF[kind], num_layers=num_layers, seed=seed)
    else:
        transformer = build_from_config(*tiny_config(PRESET_OF[kind]), seed=seed)
    width = transformer.config.caption_channels
    if kind == "pixart-sigma":
        tokenizer = build_t5_tokenizer()
        text_encoder = build_t5_encoder({**(PRESET_T5 if size == "preset" else {}), "d_model": width}, seed=seed + 1)
        vae = _seeded(lambda: diffusers.AutoencoderKL(**TINY_AUTOENCODER_KL), seed + 2)
        cls = diffusers.PixArtSigmaPipeline
    else:
        tokenizer = build_gemma_tokenizer()
        text_encoder = build_gemma2_encoder({**(PRESET_GEMMA2 if size == "preset" else {}), "hidden_size": width},
                                            seed=seed + 1)
        dc = PRESET_AUTOENCODER_DC if size == "preset" else TINY_AUTOENCODER_DC
        vae = _seeded(lambda: diffusers.AutoencoderDC(**dc), seed + 2)
        cls = diffusers.SanaPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=build_scheduler(kind))


def write_pipeline_folder(path, kind: str = "pixart-sigma", size: str = "tiny", seed: int = 0,
                          num_layers: int | None = None) -> Path:
    """Write a whole pipeline folder at ``path`` with ``save_pretrained`` (safetensors, float32).

    Written to a temporary folder beside ``path`` and renamed into place: no partial folder is left
    behind. ``path`` must not exist yet. Returns ``path``.
    """
    out = Path(path).expanduser()
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder for the pipeline")
    pipe = build_pipeline(kind, size, seed, num_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
