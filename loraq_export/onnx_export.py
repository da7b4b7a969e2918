"""torch -> ONNX (TorchScript exporter, opset 21) -> QDQ via graphs.write_qdq."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from calibless.record import QuantizedLinear
from graphs.qdq import MARKER_DOMAIN, MARKER_OP, write_qdq
from loraq_export.graph_records import linear_qdq
from loraq_export.models.base import LoadedModel
from loraq_export.swap import QuantLinear, placeholders

OPSET = 21
# Protobuf's hard limit is 2 GiB; above this, weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _torch_export(loaded: LoadedModel, inputs: tuple, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected
        torch.onnx.export(loaded.wrapper, inputs, str(path), dynamo=False, opset_version=OPSET,
                          input_names=loaded.input_names, output_names=loaded.output_names,
                          dynamic_axes=loaded.dynamic_axes, custom_opsets={"loraq": 1},
                          do_constant_folding=True)


def placeholder_io(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """layer -> (input tensor name, output tensor name) of each placeholder; write_qdq keeps both."""
    return {layer: (n.input[0], n.output[0]) for layer, n in
            ((n.attribute[0].s.decode(), n) for n in model.graph.node
             if n.domain == MARKER_DOMAIN and n.op_type == MARKER_OP)}


def export_graph(loaded: LoadedModel, inputs: tuple) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """Export the model as it currently is: swapped QuantLinear layers become QDQ subgraphs.
    Also returns each quantized layer's (input, output) tensor names, for layer-wise validation."""
    quant = {m.layer_name: m for m in loaded.module.modules() if isinstance(m, QuantLinear)}
    with tempfile.TemporaryDirectory(prefix="loraq-export-") as tmp:
        path = Path(tmp) / "traced.onnx"
        with torch.no_grad(), placeholders(loaded.module):
            _torch_export(loaded, inputs, path)
        model = onnx.load(str(path))  # loads external data, if the exporter wrote any
    io = placeholder_io(model)
    if quant:
        model = write_qdq(model, {name: linear_qdq(m.record, m.bias) for name, m in quant.items()})
    model.producer_name = "loraq"
    return model, io


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``path`` (plus ``path.data`` for models over ~1.8 GB); returns the files written.
    Callers write into a staging directory that is renamed into place when complete."""
    path = Path(path)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        return [path, path.with_name(path.name + ".data")]
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    return [path]


def records_of(module: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {m.layer_name: m.record for m in module.modules() if isinstance(m, QuantLinear)}
