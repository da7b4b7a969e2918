"""ONNX Runtime (CPU) sessions, built in one place for validation, calibration, checks and benchmarks.

``accuracy_level`` is MatMulNBits' ``session.qdq_matmulnbits_accuracy_level``: 0 computes in
float (the reference every comparison uses); ONNX Runtime's default, 4, quantizes activations
to int8 inside the kernel (faster; benchmarks use it and say so).
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence, Union

import onnx

from graphs.constants import EXTERNAL_DATA_THRESHOLD
from graphs.protos import serialized_size, write_model


def ort_session(model: Union[str, onnx.ModelProto], accuracy_level: Optional[int] = 0, threads: Optional[int] = None,
                spinning: Optional[bool] = None, optimized_path: Optional[str] = None,
                optimization_level=None, external_initializers: Optional[str] = None,
                providers: Optional[Sequence[str]] = None, extra_outputs: Sequence[str] = ()):
    """An InferenceSession of ``model`` (a path or a ModelProto), on the CPU unless ``providers``
    says otherwise. ``optimized_path``: also write ONNX Runtime's optimized graph there
    (``external_initializers``: the data file for its weights). ``extra_outputs``: intermediate
    (float) tensors the session also returns, after the model's own outputs."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if accuracy_level is not None:  # None: ONNX Runtime's own default
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimization_level is not None:
        so.graph_optimization_level = optimization_level
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
        if external_initializers:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_initializers)
    providers = list(providers or ["CPUExecutionProvider"])
    if isinstance(model, str):
        if extra_outputs:
            raise ValueError("extra_outputs needs the model, not a path")
        return ort.InferenceSession(model, so, providers=providers)
    # added to the model for as long as it takes to hand it over: a copy of a 4-bit T5-XXL is 3 GB
    own = len(model.graph.output)
    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(n for n in extra_outputs if n not in have):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        return _session_of_proto(ort, model, so, providers)
    finally:
        del model.graph.output[own:]


def _session_of_proto(ort, model: onnx.ModelProto, so, providers: list):
    if serialized_size(model) <= EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    # too large to serialize: ONNX Runtime reads it from disk, weights as external data (they are
    # read or mapped while the session is built, so the files may go once it exists)
    with tempfile.TemporaryDirectory(prefix="loraq-ort-", ignore_cleanup_errors=True) as d:
        path = os.path.join(d, "model.onnx")
        write_model(model, path, external=True)
        return ort.InferenceSession(path, so, providers=providers)


def ort_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's optimized graph (ORT_ENABLE_EXTENDED, CPU), read back from a temp file; its
    nodes only, where its weights went to an external file (gone with the temp folder)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.onnx")
        big = serialized_size(model) > (1 << 30)  # the optimized graph may grow: its own weights go external too
        write_model(model, src, external=big)
        out = os.path.join(d, "optimized.onnx")
        ort_session(src, accuracy_level=None, optimized_path=out,
                    optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    external_initializers="opt.data" if big else None)
        return onnx.load(out, load_external_data=False)  # its nodes are what callers read


def input_specs(model: onnx.ModelProto) -> list[tuple]:
    """(name, numpy dtype, dims) of each graph input that is not an initializer; a dim is its
    int value, or its symbolic name (str; "" when unnamed)."""
    import numpy as np
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        out.append((vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


def random_feed(specs: Sequence[tuple], rng, int_value: int = 0) -> dict:
    """{name: array} for (name, dtype, shape) specs: standard normal floats (drawn in order),
    integers all ``int_value``."""
    import numpy as np
    return {name: (rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating)
                   else np.full(shape, int_value, dt)) for name, dt, shape in specs}
