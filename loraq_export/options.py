"""What a user asked for on the command line, handed to the commands (``loraq export``/``quantize``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Options:
    model: Optional[str] = None  # None: the bundled MiniLM
    recipe: Optional[str] = None  # a recipe string or file; None: the default recipe
    method: Optional[str] = None  # overrides the recipe's method
    out: Path = Path("loraq-out")
    overwrite: bool = False
    fp_onnx: bool = False
    num_layers: Optional[int] = None
    seed: int = 0
    workers: Optional[int] = None
    progress: bool = True
    quality: bool = True
    target: str = "ort"
    fuse: bool = True
    convert: bool = False  # let the target legalizer convert what it cannot express (tensorrt: 4-bit activations)
    budget: Optional[float] = None  # bits per weight: allocate per-layer formats under it (fit/allocation.py)
    dtype: Optional[str] = None  # graph float type, fp16 or fp32; None: the target's default
    component: Optional[str] = None  # a pipeline's transformer, text_encoder, or all (models/pipeline_components.py)
    lora: Optional[list] = None  # LoRA adapter files (commands/lora.py)
    lora_scale: Optional[list] = None  # one scale per file, default 1
    lora_format: str = "fp16"  # adapter factor storage: fp16, int8, branch
    lora_slot: Optional[int] = None  # export: empty run-time adapter slots of this rank


def graph_dtype(opts: Options) -> str:
    """The graph's float type: ``opts.dtype``, else the target's default (TensorRT's strongly typed
    networks take their precision from the ONNX types: fp16 for deployment; ONNX Runtime: fp32)."""
    if opts.dtype not in (None, "fp16", "fp32"):
        from loraq_export.errors import UserError
        raise UserError(f"unknown dtype {opts.dtype!r}; choose fp16 or fp32")
    return opts.dtype or ("fp16" if opts.target == "tensorrt" else "fp32")
