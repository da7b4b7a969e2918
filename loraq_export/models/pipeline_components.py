"""Choosing one model of a pipeline (``--component``): the transformer or the text encoder of a
local diffusers pipeline folder (``model_index.json``), or of a pipeline preset (pixart-sigma's
text encoder is the t5-v1_1-xxl preset, SANA's gemma-2-2b).

A diffusers pipeline folder lists its components in model_index.json as
``name: [library, class]`` with one subfolder each; the tokenizer is its own component
(``tokenizer/``) beside ``text_encoder/`` (diffusers ``DiffusionPipeline.from_pretrained``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel, names_preset

COMPONENTS = ("transformer", "text_encoder")  # the components with Linear layers loraq quantizes
CHOICES = COMPONENTS + ("all",)


def _index(root: Path) -> dict:
    from loraq_export.models.diffusion_folders import _read_json
    return _read_json(root / "model_index.json")


def _present(index: dict, root: Path, name: str) -> bool:
    entry = index.get(name)
    return (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None and (root / name).is_dir())


def is_pipeline_folder(model: Optional[str]) -> bool:
    return model is not None and (Path(model) / "model_index.json").is_file()


def pipeline_presets() -> dict:
    from loraq_export.models.text_encoder_presets import PIPELINES
    return PIPELINES


def components_of(model: Optional[str]) -> list[str]:
    """The quantizable components a pipeline folder or pipeline preset has, in COMPONENTS order."""
    if names_preset(model, pipeline_presets()):
        return list(COMPONENTS)
    if not is_pipeline_folder(model):
        raise UserError(f"--component needs a pipeline: a diffusers pipeline folder (with model_index.json) or a "
                        f"pipeline preset ({', '.join(pipeline_presets())}); {model or 'minilm'} is neither")
    root = Path(model)
    index = _index(root)
    found = [c for c in COMPONENTS if _present(index, root, c)]
    if not found:
        raise UserError(f"pipeline {root} has none of the components loraq quantizes ({', '.join(COMPONENTS)})")
    return found


def load_component(model: Optional[str], component: str, num_layers: Optional[int], seed: int) -> LoadedModel:
    if component not in COMPONENTS:
        raise UserError(f"unknown component {component!r}: choose one of {', '.join(CHOICES)}")
    present = components_of(model)
    if component not in present:
        root = Path(model)
        listed = ", ".join(k for k in sorted(_index(root)) if not k.startswith("_")) or "nothing"
        raise UserError(f"pipeline {root} has no {component} component (model_index.json lists {listed}; "
                        f"a {component}/ subfolder is needed): choose one of {', '.join(present)}")
    if names_preset(model, pipeline_presets()):
        transformer, encoder = pipeline_presets()[model]
        if component == "text_encoder":
            return text_encoder_preset_model(encoder, num_layers, seed)
        from loraq_export.models import load_model
        return load_model(transformer, num_layers, seed)
    root = Path(model)
    if num_layers is not None:
        raise UserError("--num-layers applies to the presets only, not to a folder")
    if component == "transformer":
        from loraq_export.models import diffusion, diffusion_folders
        module, source = diffusion_folders.load_diffusers_folder(root)
        return diffusion.make_diffusion_model(module, f"{root.name}/transformer", {**source, "component": "transformer"})
    return load_pipeline_text_encoder(root)


def load_pipeline_text_encoder(root: Path) -> LoadedModel:
    from loraq_export.models.text_encoders import SUPPORTED, load_text_encoder, supported_list
    cls_name = _index(root)["text_encoder"][1]
    if cls_name not in SUPPORTED:
        raise UserError(f"unsupported text encoder class {cls_name!r} in {root / 'model_index.json'}: "
                        f"supported are {supported_list()}")
    tok = root / "tokenizer"
    if not tok.is_dir():
        raise UserError(f"pipeline {root} has no tokenizer/ folder beside text_encoder/; copy the pipeline's "
                        "tokenizer there (input statistics and validation prompts are tokenized with it)")
    return load_text_encoder(root / "text_encoder", cls_name, tok, f"{root.name}/text_encoder",
                             {"path": os.fspath(root), "layout": "pipeline", "component": "text_encoder"})


def text_encoder_preset_model(name: str, num_layers: Optional[int], seed: int) -> LoadedModel:
    from loraq_export.models.text_encoder_presets import build_text_encoder_preset
    from loraq_export.models.text_encoders import make_text_encoder_model
    module = build_text_encoder_preset(name, num_layers, seed)
    return make_text_encoder_model(module, None, name, {"preset": name, "seed": seed, "num_layers": num_layers})
