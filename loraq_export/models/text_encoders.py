"""The pipelines' text encoders as models to quantize: T5 (PixArt-Sigma's ``T5EncoderModel``) and
Gemma-2 (SANA's ``Gemma2Model``), from a bare transformers folder, a pipeline's ``text_encoder/``
(with its ``tokenizer/``), or a preset with the published config and seeded random weights.

ONNX interface (what the pipelines read; diffusers PixArtSigmaPipeline.encode_prompt and
SanaPipeline._get_gemma_prompt_embeds both call ``text_encoder(input_ids,
attention_mask=mask)[0]``)::

    input_ids      int64   (batch, sequence)
    attention_mask int64   (batch, sequence)   1 = token, 0 = padding
    -> last_hidden_state float32 (batch, sequence, hidden)

Every Linear is quantized (attention q/k/v/o and the feed-forward); the token embedding, the
relative-position / rotary tables and the RMS norms stay as they are. Input statistics come from
token sequences drawn from the tokenizer with its own frequency prior (token_priors.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from loraq_export.errors import UserError
from loraq_export.models.base import LoadedModel
from loraq_export.models.stored_dtype import keep_linear_weights_stored

# transformers class -> model kind. The pipelines' own classes: PixArtSigmaPipeline types its
# text_encoder T5EncoderModel, SanaPipeline Gemma2PreTrainedModel (published: Gemma2Model).
SUPPORTED: dict[str, str] = {"T5EncoderModel": "t5", "Gemma2Model": "gemma2"}
MODEL_TYPES = {"t5": "T5EncoderModel", "gemma2": "Gemma2Model"}  # config.json model_type -> class
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
OUTPUT = "last_hidden_state"
SYNTHETIC_SEQUENCES = 256  # input statistics: 256 sequences of 6..40 tokens, ~6000 token rows


# What a float16 T5 graph keeps in float32 (graphs/float16.py), as transformers computes a float16
# T5: ``_keep_in_fp32_modules = ["wo"]`` keeps the feed-forward output projections in float32
# (their activations overflow float16); T5DenseGatedActDense casts wo's input up; the residual
# add then promotes the residual stream to float32, and T5LayerNorm computes its variance in
# float32 before casting back to the weight's type (models/t5/modeling_t5.py). Node names are the
# TorchScript exporter's module scopes (the wrapper holds the encoder as ``model``) and the QDQ
# writer's layer names.
T5_FLOAT32 = {
    r"^(encoder\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo[./]|/model/encoder/block\.\d+/layer\.\d+/DenseReluDense/wo/)":
        "feed-forward output projections wo (transformers' _keep_in_fp32_modules)",
    r"^/model/encoder/block\.\d+/layer\.\d+/Add(_\d+)?$": "residual stream (float32 once wo's output joins it)",
    r"^/model/encoder/(block\.\d+/layer\.\d+/layer_norm|final_layer_norm)/(Cast|Pow|ReduceMean|Add|Sqrt|Div|Mul)$":
        "RMS-norm statistics (T5LayerNorm computes them in float32)",
}

# Gemma2RMSNorm normalizes in float32 (``self._norm(x.float())``) and casts back
# (models/gemma2/modeling_gemma2.py); a float16 graph keeps the same statistics in float32 (x^2
# overflows float16 once |x| > 256). The weight multiply, which makes the graph output, stays float16.
GEMMA2_FLOAT32 = {
    r"^/model/(layers\.\d+/[a-z_]+layernorm|norm)/(Cast|Pow|ReduceMean|Add|Sqrt|Div|Mul)$":
        "RMS-norm statistics (Gemma2RMSNorm computes them in float32)",
}
FLOAT32_REGIONS = {"T5EncoderModel": T5_FLOAT32, "Gemma2Model": GEMMA2_FLOAT32}


def supported_list() -> str:
    return ", ".join(SUPPORTED)


def transformers_class(name: str):
    if name not in SUPPORTED:
        raise UserError(f"unsupported text encoder class {name!r}: supported are {supported_list()}")
    import transformers
    return getattr(transformers, name)


class TextEncoderWrapper(nn.Module):
    """Positional (input_ids, attention_mask) -> the hidden states the pipelines read ([0])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def select_encoder_linear(name: str, linear: nn.Linear) -> tuple[bool, str]:
    what = "attention" if any(k in name for k in (".SelfAttention.", ".self_attn.")) else "feed-forward"
    return True, f"encoder Linear ({what})"


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: Path, fix: str):
    if not _has_tokenizer(folder):
        raise UserError(f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); {fix}")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / tokenizers' own errors
        raise UserError(f"cannot load the tokenizer in {folder} ({str(e).splitlines()[0][:200]}); {fix}") from None
    tok.padding_side = "right"  # as SanaPipeline sets it; T5's default already
    return tok


