"""Small QDQ graphs built without torch: random LinearQDQ records written by graphs.qdq.

``layer_record`` makes one quantized layer from numpy; ``chain_model`` stacks several layers
in sequence (layer i's output feeds layer i + 1) behind ``loraq::QuantLinear`` placeholders
and lets ``write_qdq`` write them, exactly as the export path does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphs.qdq import ActQuant, LinearQDQ, QWeight, write_qdq


def qweight(rng: np.random.Generator, k: int, n: int, bits: int = 4, block: Optional[int] = 64,
            symmetric: bool = True, scale: float = 0.02) -> QWeight:
    """Random codes and positive scales; ``block`` None means one scale per output channel."""
    blocks = 1 if block is None else k // block
    if symmetric:
        lo, hi, zp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, None
    else:
        lo, hi = 0, 2**bits - 1
        zp = rng.integers(lo, hi + 1, size=(blocks, n)).astype(np.uint8)
    codes = rng.integers(lo, hi + 1, size=(k, n)).astype(np.int8 if symmetric else np.uint8)
    s = (scale * (0.5 + rng.random((blocks, n)))).astype(np.float32)
    return QWeight(codes, s, zp, bits)


def _act(bits: Optional[int], static: Optional[float] = None) -> Optional[ActQuant]:
    return None if bits is None else ActQuant(bits, static)


def layer_record(k: int, n: int, rank: int = 0, *, main_act: Optional[int] = None, branch: Optional[str] = "w4a8",
                 block: Optional[int] = 64, bias: bool = True, symmetric: bool = True, smooth: bool = False,
                 static: Optional[dict] = None, seed: int = 0) -> LinearQDQ:
    """One layer: INT4 main weight (blocks of ``block`` along K) with activation bits ``main_act``
    (None: W4A16), plus a rank-``rank`` branch in format ``branch`` ('w4a8', 'w4a4', 'w8a8',
    'w6a6', 'fp16' or 'w4a16': INT4 factors, unquantized branch activations).
    ``static``: {'main'|'branch_in'|'branch_mid': scale} for static per-tensor activation scales."""
    rng = np.random.default_rng(seed)
    static = static or {}
    rec = LinearQDQ(weight=qweight(rng, k, n, 4, block, symmetric, scale=1.0 / np.sqrt(k) / 4),
                    act=_act(main_act, static.get("main")))
    if bias:
        rec.bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    if smooth:
        rec.smooth = (0.5 + rng.random(k)).astype(np.float32)
    if rank:
        if branch == "fp16":
            rec.down = (rng.standard_normal((k, rank)) / np.sqrt(k)).astype(np.float16)
            rec.up = (0.1 * rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(np.float16)
            return rec
        wbits, abits = {"w4a8": (4, 8), "w4a4": (4, 4), "w8a8": (8, 8), "w6a6": (6, 6), "w4a16": (4, None)}[branch]
        down_block = block if (block is not None and k % block == 0) else None  # as calibless.record.down_format
        rec.down = qweight(rng, k, rank, wbits, down_block, True, scale=1.0 / np.sqrt(k) / 4)
        rec.up = qweight(rng, rank, n, wbits, None, True, scale=0.1 / np.sqrt(rank) / 4)
        rec.branch_in = _act(abits, static.get("branch_in"))
        rec.branch_mid = _act(abits, static.get("branch_mid"))
    return rec


def placeholder_model(widths: Sequence[int], batch=("batch", "tokens")) -> onnx.ModelProto:
    """x -> QuantLinear(l0) -> QuantLinear(l1) -> ... -> y; ``widths`` = [in, out0, out1, ...]."""
    nodes, prev = [], "x"
    for i in range(len(widths) - 1):
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("QuantLinear", [prev], [out], name=f"ph{i}", domain="loraq", layer=f"l{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, widths[-1]])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("loraq", 1)])


def chain_model(records: Sequence[LinearQDQ]) -> onnx.ModelProto:
    """The QDQ graph of ``records`` applied in sequence (widths must chain)."""
    widths = [records[0].weight.codes.shape[0]] + [r.weight.codes.shape[1] for r in records]
    return write_qdq(placeholder_model(widths), {f"l{i}": r for i, r in enumerate(records)})


def single_model(k: int = 128, n: int = 64, rank: int = 16, **kw) -> onnx.ModelProto:
    return chain_model([layer_record(k, n, rank, **kw)])


def fp32_chain(widths: Sequence[int], seed: int = 0, batch=("batch", "tokens")) -> onnx.ModelProto:
    """The float reference shape: MatMul + Add per layer with float32 weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [onnx.numpy_helper.from_array(w, f"l{i}.w"), onnx.numpy_helper.from_array(b, f"l{i}.b")]
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes += [helper.make_node("MatMul", [prev, f"l{i}.w"], [f"l{i}/mm"], name=f"l{i}/MatMul"),
                  helper.make_node("Add", [f"l{i}/mm", f"l{i}.b"], [out], name=f"l{i}/Add")]
        prev = out
    graph = helper.make_graph(nodes, "fp32", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def inputs(k: int, tokens: int = 8, batch: int = 2, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((batch, tokens, k)).astype(np.float32)}


def run(model: onnx.ModelProto, feeds: dict, accuracy_level: int = 0) -> np.ndarray:
    from loraq_export.validate import ort_session
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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
