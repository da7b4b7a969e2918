"""Model sources: the embedded MiniLM, diffusion presets, local diffusers / transformers folders."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel, names_preset

__all__ = ["LoadedModel", "load_model", "describe_sources"]


def describe_sources() -> str:
    from loraq_export.models.diffusion import preset_names
    from loraq_export.models.text_encoder_presets import TEXT_ENCODER_PRESETS
    return (f"'minilm' (default), presets {', '.join(preset_names() + sorted(TEXT_ENCODER_PRESETS))}, "
            "or a local diffusers/transformers folder")


def load_model(model: Optional[str] = None, num_layers: Optional[int] = None, seed: int = 0,
               component: Optional[str] = None) -> LoadedModel:
    """Resolve what the user named: None/'minilm', a preset name, or a local folder (an existing
    folder wins over a preset of the same name: ``./pixart-sigma`` is the folder); ``component``
    (transformer, text_encoder) picks one model of a pipeline (pipeline_components.py)."""
    from loraq_export.models import diffusion, diffusion_folders, minilm, pipeline_components

    if component is not None:
        return pipeline_components.load_component(model, component, num_layers, seed)
    if model is None or names_preset(model.lower(), minilm.ALIASES, model):
        if num_layers is not None:
            raise UserError("--num-layers applies to the presets only")
        return minilm.load_minilm()
    from loraq_export.models.text_encoder_presets import TEXT_ENCODER_PRESETS
    if names_preset(model, TEXT_ENCODER_PRESETS):
        return pipeline_components.text_encoder_preset_model(model, num_layers, seed)
    if names_preset(model, diffusion.PRESETS):
        if num_layers is not None and num_layers < 1:
            raise UserError(f"--num-layers must be at least 1, got {num_layers}")
        module = diffusion.build_preset(model, num_layers=num_layers, seed=seed)
        return diffusion.make_diffusion_model(module, model, {"preset": model, "seed": seed, "num_layers": num_layers})
    path = Path(model)
    from loraq_export.store.checkpoint import refuse_checkpoint_as_model
    from loraq_export.inputs import readable
    if not os.path.lexists(path) and not _stat_denied(path):
        raise UserError(f"model {model!r} not found: pass {describe_sources()}")
    readable(path, "model path", f"pass {describe_sources()}")  # permissions, dangling links
    refuse_checkpoint_as_model(path)
    if num_layers is not None:
        raise UserError("--num-layers applies to the presets only, not to a folder")
    config = path / "config.json"
    if path.is_dir() and config.is_file() and not (path / "model_index.json").exists():
        readable(config, "config file", "re-save the model")
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{config} is not readable JSON ({e}); re-save the model") from None
        if isinstance(cfg, dict) and "_class_name" not in cfg and "model_type" in cfg:
            from loraq_export.models.text_encoders import MODEL_TYPES, load_text_encoder_folder
            if cfg["model_type"] in MODEL_TYPES:
                return load_text_encoder_folder(path, cfg["model_type"])
            return minilm.load_bert(path, path.name)
    module, source = diffusion_folders.load_diffusers_folder(path)
    return diffusion.make_diffusion_model(module, path.name, source)


def _stat_denied(path: Path) -> bool:
    try:
        os.lstat(path)
    except PermissionError:
        return True
    except OSError:
        pass
    return False
