"""Local diffusers folders: a whole pipeline (``model_index.json`` + ``transformer/``) or a
transformer folder (``config.json`` with ``_class_name``), loaded as a user's would be, in the
folder's own dtype, with every weights file checked before anything is built."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from loraq_export.errors import UserError
from loraq_export.models.diffusion import SUPPORTED, diffusers_class

# Legacy class names that diffusers itself remaps (diffusers.models.model_loading_utils):
# config["_class_name"] -> {config["norm_type"]: class}. PixArt-Sigma's published folder uses it.
_REMAPPED = {"Transformer2DModel": {"ada_norm_single": "PixArtTransformer2DModel"}}

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; fix or re-download that file") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; fix or re-download that file")
    return data


def _resolve_class(config: dict, config_path: Path) -> str:
    name = config.get("_class_name")
    if not name:
        raise UserError(f"{config_path} has no '_class_name': not a diffusers model folder")
    name = _REMAPPED.get(name, {}).get(config.get("norm_type"), name)
    if name not in SUPPORTED:
        raise UserError(
            f"unsupported diffusers class {name!r} in {config_path}: supported are {', '.join(SUPPORTED)}"
        )
    return name


def _check_weights(folder: Path) -> torch.dtype | None:
    """Open every safetensors file's header (catching truncation/corruption); return the dominant
    floating dtype of the stored tensors, or None when there are no safetensors files."""
    from safetensors import safe_open

    files = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise UserError(f"no weights file (*.safetensors or *.bin) in {folder}; re-download or re-save the model")
    counts: dict[torch.dtype, int] = {}
    from loraq_export.inputs import readable
    for f in files:
        readable(f, "weights file", "re-download or re-save the model")  # permission denied is not corruption
        if not f.name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    t = sf.get_slice(key)
                    dtype = getattr(torch, _ST_DTYPES.get(t.get_dtype(), "uint8"))
                    if dtype.is_floating_point:
                        counts[dtype] = counts.get(dtype, 0) + 1
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise UserError(f"corrupted or truncated weights file {f} ({exc}); re-download or re-save it") from exc
    return max(counts, key=counts.get) if counts else None


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def load_diffusers_folder(path) -> tuple[nn.Module, dict]:
    """Load a transformer from a local diffusers pipeline folder (``model_index.json`` with a
    ``transformer`` entry) or transformer folder (``config.json`` with ``_class_name``).

    Returns the module in float32 / eval and a source dict (path, layout, class, stored dtype).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"model path {root} does not exist; give a local diffusers pipeline or transformer folder")
    if not root.is_dir():
        raise UserError(f"model path {root} is not a folder; give a local diffusers pipeline or transformer folder")
    layout = "transformer"
    folder = root
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        entry = index.get("transformer")
        if not entry or (isinstance(entry, list) and entry[0] is None) or not (root / "transformer").is_dir():
            raise UserError(
                f"pipeline {root} has no 'transformer' entry or transformer/ subfolder; "
                "give a PixArt or SANA pipeline, or the transformer folder itself"
            )
        layout, folder = "pipeline", root / "transformer"
    config_path = folder / "config.json"
    if not config_path.is_file() and layout == "pipeline":
        raise UserError(f"{folder} has no config.json; re-download or re-save the pipeline")
    if not config_path.is_file():
        raise UserError(
            f"{folder} has neither model_index.json nor config.json; give a diffusers pipeline or transformer folder"
        )
    cls_name = _resolve_class(_read_json(config_path), config_path)
    stored = _check_weights(folder)
    cls = diffusers_class(cls_name)
    kwargs = {"local_files_only": True}
    if stored is not None:
        kwargs["torch_dtype"] = stored
    from diffusers.utils import logging as dlogging
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its warnings (missing keys, accelerate) would break the one-line error
    try:
        module, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except Exception as exc:  # diffusers raises OSError / ValueError / safetensors errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load {cls_name} from {folder} ({msg}); re-download or re-save the model") from exc
    finally:
        dlogging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # diffusers would fill them with random values: a silently wrong model
        raise UserError(f"{folder}: {len(missing)} weight(s) missing from its weights files (first: {missing[0]}); "
                        "re-download or re-save the model")
    dtype = next(module.parameters()).dtype
    source = {
        "path": str(root.resolve()),
        "layout": layout,
        "class": cls_name,
        "dtype": str(dtype).removeprefix("torch."),
        "num_layers": int(module.config.num_layers),
    }
    return module.float().eval(), source
