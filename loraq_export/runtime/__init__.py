"""Running an exported artifact: an ONNX Runtime session or a TensorRT engine behind one runner
interface (runners.py), as a diffusers pipeline's transformer (transformer.py) or text encoder
(text_encoder.py), inside a local pipeline folder (pipeline.py). Used by ``loraq generate``, the
export report's sampling check and the bench's sampling metric; an ONNX Runtime session with
swappable LoRA adapters (lora_session.py)."""
from loraq_export.runtime.runners import InputSpec, OrtRunner, feed_for, onnx_specs, open_engine, open_onnx
from loraq_export.runtime.text_encoder import GraphTextEncoder, check_text_encoder_fits
from loraq_export.runtime.transformer import GraphTransformer, check_fits, fixed_latent_hw

__all__ = ["GraphTextEncoder", "GraphTransformer", "InputSpec", "OrtRunner", "check_fits", "check_text_encoder_fits",
           "feed_for", "fixed_latent_hw", "onnx_specs", "open_engine", "open_onnx"]
