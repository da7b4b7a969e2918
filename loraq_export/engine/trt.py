"""TensorRT through Polygraphy: build a strongly typed engine, run it beside ONNX Runtime, time it.

TensorRT and Polygraphy are imported lazily, inside these functions: without them every caller
gets one UserError line saying what is missing and how to install it (``require_tensorrt``),
before anything is written. Facts relied on (docs/deployment.md, "TensorRT"):
- explicit quantization needs a strongly typed network and no precision flags: the ONNX types
  set the precision (NVIDIA, TensorRT developer guide, "Working with Quantized Types");
- Polygraphy: ``network_from_onnx_path(path, strongly_typed=True)``, ``CreateConfig(profiles=,
  load_timing_cache=)``, ``engine_bytes_from_network(..., save_timing_cache=)``, ``TrtRunner``,
  ``OnnxrtRunner(SessionFromOnnx(path))``, ``Comparator.run`` (NVIDIA/TensorRT,
  tools/Polygraphy, polygraphy/backend/trt/config.py and loader.py);
- ``TrtRunner.last_inference_time()`` is host time around the whole inference (copies
  included): GPU compute time is measured here with CUDA events around ``execute_async_v3``
  (the CUDA runtime's cudaEventRecord / cudaEventElapsedTime, via Polygraphy's cudart handle).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from loraq_export.engine.shapes import Profile
from loraq_export.errors import UserError

INSTALL = ("pip install tensorrt polygraphy (on a desktop GPU; TensorRT 10.3 or newer) or, on a Jetson, "
           "JetPack 6's python3-libnvinfer plus pip install polygraphy")


def require_tensorrt():
    """The ``tensorrt`` module, or one UserError line naming what is missing and how to install it."""
    missing = []
    for name in ("tensorrt", "polygraphy"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
        except Exception as e:  # noqa: BLE001 - a broken install (no libnvinfer, no driver) is missing too
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if missing:
        raise UserError(f"TensorRT is missing ({', '.join(missing)} cannot be imported); install it: {INSTALL}")
    import tensorrt
    return tensorrt


def _trt_profiles(profile: Profile) -> list:
    from polygraphy.backend.trt import Profile as TrtProfile
    if not profile.shapes:
        return []
    p = TrtProfile()
    for name, (lo, opt, hi) in profile.shapes.items():
        p.add(name, min=lo, opt=opt, max=hi)
    return [p]


def build_engine_bytes(onnx_path: Path, profile: Profile, timing_cache: Path, refittable: bool = False) -> bytes:
    """A serialized strongly typed engine for ``onnx_path`` over ``profile``; the timing cache is
    read when it exists and written back (shared between builds of the same GPU). ``refittable``:
    BuilderFlag.REFIT, so that ``refit_engine_bytes`` can replace weights (LoRA slots) later."""
    require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path
    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=_trt_profiles(profile), refittable=refittable,
                          load_timing_cache=str(timing_cache) if timing_cache.exists() else None)
    try:
        data = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    except Exception as e:  # noqa: BLE001 - Polygraphy reports parser / builder failures as exceptions
        raise UserError(f"TensorRT could not build {onnx_path}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}; "
                        f"run loraq check {onnx_path} --target tensorrt") from None
    return bytes(data)


def _engine_loader(engine_or_onnx: Path, profile: Profile, timing_cache: Path):
    from polygraphy.backend.trt import EngineFromBytes
    if engine_or_onnx.suffix == ".onnx":
        return EngineFromBytes(build_engine_bytes(engine_or_onnx, profile, timing_cache))
    return EngineFromBytes(engine_or_onnx.read_bytes())


def run_both(onnx_path: Path, engine_or_onnx: Path, profile: Profile, feeds: list, timing_cache: Path) -> tuple:
    """({output: [TensorRT arrays]}, {output: [ONNX Runtime arrays]}) on the same ``feeds``,
    through Polygraphy's Comparator."""
    require_tensorrt()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator
    trt_runner = TrtRunner(_engine_loader(engine_or_onnx, profile, timing_cache), name="tensorrt")
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name="onnxruntime")
    results = Comparator.run([trt_runner, ort_runner], data_loader=feeds)
    by_runner = {name: iters for name, iters in results.items()}
    return tuple({out: [it[out] for it in by_runner[r]] for out in by_runner[r][0].keys()}
                 for r in ("tensorrt", "onnxruntime"))


