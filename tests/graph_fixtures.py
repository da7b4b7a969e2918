"""Graphs built by hand for the tests: synthetic layers (graphs.synthetic) plus one-rule-at-a-time
DQ -> MatMul models that the checks must tell apart."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphs.constants import OPSET
from graphs.runtime import ort_session
from graphs.synthetic import chain_model, fp32_chain, inputs, layer_spec, single_model  # noqa: F401 (re-exported)


def run(model: onnx.ModelProto, feeds: dict, accuracy_level: int = 0) -> np.ndarray:
    return ort_session(model, accuracy_level=accuracy_level, threads=1).run(None, feeds)[0]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def dq_matmul_model(k: int = 128, n: int = 64, *, bits: int = 4, signed: bool = True, block: Optional[int] = 64,
                    axis: int = 0, zero_point: int = 0, negative_scale: bool = False, scale_dtype=np.float32,
                    scale_input: bool = False, act: Optional[str] = None, between: Optional[str] = None,
                    consumers: int = 1, name: str = "w.weight_q", seed: int = 0) -> onnx.ModelProto:
    """One weight DQ -> MatMul, built by hand to break one rule at a time.

    ``axis`` 0: blocks of ``block`` rows (None: per-channel, axis 1); ``axis`` 1 with ``block``:
    blocks along N. ``act``: None, 'dynamic8' / 'dynamic4' (per-token Q/DQ), 'static8', 'static_u8',
    'per_channel8' (static 1-D activation scale). ``between``: 'Cast' puts a float Cast between the
    DQ and the MatMul. ``consumers`` 2: the DQ feeds two MatMuls."""
    import ml_dtypes
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    store = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}[(bits, signed)]
    codes = rng.integers(lo, hi + 1, (k, n)).astype(store)
    if block is None:
        shape, attrs = (n,), {"axis": 1}
    elif axis == 0:
        shape, attrs = (k // block, n), {"axis": 0, "block_size": block}
    else:
        shape, attrs = (k, n // block), {"axis": 1, "block_size": block}
    scale = (0.01 + 0.02 * rng.random(shape)).astype(scale_dtype)
    if negative_scale:
        scale.flat[0] = -scale.flat[0]
    inits = [onnx.numpy_helper.from_array(codes, name)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, k])]
    if scale_input:
        inputs.append(helper.make_tensor_value_info("w_scale", onnx.helper.np_dtype_to_tensor_dtype(scale.dtype), list(shape)))
    else:
        inits.append(onnx.numpy_helper.from_array(scale, "w_scale"))
    dq_in = [name, "w_scale"]
    if zero_point or not signed:
        inits.append(onnx.numpy_helper.from_array(np.full(shape, zero_point, store), "w_zp"))
        dq_in.append("w_zp")
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["w"], name="w/DequantizeLinear", **attrs)]
    a = "x"
    if act is not None:
        a = "x_dq"
        if act.startswith("dynamic"):
            b = int(act[len("dynamic"):])
            inits += [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                      onnx.numpy_helper.from_array(np.array(2 ** (b - 1) - 1, np.float32), "qmax"),
                      onnx.numpy_helper.from_array(np.array(1e-8, np.float32), "eps")]
            qa = {"axis": -1, "block_size": k}
            nodes += [helper.make_node("Abs", ["x"], ["x_abs"], name="act/Abs"),
                      helper.make_node("ReduceMax", ["x_abs", "axes"], ["x_amax"], name="act/ReduceMax", keepdims=1),
                      helper.make_node("Div", ["x_amax", "qmax"], ["x_s0"], name="act/Div"),
                      helper.make_node("Max", ["x_s0", "eps"], ["x_s"], name="act/Max"),
                      helper.make_node("QuantizeLinear", ["x", "x_s"], ["x_q"], name="act/QuantizeLinear",
                                       output_dtype=TensorProto.INT4 if b == 4 else TensorProto.INT8, **qa),
                      helper.make_node("DequantizeLinear", ["x_q", "x_s"], ["x_dq"], name="act/DequantizeLinear", **qa)]
        else:
            per_channel = act == "per_channel8"
            s = np.full((k,) if per_channel else (), 0.05, np.float32)
            inits.append(onnx.numpy_helper.from_array(s, "x_s"))
            q_in = ["x", "x_s"]
            extra = {"axis": -1} if per_channel else {}
            if act == "static_u8":
                inits.append(onnx.numpy_helper.from_array(np.array(128, np.uint8), "x_zp"))
                q_in.append("x_zp")
            else:
                extra["output_dtype"] = TensorProto.INT8
            nodes += [helper.make_node("QuantizeLinear", q_in, ["x_q"], name="act/QuantizeLinear", **extra),
                      helper.make_node("DequantizeLinear", ["x_q"] + q_in[1:], ["x_dq"], name="act/DequantizeLinear",
                                       **{k_: v for k_, v in extra.items() if k_ == "axis"})]
    w = "w"
    if between == "Cast":
        nodes.append(helper.make_node("Cast", ["w"], ["w_cast"], name="w/Cast", to=TensorProto.FLOAT))
        w = "w_cast"
    outputs = []
    for i in range(consumers):
        y = "y" if i == 0 else f"y{i}"
        nodes.append(helper.make_node("MatMul", [a, w], [y], name=f"w/MatMul_{i}"))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", 8, n]))
    graph = helper.make_graph(nodes, "dq_matmul", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