def tokenizer_if_any(folder: Path):
    """The tokenizer saved in ``folder`` (a checkpoint), or None where there is none."""
    return load_tokenizer(folder, "re-run loraq quantize") if _has_tokenizer(folder) else None


def load_text_encoder(folder: Path, cls_name: str, tokenizer_folder: Path, name: str, source: dict) -> LoadedModel:
    """``cls_name`` from ``folder`` in the folder's stored dtype (Linear weights stay so, the rest float32), its tokenizer from
    ``tokenizer_folder``; every weight must be in the files (no random fill)."""
    from loraq_export.models.diffusion_folders import _check_weights
    cls = transformers_class(cls_name)
    tokenizer = load_tokenizer(tokenizer_folder, "copy the model's tokenizer files there")
    stored = _check_weights(folder)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    kwargs = {"local_files_only": True, "output_loading_info": True, "attn_implementation": "eager"}
    if stored is not None:
        kwargs["dtype"] = stored
    try:
        model, info = cls.from_pretrained(str(folder), **kwargs)
    except Exception as e:
        raise UserError(f"cannot load {cls_name} from {folder} ({str(e).splitlines()[0][:200]}); "
                        "re-download or re-save the model") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{folder}: {len(missing)} weight(s) missing from its weights files (first: {missing[0]}); "
                        "re-download or re-save the model")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    src = {"path": str(Path(source.pop("path", folder)).resolve()), **source, "class": cls_name, "dtype": dtype,
           "tokenizer_path": str(tokenizer_folder.resolve())}
    return make_text_encoder_model(model, tokenizer, name, src)


def load_text_encoder_folder(path: Path, model_type: str) -> LoadedModel:
    """A bare transformers folder (config.json with model_type t5 / gemma2) with its tokenizer files."""
    return load_text_encoder(path, MODEL_TYPES[model_type], path, path.name, {"path": str(path), "layout": "transformers"})


def _prompts() -> list[str]:
    from loraq_export.models.minilm import sentences
    return sentences()