class _Events:
    """GPU time between two CUDA events on a stream (cudart through Polygraphy's handle)."""

    def __init__(self):
        from polygraphy import cuda
        self.rt = cuda.wrapper().handle
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
        for e in (self.start, self.end):
            self._check(self.rt.cudaEventCreate(ctypes.byref(e)))

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA error {status}")

    def time_ms(self, launch, stream_ptr: int) -> float:
        self._check(self.rt.cudaEventRecord(self.start, ctypes.c_void_p(stream_ptr)))
        launch()
        self._check(self.rt.cudaEventRecord(self.end, ctypes.c_void_p(stream_ptr)))
        self._check(self.rt.cudaEventSynchronize(self.end))
        ms = ctypes.c_float()
        self._check(self.rt.cudaEventElapsedTime(ctypes.byref(ms), self.start, self.end))
        return float(ms.value)


def gpu_timer(engine_or_onnx: Path, profile: Profile, feed: dict, timing_cache: Path):
    """(activate, time_once, deactivate): time_once() is the GPU compute time (ms) of one
    execution at ``feed``'s shapes, input copies excluded (one inference first binds the buffers)."""
    require_tensorrt()
    from polygraphy.backend.trt import TrtRunner
    runner = TrtRunner(_engine_loader(engine_or_onnx, profile, timing_cache))
    events = {}

    def activate():
        runner.activate()
        runner.infer(feed)  # sets the input shapes and device buffers on the context
        events["e"] = _Events()

    def time_once() -> float:
        return events["e"].time_ms(lambda: runner.context.execute_async_v3(runner.stream.ptr), runner.stream.ptr)

    return activate, time_once, runner.deactivate


class EngineRunner:
    """A TensorRT engine behind the runner interface of loraq_export/runtime/runners.py
    (``backend``, ``inputs``, ``output_names``, ``run(feed)``), through Polygraphy's ``TrtRunner``
    (host arrays in and out). ``inputs`` / ``output_names`` come from the ONNX it was built from."""

    backend = "tensorrt"

    def __init__(self, plan: Path, inputs: dict, output_names: list):
        require_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        self.inputs, self.output_names = inputs, list(output_names)
        self._runner = TrtRunner(EngineFromBytes(Path(plan).read_bytes()))
        try:
            self._runner.activate()
        except Exception as e:  # noqa: BLE001 - a plan from another TensorRT version / GPU fails to deserialize
            raise UserError(f"TensorRT cannot load the engine {plan} ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}); "
                            "rebuild it on this machine with loraq engine build") from None

    def run(self, feed) -> list:
        out = self._runner.infer(dict(feed))
        return [out[name] for name in self.output_names]

    def close(self) -> None:
        self._runner.deactivate()


def refit_engine_bytes(plan: bytes, weights: dict, what: str) -> bytes:
    """``plan`` (built with --refittable) with the named weights replaced, serialized again.
    TensorRT's Refitter takes the ONNX initializer names (the parser names weights after them);
    each array must keep the element count and type (NVIDIA TensorRT developer guide, "Refitting
    an Engine"; Python API tensorrt.Refitter: set_named_weights, get_missing_weights,
    refit_cuda_engine)."""
    import numpy as np
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise UserError(f"{what} is not a TensorRT engine this TensorRT can load; rebuild it with loraq engine build --refittable")
    if not engine.refittable:
        raise UserError(f"{what} was not built refittable; rebuild it with loraq engine build --refittable")
    refitter = trt.Refitter(engine, logger)
    keep = []  # trt.Weights does not own its memory: the arrays live until the refit is done
    for name, value in weights.items():
        arr = np.ascontiguousarray(value)
        keep.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise UserError(f"{what}: TensorRT has no refittable weight named {name} (or its size differs); "
                            "rebuild the engine with --refittable from the slot graph")
    missing = refitter.get_missing_weights()
    if missing:
        raise UserError(f"{what}: TensorRT needs {len(missing)} more weights refitted with these (first: {missing[0]}); "
                        "please report it")
    if not refitter.refit_cuda_engine():
        raise UserError(f"TensorRT could not refit {what}; rebuild it with loraq engine build --refittable")
    return bytes(engine.serialize())
