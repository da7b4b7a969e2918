"""Published configs of the pipelines' text encoders, as presets with seeded random weights.

- ``t5-v1_1-xxl``: the encoder of google/t5-v1_1-xxl (config.json: d_model 4096, d_ff 10240,
  d_kv 64, num_heads 64, num_layers 24, vocab_size 32128, feed_forward_proj "gated-gelu",
  relative_attention_num_buckets 32, layer_norm_epsilon 1e-6), PixArt-Sigma's text_encoder
  (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, text_encoder/config.json, T5EncoderModel):
  4.76B parameters, 19 GB in float32, 9.5 GB as presets are built (bfloat16).
- ``gemma-2-2b``: google/gemma-2-2b(-it), SANA's text_encoder (Gemma2Model): the defaults of
  transformers' ``Gemma2Config`` (models/gemma2/configuration_gemma2.py: vocab 256000, hidden
  2304, intermediate 9216, 26 layers, 8 heads, 4 key-value heads, head_dim 256, sliding window
  4096, attention logit soft-capping 50): 2.61B parameters.
"""
from __future__ import annotations

import copy

TEXT_ENCODER_PRESETS: dict[str, tuple[str, dict]] = {
    "t5-v1_1-xxl": ("T5EncoderModel", {
        "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": False,
    }),
    "gemma-2-2b": ("Gemma2Model", {
        "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 2,
    }),
}
LAYER_KEY = {"T5EncoderModel": "num_layers", "Gemma2Model": "num_hidden_layers"}
# The pipeline each encoder belongs to, with its transformer preset (memory tables).
PIPELINES = {"pixart-sigma": ("pixart-sigma", "t5-v1_1-xxl"), "sana-600m": ("sana-600m", "gemma-2-2b"),
             "sana-1.6b": ("sana-1.6b", "gemma-2-2b")}


def text_encoder_preset(name: str, num_layers: int | None = None) -> tuple[str, dict]:
    """(class name, a copy of the config) with ``num_layers`` overriding the depth."""
    from loraq_export.errors import UserError
    if name not in TEXT_ENCODER_PRESETS:
        raise UserError(f"unknown text encoder preset {name!r}: choose one of {', '.join(sorted(TEXT_ENCODER_PRESETS))}")
    cls_name, config = TEXT_ENCODER_PRESETS[name]
    config = copy.deepcopy(config)
    if num_layers is not None:
        if int(num_layers) < 1:
            raise UserError(f"--num-layers must be at least 1, got {num_layers}")
        config[LAYER_KEY[cls_name]] = int(num_layers)
    return cls_name, config


def build_text_encoder_preset(name: str, num_layers: int | None = None, seed: int = 0):
    """In bfloat16, as the published checkpoints are used (PixArt-Sigma and SANA load their text
    encoders in a 16-bit dtype): what ``tools/write_text_encoder_folder.py`` writes, so a preset by
    name and its folder give the same results, and the full T5-XXL takes 9.5 GB, not 19."""
    from loraq_export.models.text_encoders import build_stored
    cls_name, config = text_encoder_preset(name, num_layers)
    return build_stored(cls_name, config, seed)
