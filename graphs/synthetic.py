"""Synthetic QDQ graphs built without torch, for the measuring tools and the tests: random
layers written by ``write_qdq`` exactly as the export path writes a model's layers.

``layer_spec`` makes one quantized layer from numpy; ``chain_model`` stacks several layers in
sequence (layer i's output feeds layer i + 1) behind placeholders; ``fp32_chain`` is the float
model of the same shape.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphs.constants import OPSET, PLACEHOLDER_DOMAIN, PLACEHOLDER_OP
from graphs.qdq import ActQuant, LayerSpec, write_qdq
from graphs.tensors import QuantizedWeight, int_dtype


def random_weight(rng: np.random.Generator, k: int, n: int, bits: int = 4, block: Optional[int] = 64,
                  symmetric: bool = True, scale: float = 0.02) -> QuantizedWeight:
    """Random codes and positive scales; ``block`` None means one scale per output channel."""
    blocks = 1 if block is None else k // block
    if symmetric:
        lo, hi, zp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, None
    else:
        lo, hi = 0, 2**bits - 1
        zp = rng.integers(lo, hi + 1, size=(blocks, n)).astype(np.uint8)
    dtype = int_dtype(bits, symmetric)
    codes = rng.integers(lo, hi + 1, size=(k, n)).astype(dtype)
    s = (scale * (0.5 + rng.random((blocks, n)))).astype(np.float32)
    return QuantizedWeight(codes, s, None if zp is None else zp.astype(dtype), k // blocks)


def _act(bits: Optional[int], group: Optional[int] = None, width: int = 0) -> Optional[ActQuant]:
    if bits is None:
        return None
    return ActQuant(bits, group if group is not None and group < width and width % group == 0 else None)


def layer_spec(k: int, n: int, rank: int = 0, *, main_act: Optional[int] = None, branch: Optional[str] = "w4a8",
               block: Optional[int] = 64, bias: bool = True, symmetric: bool = True, act_group: Optional[int] = None,
               rotation: Optional[int] = None, seed: int = 0) -> LayerSpec:
    """One layer: INT4 main weight (blocks of ``block`` along K) with activation bits ``main_act``
    (None: W4A16), plus a rank-``rank`` branch in format ``branch`` ('w4a8', 'w4a4', 'w8a8',
    'w6a6', 'fp16' or 'w4a16': INT4 factors, unquantized branch activations); ``act_group``:
    activation scales per token per that many channels (-ag); ``rotation``: online Hadamard block
    (-had)."""
    rng = np.random.default_rng(seed)
    rec = LayerSpec(weight=random_weight(rng, k, n, 4, block, symmetric, scale=1.0 / np.sqrt(k) / 4),
                    act=_act(main_act, act_group, k), rotation=rotation)
    if bias:
        rec.bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    if rank:
        if branch == "fp16":
            rec.down = (rng.standard_normal((k, rank)) / np.sqrt(k)).astype(np.float16)
            rec.up = (0.1 * rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(np.float16)
            return rec
        wbits, abits = {"w4a8": (4, 8), "w4a4": (4, 4), "w8a8": (8, 8), "w6a6": (6, 6), "w4a16": (4, None)}[branch]
        down_block = block if (block is not None and k % block == 0) else None  # as calibless.record.down_format
        rec.down = random_weight(rng, k, rank, wbits, down_block, True, scale=1.0 / np.sqrt(k) / 4)
        rec.up = random_weight(rng, rank, n, wbits, None, True, scale=0.1 / np.sqrt(rank) / 4)
        rec.branch_in = _act(abits, act_group, k)
        rec.branch_mid = _act(abits, act_group, rank)
    return rec


def placeholder_model(widths: Sequence[int], batch=("batch", "tokens")) -> onnx.ModelProto:
    """x -> placeholder(l0) -> placeholder(l1) -> ... -> y; ``widths`` = [in, out0, out1, ...]."""
    nodes, prev = [], "x"
    for i in range(len(widths) - 1):
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node(PLACEHOLDER_OP, [prev], [out], name=f"ph{i}", domain=PLACEHOLDER_DOMAIN, layer=f"l{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, widths[-1]])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])


def chain_model(records: Sequence[LayerSpec]) -> onnx.ModelProto:
    """The QDQ graph of ``records`` applied in sequence (widths must chain)."""
    widths = [records[0].weight.k] + [r.weight.n for r in records]
    return write_qdq(placeholder_model(widths), {f"l{i}": r for i, r in enumerate(records)})


def single_model(k: int = 128, n: int = 64, rank: int = 16, **kw) -> onnx.ModelProto:
    return chain_model([layer_spec(k, n, rank, **kw)])


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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def inputs(k: int, tokens: int = 8, batch: int = 2, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((batch, tokens, k)).astype(np.float32)}