def make_text_encoder_model(module: nn.Module, tokenizer, name: str, source: Optional[dict] = None,
                            prior: str = "auto") -> LoadedModel:
    """Wrap a T5EncoderModel / Gemma2Model (``tokenizer`` None for a preset: inputs are then ids
    drawn Zipf over the vocabulary, since there is no tokenizer to read a prior from)."""
    cls_name = type(module).__name__
    if cls_name not in SUPPORTED:
        raise UserError(f"unsupported text encoder class {cls_name!r}: supported are {supported_list()}")
    # a 16-bit checkpoint keeps its Linear weights as stored, computed in float32 (stored_dtype.py):
    # what makes a 4.7B T5-XXL fit in memory, with the float32 flow's results
    keep_linear_weights_stored(module)
    module.eval()
    vocab = int(module.config.vocab_size)
    texts = _prompts()

    def make_inputs(seed: int = 0, batch: int = 2, seq=None):
        """Real sentences tokenized with padding (the seed picks which); random ids without a tokenizer."""
        g = torch.Generator().manual_seed(seed)
        if tokenizer is None:
            n = seq or 12
            ids = torch.randint(1, vocab, (batch, n), generator=g)
            mask = torch.ones(batch, n, dtype=torch.long)
            mask[0, max(1, n - 3):] = 0  # one padded row: the mask path is traced and checked
            return ids * mask, mask
        idx = torch.randperm(len(texts), generator=g)[:batch].tolist()
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=seq or 128,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def synthetic_batches(seed: int = 0):
        from loraq_export.models.token_priors import id_prior_batches, prior_token_batches
        if tokenizer is None:
            return id_prior_batches(vocab, seed=seed)
        return prior_token_batches(tokenizer, prior, sequences=SYNTHETIC_SEQUENCES, seed=seed)

    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + [OUTPUT]}
    src = {"class": cls_name, **(source or {}), "token_prior": prior if tokenizer is not None else "rank (no tokenizer)"}
    if tokenizer is not None:
        src["tokenizer"] = tokenizer
    return LoadedModel(name=name, kind=SUPPORTED[cls_name], module=module, wrapper=TextEncoderWrapper(module).eval(),
                       input_names=names, output_names=[OUTPUT], dynamic_axes=axes, make_inputs=make_inputs,
                       select=select_encoder_linear, synthetic_batches=synthetic_batches, source=src,
                       float32_regions=FLOAT32_REGIONS[cls_name])


def folder_model_type(path: Path) -> Optional[str]:
    """'t5' / 'gemma2' when ``path`` is a transformers folder of a text encoder loraq supports."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) and cfg.get("model_type") in MODEL_TYPES else None


# ----------------------------------------------------------------------------------------------
# Building from a config with seeded random weights (presets, checkpoints)
# ----------------------------------------------------------------------------------------------
def config_for(cls_name: str, config: dict):
    import transformers
    cfg_cls = {"T5EncoderModel": transformers.T5Config, "Gemma2Model": transformers.Gemma2Config}[cls_name]
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "quantization_config")}
    if cls_name == "T5EncoderModel":
        kwargs.update(is_encoder_decoder=False, use_cache=False)
    try:
        cfg = cfg_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {cls_name} config: {e}; fix the config values") from None
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def reinit_(module: nn.Module, seed: int) -> None:
    """Linear weights N(0, 1/fan_in) (unit-scale activations through each layer, as
    diffusion._reinit_), embeddings N(0, 1); norms keep their initial values."""
    gen = torch.Generator().manual_seed(seed)
    for _, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.in_features))
        elif isinstance(mod, nn.Embedding):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))


def build_stored(cls_name: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Seeded random weights held as a 16-bit checkpoint holds them (a preset at full size: T5-XXL
    9.5 GB instead of 19 GB in float32). Built with ``dtype`` as the default dtype, as
    ``from_pretrained(dtype=...)`` builds a model (so non-persistent buffers such as rotary
    tables are what loading that checkpoint computes); the layers transformers keeps in float32
    at that dtype are float32 (T5's ``wo`` at float16, not at bfloat16); weights drawn as ``reinit_``. Saved
    with ``save_pretrained`` and loaded back, it is this model, tensor for tensor."""
    cls = transformers_class(cls_name)
    cfg = config_for(cls_name, config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    # what from_pretrained(dtype=...) keeps float32 (transformers' modeling_utils): the class's
    # _keep_in_fp32_modules at float16 only (T5's wo), _keep_in_fp32_modules_strict at both
    keep32 = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep32 |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and keep32 & set(name.split(".")):
            mod.float()
    reinit_(module, seed)
    return module.eval()


def build_from_config(cls_name: str, config: dict, seed: int = 0, random: bool = True) -> nn.Module:
    cls = transformers_class(cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = cls(config_for(cls_name, config))
    if random:
        reinit_(module, seed)
    return module.float().eval()
