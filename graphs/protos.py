"""ModelProto copies, exports and writes that work past protobuf's 2 GiB message limit.

The protobuf runtime refuses to serialize a message over 2 GiB, and its ``CopyFrom`` of a whole
message (what ``onnx.helper.make_model`` and so ``onnx_graphsurgeon.export_onnx`` do with the
graph) goes through serialization, so a model whose weights pass 2 GiB (a 4-bit T5-XXL encoder is
3.1 GB) fails there. Copying field by field only serializes one element at a time (one tensor:
the limit becomes 2 GiB per tensor), and writing to disk puts the weights in an ONNX external
data file (https://onnx.ai/onnx/repo-docs/ExternalData.html), the form ONNX Runtime and TensorRT
load models over 2 GiB from.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import onnx

from graphs.constants import EXTERNAL_DATA_THRESHOLD

# Tensors over 1 MiB start at a multiple of 64 KiB in the data file, so a loader can map them
# (Windows' allocation granularity; 4 KiB pages elsewhere): what ONNX Runtime's and onnx_ir's own
# external-data writers do (https://onnx.ai/ir-py/_modules/onnx_ir/external_data.html).
_ALIGN_THRESHOLD, _ALIGNMENT = 1 << 20, 1 << 16

# Weights over this are copied into an exported model one at a time, after its structure.
_WEIGHT_IN_PLACE_BYTES = 1 << 16


def _copy_fields(src, dst) -> None:
    for field, value in src.ListFields():
        # protobuf 6 has is_repeated and deprecates label, which protobuf 7 drops
        if (field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED):
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            sub = getattr(dst, field.name)
            sub.SetInParent()  # present even when empty: an empty shape is a scalar's, no shape is unknown rank
            _copy_fields(value, sub)
        else:
            setattr(dst, field.name, value)


def serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``; protobuf refuses to count past 2 GiB, so then 2**31 (over the limit
    is all a caller needs to know)."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf's EncodeError; its module path differs across runtimes
        return 2**31


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model``, like ``CopyFrom``, of any total size."""
    out = onnx.ModelProto()
    _copy_fields(model, out)
    return out


def _header(t):
    """A data-less stand-in of constant ``t`` (dims and type in an external-data header that is
    never read), or None for a constant that is passed as it is."""
    import numpy as np
    from onnx_graphsurgeon.ir.tensor import LazyValues
    values = t._values
    if isinstance(values, LazyValues):
        dims, dtype = list(values.tensor.dims), values.tensor.data_type
    elif isinstance(values, np.ndarray) and t._export_dtype is None:
        try:
            dims, dtype = list(values.shape), onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        except (KeyError, ValueError, TypeError):
            return None
    else:
        return None
    stub = onnx.TensorProto(name=t.name, dims=dims, data_type=dtype, data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="header-only")
    return LazyValues(stub)


@contextmanager
def weights_as_headers(graph, min_bytes: int):
    """Within: every constant of ``graph`` over ``min_bytes`` is a header without its data (what
    shape inference and the graph's structure need); yields them, restored on exit."""
    from onnx_graphsurgeon import Constant
    swapped = []
    try:
        for t in graph.tensors().values():
            if isinstance(t, Constant) and getattr(t._values, "nbytes", 0) > min_bytes:
                stub = _header(t)
                if stub is not None:
                    swapped.append((t, t._values))
                    t._values = stub
        yield [t for t, _ in swapped]
    finally:
        for t, values in swapped:
            t._values = values


def export_model(graph) -> onnx.ModelProto:
    """``onnx_graphsurgeon.export_onnx(graph)``, of any total size: the same model. The graph is
    exported with its weights as headers, then each weight is copied in once, in place: one copy of
    the weights is made, where export_onnx (graph, then model) makes two."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
    with weights_as_headers(graph, _WEIGHT_IN_PLACE_BYTES) as weights:
        onnx_graph = OnnxExporter.export_graph(graph)
    model = onnx.helper.make_model(onnx.GraphProto(), opset_imports=update_import_domains(graph),
                                   functions=[OnnxExporter.export_function(f) for f in graph.functions])
    _copy_fields(onnx_graph, model.graph)
    del onnx_graph
    by_name = {t.name: t for t in weights}
    for init in model.graph.initializer:
        t = by_name.get(init.name)
        if t is not None:
            init.CopyFrom(OnnxExporter.export_tensor_proto(t))
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def write_model(model: onnx.ModelProto, path: Union[str, Path], external: Optional[bool] = None) -> list[Path]:
    """Write ``model`` to ``path``, fsynced; returns the files written. Over
    EXTERNAL_DATA_THRESHOLD (or with ``external``), its raw initializers of 1 KiB or more go to
    ``path.data`` beside it. Unlike ``onnx.save_model(save_as_external_data=True)``,
    which clears the caller's tensors, ``model`` is left as it was: each tensor is moved out while
    the file is written and read back after, so no second copy of the weights is held."""
    from onnx.external_data_helper import set_external_data
    path = Path(path)
    if external is None:
        external = serialized_size(model) > EXTERNAL_DATA_THRESHOLD
    if not external:
        _write_synced(path, model.SerializeToString())
        return [path]
    data = path.with_name(path.name + ".data")
    moved = []
    try:
        with open(data, "wb") as f:
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") or t.ByteSize() < 1024:
                    continue
                raw = t.raw_data
                if len(raw) > _ALIGN_THRESHOLD:
                    f.write(b"\0" * (-f.tell() % _ALIGNMENT))
                offset = f.tell()
                f.write(raw)
                set_external_data(t, location=data.name, offset=offset, length=len(raw))
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                moved.append((t, offset, len(raw)))
                del raw
            f.flush()
            os.fsync(f.fileno())
        _write_synced(path, model.SerializeToString())
    finally:
        with open(data, "rb") as f:
            for t, offset, length in moved:
                f.seek(offset)
                t.raw_data = f.read(length)
                del t.external_data[:]
                t.ClearField("data_location")
    return [path, data]


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
