"""Checkpoints a user can reload and ship.

A checkpoint is a directory:
- ``config.json``: the model's own config (diffusers ``_class_name`` or transformers
  ``model_type``) with a ``quantization_config`` keyed by ``quant_method: "loraq"`` (the
  diffusers convention) holding the format version, recipe, method, seed and per-layer formats;
- ``model.safetensors``: every tensor of the model, with each quantized layer stored as packed
  codes and scales in nunchaku's naming (``qweight``, ``wscales``, ``wzeros``, ``proj_down``,
  ``proj_up``; a LoRA adapter term as ``lora_down``, ``lora_up``, with the adapters listed under
  ``quantization_config["lora"]``); the same JSON in the file's metadata, so the file alone is self-describing;
- tokenizer files for transformers models, so quality can be re-evaluated from the checkpoint.

Codes are stored in (in, out) layout, INT4 packed two per byte low nibble first (ONNX's layout).
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


from loraq_export.errors import UserError
from loraq_export.store.layer_tensors import record_from, record_meta, record_tensors

QUANT_METHOD = "loraq"
CHECKPOINT_VERSION = 4  # 2: layers may carry an input rotation; 3: a bias shift (gptq); 4: a LoRA adapter term. Older versions still read
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def model_config(loaded) -> dict:
    cfg = loaded.module.config
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    else:
        d = {k: v for k, v in dict(cfg).items()}
        d["_class_name"] = type(loaded.module).__name__
    return json.loads(json.dumps(d, default=str))


def quantization_config(recipe, seed: int, records: dict, skipped: dict, source: dict, target: str = "ort") -> dict:
    """``source`` says how to reload the FP original (model argument, num_layers), so that
    ``loraq export CKPT`` can compare against it when it is still available."""
    return {"quant_method": QUANT_METHOD, "version": CHECKPOINT_VERSION, "recipe": recipe.to_dict(),
            "method": recipe.method, "seed": seed, "source": source, "target": target,
            "layers": {n: record_meta(records[n]) for n in sorted(records)}, "skipped": dict(sorted(skipped.items()))}


def write_checkpoint(stage: Path, loaded, records: dict, qconfig: dict) -> None:
    """Write config.json and model.safetensors into ``stage`` (a staging directory)."""
    from safetensors.torch import save_file
    tensors = {}
    replaced = set()
    for name in sorted(records):
        tensors.update(record_tensors(name, records[name]))
        replaced.add(f"{name}.weight")  # the layer's float weight is replaced by its codes
    aliases = tied_aliases(loaded.module.state_dict())
    for key, value in loaded.module.state_dict().items():
        if key not in replaced and key not in aliases:
            tensors[key] = value.detach().contiguous()
    meta_json = json.dumps(qconfig, sort_keys=True)
    # One metadata key only: safetensors writes its metadata map in hash order, which differs
    # between processes, and checkpoints must be byte-identical across runs.
    save_file(tensors, str(stage / WEIGHTS), metadata={"quantization_config": meta_json})
    config = model_config(loaded)
    config["quantization_config"] = qconfig
    (stage / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    src = loaded.source.get("path")
    from loraq_export.models.text_encoders import SUPPORTED as TEXT_ENCODERS
    if type(loaded.module).__name__ in TEXT_ENCODERS:
        if loaded.source.get("tokenizer") is not None:  # a pipeline's tokenizer/ is not beside the model
            loaded.source["tokenizer"].save_pretrained(str(stage))
    elif loaded.kind == "bert" and src:
        for f in TOKENIZER_FILES:
            if (Path(src) / f).is_file():
                shutil.copyfile(Path(src) / f, stage / f)


def tied_aliases(state: dict) -> dict[str, str]:
    """Keys whose tensor is another key's (tied weights: T5's ``encoder.embed_tokens`` is its
    ``shared``) -> that first key. Stored once; the model ties them again when it is built (or
    ``_retie`` does, for a model built on meta)."""
    first: dict = {}
    out = {}
    for key, t in state.items():
        # a meta tensor has no storage: the same object is the same tensor (``keep_vars=True``)
        ptr = (id(t) if t.is_meta else (t.data_ptr(), tuple(t.shape))) if t.numel() else None
        if ptr is not None and ptr in first:
            out[key] = first[ptr]
        elif ptr is not None:
            first[ptr] = key
    return out


def is_checkpoint(path: Path) -> bool:
    p = Path(path)
    try:
        return (p / CONFIG).is_file() and "quantization_config" in json.loads((p / CONFIG).read_text())
    except (OSError, ValueError, TypeError):  # unreadable: the model loader says why
        return False


def weights_quantization_config(path: Path) -> Optional[str]:
    """The quantization_config JSON that a checkpoint's model.safetensors carries (None if none)."""
    from safetensors import safe_open
    try:
        with safe_open(str(Path(path) / WEIGHTS), "pt") as f:
            return (f.metadata() or {}).get("quantization_config")
    except Exception:  # absent, unreadable or damaged: not recognizably a checkpoint
        return None


