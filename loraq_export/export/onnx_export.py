"""torch -> ONNX (TorchScript exporter, opset 21) -> QDQ via graphs.write_qdq."""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from graphs.constants import OPSET, PLACEHOLDER_DOMAIN
from graphs.qdq import placeholder_io, write_qdq
from graphs.runtime import write_model
from loraq_export.export.large_tensors import embeddings_in_row_blocks
from loraq_export.export.layer_specs import layer_spec
from loraq_export.fit.swap import LoraqLinear, placeholders
from loraq_export.models.base import LoadedModel


def _torch_export(loaded: LoadedModel, inputs: tuple, path: Path) -> None:
    from loraq_export.models.stored_dtype import upcast_remaining
    upcast_remaining(loaded.wrapper)  # no 16-bit initializer and Cast in the graph: what the float32 flow writes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected
        torch.onnx.export(loaded.wrapper, inputs, str(path), dynamo=False, opset_version=OPSET,
                          input_names=loaded.input_names, output_names=loaded.output_names,
                          dynamic_axes=loaded.dynamic_axes, custom_opsets={PLACEHOLDER_DOMAIN: 1},
                          do_constant_folding=True)


class LayerSpecs(Mapping):
    """layer -> its LayerSpec, built when the writer asks for it, so one layer's codes at a time
    are held as numpy int4 (a byte per value): all of T5-XXL's at once would be 4.6 GB."""

    def __init__(self, layers: dict[str, LoraqLinear]):
        self._layers = layers

    def __getitem__(self, name: str):
        m = self._layers[name]
        return layer_spec(m.record, m.bias)

    def __contains__(self, name) -> bool:  # Mapping's own would build the spec
        return name in self._layers

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def export_graph(loaded: LoadedModel, inputs: tuple) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """Export the model as it currently is: swapped LoraqLinear layers become QDQ subgraphs.
    Also returns each quantized layer's (input, output) tensor names, for layer-wise validation."""
    quant = {m.layer_name: m for m in loaded.module.modules() if isinstance(m, LoraqLinear)}
    with tempfile.TemporaryDirectory(prefix="loraq-export-") as tmp:
        path = Path(tmp) / "traced.onnx"
        with torch.no_grad(), placeholders(loaded.module), embeddings_in_row_blocks(loaded.module):
            _torch_export(loaded, inputs, path)
        model = onnx.load(str(path))  # loads external data, if the exporter wrote any
    io = placeholder_io(model)
    if quant:
        model = write_qdq(model, LayerSpecs(quant))
    model.producer_name = "loraq"
    return model, io


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``path`` (plus ``path.data`` for models over ~1.8 GB); returns the files written.
    Callers write into a staging directory that is renamed into place when complete."""
    return write_model(model, path)
