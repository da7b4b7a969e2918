"""Graph runners: one interface over an ONNX Runtime session and a TensorRT engine.

A runner has ``backend`` (a name for reports), ``inputs`` (name -> ``InputSpec``: the graph's
declared element type and shape, a dim that is not a number being dynamic), ``output_names``
and ``run(feed) -> list of arrays`` (numpy in, numpy out, in ``output_names`` order). Everything
that runs an exported graph (``loraq generate``, the export report's sampling check, the bench's
sampling metric) feeds it through ``feed_for``: one place that turns torch tensors into the
graph's input types.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from loraq_export.errors import UserError

# ONNX Runtime's type strings (NodeArg.type) -> numpy.
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type  # numpy scalar type
    shape: tuple  # ints for fixed dims; str / None for dynamic ones

    def dim(self, i: int) -> Optional[int]:
        """The fixed size of dim ``i``, or None where it is dynamic (or absent)."""
        d = self.shape[i] if -len(self.shape) <= i < len(self.shape) else None
        return d if isinstance(d, int) and d > 0 else None


class OrtRunner:
    """An ``onnxruntime.InferenceSession`` behind the runner interface."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name: InputSpec(i.name, ORT_TYPES.get(i.type, np.float32), tuple(i.shape))
                       for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_shapes = {o.name: tuple(o.shape) for o in session.get_outputs()}
        providers = session.get_providers()
        self.backend = "onnxruntime-" + ("cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu")

    def run(self, feed: Mapping[str, np.ndarray]) -> list:
        return self.session.run(None, dict(feed))


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_onnx(path, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> OrtRunner:
    """An ``OrtRunner`` for the ONNX file at ``path`` (weights in external data beside it are
    found by ONNX Runtime); a missing or unreadable file is one UserError line."""
    from graphs.runtime import ort_session
    from loraq_export.inputs import readable

    path = readable(Path(path), "ONNX file", "pass the model.onnx written by loraq export")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the model.onnx file written by loraq export")
    try:
        session = ort_session(str(path), threads=threads, providers=providers or default_providers())
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX Runtime cannot load {path} ({first[:200]}); pass the model.onnx written by "
                        "loraq export") from None
    return OrtRunner(session)


def _to_numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


def feed_for(runner, named: Mapping[str, object]) -> dict:
    """The feed for ``runner`` from tensors by input name, each cast to the graph's declared type.
    Values the graph has no input for are left out (an exported PixArt has no mask input when its
    class takes none); an input the graph needs and ``named`` lacks is a UserError."""
    feed = {}
    for name, spec in runner.inputs.items():
        value = named.get(name)
        if value is None:
            raise UserError(f"the graph needs input {name!r}, which the caller did not give; "
                            "pass an ONNX exported by loraq export for this model")
        arr = _to_numpy(value)
        feed[name] = arr.astype(spec.dtype, copy=False)
    return feed


# onnx.TensorProto element types -> numpy (the graph's inputs: float, float16, int64, int32, bool, double).
ONNX_TYPES = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_, 11: np.float64}


def onnx_specs(path) -> tuple[dict, list, dict]:
    """(inputs as name -> InputSpec, output names, output name -> shape) read from the ONNX file's
    graph (weights not loaded)."""
    import onnx

    from loraq_export.inputs import readable

    path = readable(Path(path), "ONNX file", "pass the model.onnx written by loraq export")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); pass the model.onnx written by "
                        "loraq export") from None

    def shape(vi):
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim)

    inits = {i.name for i in graph.initializer}
    inputs = {vi.name: InputSpec(vi.name, ONNX_TYPES.get(vi.type.tensor_type.elem_type, np.float32), shape(vi))
              for vi in graph.input if vi.name not in inits}
    return inputs, [o.name for o in graph.output], {o.name: shape(o) for o in graph.output}


def open_engine(plan, onnx_path):
    """A TensorRT ``EngineRunner`` for the engine file ``plan`` built from ``onnx_path`` (which
    gives the input names, types and shapes). A missing engine file, then a missing TensorRT, is
    one UserError line."""
    from loraq_export.inputs import readable

    plan = readable(Path(plan), "engine file", f"build it with: loraq engine build {onnx_path} --out {plan}")
    if plan.is_dir():
        raise UserError(f"{plan} is a folder; pass the engine file written by loraq engine build")
    from loraq_export.engine.trt import EngineRunner, require_tensorrt

    require_tensorrt()
    inputs, outputs, shapes = onnx_specs(onnx_path)
    runner = EngineRunner(plan, inputs, outputs)
    runner.output_shapes = shapes
    return runner


class GraphModule(torch.nn.Module):
    """What a pipeline component backed by ``runner`` shares (GraphTransformer, GraphTextEncoder):
    ``config`` (as the subclass makes it), ``dtype`` float32 (the pipeline's tensors stay float32
    and are cast to the graph's own input types at the boundary), ``device`` the CPU (the runner
    takes host arrays and returns host arrays), and ``calls``, the graph runs (a test can see that
    the graph ran, not torch)."""

    def __init__(self, runner, config):
        super().__init__()
        self.runner = runner
        self.config = config
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run_graph(self, named: Mapping[str, object], device) -> torch.Tensor:
        """The graph's first output for the tensors ``named`` (fed through ``feed_for``) as a
        float32 tensor on ``device``."""
        out = self.runner.run(feed_for(self.runner, named))[0]
        self.calls += 1
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(device)
