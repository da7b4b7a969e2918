"""A drop-in pipeline text encoder backed by an exported graph (ONNX Runtime or TensorRT).

What diffusers' PixArtSigmaPipeline and SanaPipeline use of ``self.text_encoder`` (diffusers 0.42,
``pipelines/pixart_alpha/pipeline_pixart_sigma.py`` ``encode_prompt`` and
``pipelines/sana/pipeline_sana.py`` ``_get_gemma_prompt_embeds`` / ``encode_prompt``):

- the call ``text_encoder(input_ids, attention_mask=mask)[0]``: int64 ids and the tokenizer's int64
  mask, padded to ``max_sequence_length`` (300) on the right; the prompt and the negative prompt
  are encoded in two calls;
- ``dtype``: the text states are cast to it (then to the transformer's); the graph text encoder
  says float32 and casts its output (float16 for a TensorRT export) to float32;
- ``device`` (through the pipeline's ``device`` / ``_execution_device``), and SANA hands the
  module to ``scale_lora_layers`` only with a LoRA scale, which ``loraq generate`` never passes.

``config`` is the pipeline text encoder's transformers config (T5Config, Gemma2Config) as its
``text_encoder/config.json`` gives it. The graph is what ``loraq export --component text_encoder``
(or ``--component all``) writes: inputs ``input_ids``, ``attention_mask``; output the hidden states
(batch, sequence, hidden) (loraq_export/models/text_encoders.py).
"""
from __future__ import annotations

from typing import Mapping

import torch

from loraq_export.errors import UserError
from loraq_export.runtime.runners import GraphModule

HIDDEN_KEYS = ("d_model", "hidden_size")  # T5Config, Gemma2Config


def text_config(config):
    """A transformers config object from a config.json dict (``model_type`` picks the class);
    a config object is returned as it is."""
    if not isinstance(config, Mapping):
        return config
    from transformers import AutoConfig, PretrainedConfig

    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    model_type = cfg.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **cfg) if model_type else PretrainedConfig(**cfg)
    except (ValueError, TypeError, KeyError):
        return PretrainedConfig(**cfg)


def hidden_size(config):
    """The text encoder's output width from its config (object or dict), or None."""
    for key in HIDDEN_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class GraphTextEncoder(GraphModule):
    """``pipe.text_encoder`` replacement that runs ``runner`` (see runners.py) on each call.

    Returns transformers' ``BaseModelOutput`` (``[0]`` and ``.last_hidden_state`` both give the
    hidden states), or a tuple with ``return_dict=False``. ``calls`` counts the graph runs."""

    def __init__(self, runner, config):
        super().__init__(runner, text_config(config))

    def forward(self, input_ids=None, attention_mask=None, return_dict: bool = True, **_):
        if input_ids is None:
            raise UserError("the graph text encoder needs input_ids, as diffusers' PixArt and SANA pipelines pass them")
        ids = torch.as_tensor(input_ids)
        named = {"input_ids": ids}
        if attention_mask is not None:
            named["attention_mask"] = torch.as_tensor(attention_mask)
        elif "attention_mask" in self.runner.inputs:  # no mask given: every token counts
            named["attention_mask"] = torch.ones(ids.shape, dtype=torch.int64)
        states = self.run_graph(named, ids.device)
        if not return_dict:
            return (states,)
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=states)


def _pipeline_text_config(pipe):
    """The text encoder config of a pipeline, a PipelineFolder, or a config itself."""
    if hasattr(pipe, "text_encoder_config"):  # runtime.pipeline.PipelineFolder
        return pipe.text_encoder_config
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None:
        return encoder.config
    return pipe


def check_text_encoder_fits(graph, pipe, source: str = "the text encoder ONNX") -> None:
    """One UserError line when the graph (a ``GraphTextEncoder`` or a runner) does not fit the text
    encoder of ``pipe`` (a pipeline, a ``PipelineFolder`` or the text encoder's config): input
    names, then the hidden size of its output against the pipeline text encoder's config."""
    runner = getattr(graph, "runner", graph)
    fix = "export this pipeline's text encoder (loraq export PIPELINE_FOLDER --component text_encoder, or --component all)"
    if "input_ids" not in runner.inputs or set(runner.inputs) - {"input_ids", "attention_mask"}:
        what = ("a diffusion transformer's graph, pass it with --onnx" if "hidden_states" in runner.inputs
                else "not a text encoder exported by loraq export")
        raise UserError(f"{source} takes {', '.join(runner.inputs)}, not input_ids and attention_mask: it is {what}; "
                        f"{fix}")
    want = hidden_size(_pipeline_text_config(pipe))
    shape = getattr(runner, "output_shapes", {}).get(runner.output_names[0], ())
    got = shape[2] if len(shape) == 3 and isinstance(shape[2], int) and shape[2] > 0 else None
    if len(shape) not in (0, 3):
        raise UserError(f"{source} returns a rank-{len(shape)} output, not the (batch, sequence, hidden) states of a "
                        f"text encoder; {fix}")
    if got is not None and want is not None and got != want:
        raise UserError(f"{source} does not fit the pipeline's text encoder: hidden size {got}, the pipeline's text "
                        f"encoder has {want}; {fix}")