def refuse_checkpoint_as_model(path: Path) -> None:
    """A loraq checkpoint where an FP model is expected (``loraq quantize CKPT``, or a checkpoint
    whose config.json lost its quantization_config) is refused rather than loaded wrongly."""
    p = Path(path)
    if not p.is_dir():
        return
    if is_checkpoint(p):
        raise UserError(f"{p} is a loraq checkpoint (already quantized), not an FP model; quantize the original "
                        f"model, or export the checkpoint with 'loraq export {p}'")
    if weights_quantization_config(p) is not None:
        raise UserError(f"checkpoint {p}: {CONFIG} has no quantization_config, but {WEIGHTS} is a loraq checkpoint; "
                        f"restore {CONFIG} from the original checkpoint or re-run loraq quantize")


def read_quantization_config(path: Path) -> tuple[dict, dict]:
    p = Path(path)
    try:
        config = json.loads((p / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p / CONFIG} is not readable JSON ({e}); the checkpoint is damaged, re-run loraq quantize") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise UserError(f"{p} has no loraq quantization_config in config.json; pass a checkpoint written by 'loraq quantize'")
    v = q.get("version")
    if not isinstance(v, int) or v > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {p} has format version {v}, this loraq reads up to {CHECKPOINT_VERSION}; upgrade loraq")
    for key in ("recipe", "layers", "method"):
        if key not in q:
            raise UserError(f"checkpoint {p}: quantization_config lacks '{key}'; the checkpoint is damaged, re-run loraq quantize")
    return config, q


def _build_module(config: dict, path: Path):
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    if "_class_name" in cfg:
        from loraq_export.models.diffusion import SUPPORTED, diffusers_class
        cls_name = cfg["_class_name"]
        if cls_name not in SUPPORTED:
            raise UserError(f"checkpoint {path} holds unsupported class {cls_name!r}; supported are {', '.join(SUPPORTED)}")
        cls = diffusers_class(cls_name)
        return cls.from_config(cfg)
    from loraq_export.models.text_encoders import MODEL_TYPES, build_from_config
    if cfg.get("model_type") in MODEL_TYPES:  # T5EncoderModel, not AutoModel's encoder-decoder T5Model
        return build_from_config(MODEL_TYPES[cfg["model_type"]], cfg, random=False)
    if "model_type" in cfg:
        from transformers import AutoConfig, AutoModel
        mcfg = AutoConfig.for_model(**cfg)
        mcfg._attn_implementation = "eager"
        return AutoModel.from_config(mcfg)
    raise UserError(f"checkpoint {path}: config.json names neither a diffusers class nor a transformers model_type")


@contextmanager
def _parameters_on_meta():
    """Modules built inside hold their parameters on the meta device (no memory, no init cost);
    buffers are made as usual, so the tables a model computes in ``__init__`` and does not save
    (rotary frequencies) are right. The technique of accelerate's
    ``init_empty_weights(include_buffers=False)``: wrap ``Module.register_parameter``. A
    checkpoint's quantized layers replace their float weights, so those are never materialized
    (a full T5-XXL built in float32 would take 19 GB for weights nobody reads)."""
    from torch import nn
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one already (weights tied after the build) stays itself
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _refuse_missing(path: Path, missing: set) -> None:
    if missing:
        raise UserError(f"checkpoint {path}: {len(missing)} tensors of the model are missing (first: {min(missing)}); "
                        "the checkpoint does not match its config, re-run loraq quantize")


def _retie(module, tied: dict[str, str]) -> None:
    """``load_state_dict(assign=True)`` puts the loaded tensor under the first name only: point
    each tied name at it again."""
    for name, source in tied.items():
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        value = module.get_parameter(source) if attr in sub._parameters else module.get_buffer(source)
        setattr(sub, attr, value)


def load_checkpoint(path: Path):
    """Rebuild (LoadedModel with the quantized layers swapped in, records, recipe dict, qconfig)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config, q = read_quantization_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"checkpoint {path} has no {WEIGHTS}; re-run loraq quantize")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights} is corrupted or truncated ({str(e).splitlines()[0]}); re-run loraq quantize") from None
    from loraq_export.inputs import check_finite
    check_finite(sorted(tensors.items()), f"checkpoint {path}", "the checkpoint is damaged, re-run loraq quantize")
    with _parameters_on_meta():
        module = _build_module(config, path).eval()
    records, replaced = {}, set()
    try:
        for name, meta in q["layers"].items():
            records[name] = record_from(name, tensors, meta)
            replaced.add(f"{name}.weight")
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path}: quantization_config disagrees with its tensors ({e}); re-run loraq quantize") from None
    state = module.state_dict(keep_vars=True)
    tied = tied_aliases(state)
    # fresh copies, as load_state_dict's copy_ made: assigned as read from safetensors, the torch
    # reference's sums differed in the last bits from a direct export's (tests/test_cli.py, the
    # checkpoint-equals-direct test; presumably the kernels take another path on the file's offsets)
    own = {k: v.clone() for k, v in tensors.items() if k in state}
    expected = set(state) - replaced - set(tied)
    _refuse_missing(path, expected - set(own))
    try:
        module.load_state_dict(own, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape the config does not give
        raise UserError(f"checkpoint {path}: its tensors do not fit the model its config describes "
                        f"({' '.join(str(e).split())[:300]}); re-run loraq quantize") from None
    _retie(module, {k: v for k, v in tied.items() if k not in own})
    module.float()
    # what neither the file nor a tie filled is still on meta
    _refuse_missing(path, {k for k, t in module.state_dict(keep_vars=True).items() if t.is_meta and k not in replaced})
    for name, rec in records.items():
        try:
            lin = module.get_submodule(name)
        except AttributeError:
            raise UserError(f"checkpoint {path}: quantization_config names layer {name}, which the model has not; "
                            "the checkpoint does not match its config, re-run loraq quantize") from None
        if (lin.in_features, lin.out_features) != (rec.in_features, rec.out_features):
            raise UserError(f"checkpoint {path}: layer {name} is {lin.in_features}x{lin.out_features} in the model "
                            f"but {rec.in_features}x{rec.out_features} in the checkpoint; re-run loraq quantize")
    loaded = _wrap(module, path, config)
    return loaded, records, q


def _wrap(module, path: Path, config: dict):
    if "_class_name" in config:
        from loraq_export.models.diffusion import make_diffusion_model
        return make_diffusion_model(module, path.name, {"checkpoint": str(path)})
    from loraq_export.models.text_encoders import MODEL_TYPES, make_text_encoder_model, tokenizer_if_any
    if config.get("model_type") in MODEL_TYPES:
        return make_text_encoder_model(module, tokenizer_if_any(path), path.name, {"checkpoint": str(path)})
    from loraq_export.models.minilm import wrap_bert
    return wrap_bert(module, path, path.name)


def load_quantized_model(path):
    """The quantized torch model of a checkpoint, ready to run: its Linear layers are replaced
    by QuantLinear modules computing exactly what the exported ONNX computes."""
    from loraq_export.fit.swap import swap_in
    loaded, records, _ = load_checkpoint(Path(path))
    swap_in(loaded.module, records)
    return loaded.module
