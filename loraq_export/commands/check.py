"""``loraq check MODEL.onnx --target T``: read the file a user hands us (one clear line when it is
not what it should be), then check it against the target's rules (graphs.check)."""
from __future__ import annotations

from pathlib import Path

import onnx

from loraq_export.errors import UserError


def load_onnx_for_check(path: Path) -> onnx.ModelProto:
    from loraq_export.inputs import readable
    path = readable(path, "ONNX file", "pass the model.onnx written by loraq export")  # missing, unreadable
    if not path.is_file():
        raise UserError(f"{path} is a folder, not an ONNX file; pass the model.onnx inside it")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); pass a .onnx file") from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes); pass a .onnx file")
    quantized = any(n.op_type in ("DequantizeLinear", "MatMulNBits") for n in model.graph.node)
    if not quantized:
        raise UserError(f"{path} has no quantized layers (no DequantizeLinear or MatMulNBits); "
                        "pass the model.onnx written by loraq export, not model_fp.onnx")
    return model


def run_check(path: Path, target: str) -> int:
    """Print each violation; exit status 0 when the model passes, 1 when not."""
    from graphs.check import check_main
    return check_main(load_onnx_for_check(path), target)
