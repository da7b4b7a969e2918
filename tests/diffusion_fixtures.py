"""Tiny diffusion transformers for the tests: the presets' classes at toy widths (~50k parameters)."""
from __future__ import annotations

from loraq_export.models.diffusion_presets import preset_config

# Width-reducing overrides that keep each class's structure (for tests: ~50k parameters, fast on CPU).
_TINY = {
    "PixArtTransformer2DModel": {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 1,
        "cross_attention_dim": 32,
        "caption_channels": 32,
        "sample_size": 8,
        "interpolation_scale": 1,
    },
    "SanaTransformer2DModel": {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 1,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16,
        "cross_attention_dim": 32,
        "caption_channels": 32,
        "in_channels": 8,
        "out_channels": 8,
        "sample_size": 8,
    },
}


def tiny_config(name: str) -> tuple[str, dict]:
    """A small config of the same class as preset ``name`` (same structure, tiny widths, 1 layer)."""
    cls_name, config = preset_config(name)
    config.update(_TINY[cls_name])
    return cls_name, config
