"""Published configs of the bundled diffusion-transformer presets.

Each preset is ``name -> (diffusers class name, constructor kwargs)``. Only keys that the diffusers
class takes are listed (the published config.json files carry a few legacy keys, e.g.
``use_linear_projection``, that the dedicated classes ignore).
"""
from __future__ import annotations

import copy

PRESETS: dict[str, tuple[str, dict]] = {
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json (published with the legacy
    # "_class_name": "Transformer2DModel", which diffusers remaps to PixArtTransformer2DModel because
    # norm_type is ada_norm_single). Same values as diffusers'
    # scripts/convert_pixart_sigma_to_diffusers.py for --image_size 1024 without --micro_condition.
    "pixart-sigma": (
        "PixArtTransformer2DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,  # 16 x 72 = 1152 hidden
            "in_channels": 4,
            "out_channels": 8,  # learned sigma: epsilon = first 4 channels
            "num_layers": 28,
            "dropout": 0.0,
            "norm_num_groups": 32,
            "cross_attention_dim": 1152,
            "attention_bias": True,
            "sample_size": 128,
            "patch_size": 2,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "upcast_attention": False,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "interpolation_scale": 2,
            "use_additional_conditions": False,
            "caption_channels": 4096,  # T5-XXL
            "attention_type": "default",
        },
    ),
    # Efficient-Large-Model/Sana_600M_1024px_diffusers, transformer/config.json; same values as
    # diffusers' scripts/convert_sana_to_diffusers.py, model_type SanaMS_600M_P1_D28, image_size 1024.
    "sana-600m": (
        "SanaTransformer2DModel",
        {
            "in_channels": 32,
            "out_channels": 32,
            "num_attention_heads": 36,
            "attention_head_dim": 32,  # 36 x 32 = 1152 hidden
            "num_layers": 28,
            "num_cross_attention_heads": 16,
            "cross_attention_head_dim": 72,
            "cross_attention_dim": 1152,
            "caption_channels": 2304,  # Gemma-2-2B
            "mlp_ratio": 2.5,
            "dropout": 0.0,
            "attention_bias": False,
            "sample_size": 32,
            "patch_size": 1,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "interpolation_scale": None,  # no positional embedding at 1024px
        },
    ),
    # Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json; same values as
    # diffusers' scripts/convert_sana_to_diffusers.py, model_type SanaMS_1600M_P1_D20, image_size 1024.
    "sana-1.6b": (
        "SanaTransformer2DModel",
        {
            "in_channels": 32,
            "out_channels": 32,
            "num_attention_heads": 70,
            "attention_head_dim": 32,  # 70 x 32 = 2240 hidden
            "num_layers": 20,
            "num_cross_attention_heads": 20,
            "cross_attention_head_dim": 112,
            "cross_attention_dim": 2240,
            "caption_channels": 2304,
            "mlp_ratio": 2.5,
            "dropout": 0.0,
            "attention_bias": False,
            "sample_size": 32,
            "patch_size": 1,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "interpolation_scale": None,
        },
    ),
}

# Width-reducing overrides that keep each class's structure (tests, tiny pipeline folders: ~50k
# parameters, fast on CPU).
TINY_OVERRIDES: dict[str, dict] = {
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

# The presets' pipeline schedulers: kind -> (diffusers scheduler class, constructor kwargs).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, scheduler/scheduler_config.json: DPM-Solver++(2M) on the
    # linear-beta DDPM schedule, epsilon prediction (= DPMSolverMultistepScheduler() defaults, which is
    # what diffusers' scripts/convert_pixart_sigma_to_diffusers.py writes into the pipeline).
    "pixart": (
        "DPMSolverMultistepScheduler",
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "solver_order": 2,
            "prediction_type": "epsilon",
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "lower_order_final": True,
            "timestep_spacing": "linspace",
            "steps_offset": 0,
        },
    ),
    # SANA, flow matching with the 1024px flow shift 3.0 (Efficient-Large-Model/Sana_600M_1024px_diffusers
    # and Sana_1600M_1024px_diffusers scheduler configs; diffusers' scripts/convert_sana_to_diffusers.py,
    # scheduler_type "flow-euler": FlowMatchEulerDiscreteScheduler(shift=flow_shift), flow_shift=3.0).
    "sana": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> tuple[str, dict]:
    """(class name, a copy of the constructor kwargs) of a preset; UserError for an unknown name."""
    from loraq_export.errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown diffusion preset {name!r}: choose one of {', '.join(preset_names())}")
    cls_name, config = PRESETS[name]
    return cls_name, copy.deepcopy(config)


def tiny_config(name: str) -> tuple[str, dict]:
    """A small config of the same class as preset ``name`` (same structure, tiny widths, 1 layer)."""
    cls_name, config = preset_config(name)
    config.update(copy.deepcopy(TINY_OVERRIDES[cls_name]))
    return cls_name, config
