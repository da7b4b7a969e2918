"""Peers that are not calibless methods: they work on the FP ONNX graph, not on torch weights.

``ort-rtn`` is ONNX Runtime's own 4-bit weight quantizer,
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` with its default
round-to-nearest algorithm: the tool a user who already has an ONNX model would pick. It
rewrites each MatMul with a constant weight as a ``com.microsoft::MatMulNBits`` node (4-bit codes
packed two per byte along K, one fp32 scale per block, and, asymmetric, one 4-bit zero point
per block; symmetric blocks use all 16 levels: the value of largest magnitude maps to -8,
with an implicit zero point of 8). Only the layers loraq would quantize are handed to it: every
other MatMul with a constant weight is listed in its ``nodes_to_exclude`` (its
``nodes_to_include`` adds nodes rather than restricting them).

Layers are found in the FP graph by their weight: the exporter constant-folds each Linear's
transposed weight into the MatMul's initializer, so equal values identify the layer whatever
the node names.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from calibless.formats import WeightFormat
from graphs.protos import copy_model
from loraq_export.errors import UserError
from loraq_export.models.stored_dtype import replacement_dtype

PEER_METHODS = ("ort-rtn",)
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes a power of two >= 16


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.sha256(a.tobytes()).hexdigest()


def matmul_layers(model: onnx.ModelProto, weights_kn: dict[str, np.ndarray]) -> dict[str, str]:
    """Node name of the MatMul computing each layer of ``weights_kn`` ((in, out) float weights)."""
    inits = {i.name: i for i in model.graph.initializer}
    by_weight: dict[tuple, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            by_weight.setdefault(_key(numpy_helper.to_array(inits[node.input[1]])), []).append(node.name)
    out = {}
    for name, w in weights_kn.items():
        nodes = by_weight.get(_key(w), [])
        if len(nodes) != 1:
            why = "no MatMul with this constant weight" if not nodes else f"{len(nodes)} MatMuls share its weight"
            raise UserError(f"ort-rtn: layer {name} cannot be located in the FP ONNX graph ({why}); "
                            "leave ort-rtn out of --methods for this model")
        out[name] = nodes[0]
    return out


@contextmanager
def _quiet_quantizer():
    """The quantizer logs a line per node at INFO; a bench wants its own progress bar only."""
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def ort_quantize(fp_model: onnx.ModelProto, layer_nodes: dict[str, str], fmt: WeightFormat) -> tuple[onnx.ModelProto, float]:
    """ONNX Runtime's quantizer on the ``layer_nodes`` only; returns (model, seconds it took)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    chosen = set(layer_nodes.values())
    exclude = [n.name for n in fp_model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    model = copy_model(fp_model)
    t = time.perf_counter()
    with _quiet_quantizer():
        q = MatMulNBitsQuantizer(model, bits=4, block_size=fmt.group_size, is_symmetric=fmt.symmetric,
                                 nodes_to_exclude=exclude)
        q.process()
    seconds = time.perf_counter() - t
    out = q.model.model
    quantized = {n.name for n in out.graph.node if n.op_type == "MatMulNBits"}
    expected = {f"{name}_Q4" for name in chosen}
    left = {n.name for n in out.graph.node if n.op_type == "MatMul"}
    if quantized != expected or not set(exclude) <= left:
        raise UserError(f"ort-rtn: ONNX Runtime's quantizer quantized {len(quantized)} MatMuls, expected exactly the "
                        f"{len(expected)} layers loraq selects; please report this with your onnxruntime version")
    return out, seconds


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> 4-bit values along the last axis, low nibble first (MatMulNBits' layout)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def matmulnbits_tensors(model: onnx.ModelProto, node_name: str) -> tuple[onnx.NodeProto, list[np.ndarray]]:
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return node, [numpy_helper.to_array(inits[i]) for i in node.input[1:] if i]


def dequantize_matmulnbits(node: onnx.NodeProto, tensors: list[np.ndarray]) -> np.ndarray:
    """The (K, N) float weight a MatMulNBits node computes with."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    blocks = -(-k // bs)
    codes = _unpack_nibbles(tensors[0].reshape(n, -1))[:, :blocks * bs].astype(np.float32).reshape(n, blocks, bs)
    scales = tensors[1].reshape(n, blocks).astype(np.float32)
    if len(tensors) > 2:  # asymmetric: packed 4-bit zero points, one per block, padded per column
        zero = _unpack_nibbles(tensors[2].reshape(n, -1))[:, :blocks].astype(np.float32)
    else:
        zero = np.full((n, blocks), 8.0, np.float32)  # MatMulNBits' default zero point for 4 bits
    w = (codes - zero[:, :, None]) * scales[:, :, None]
    return w.reshape(n, blocks * bs)[:, :k].T


def stored_bits(tensors: list[np.ndarray]) -> int:
    """Every stored bit of a MatMulNBits layer, counted as loraq counts its own (LayerRecord.stored_bits):
    the 4-bit codes and fp32 scales as stored, and 4 bits per zero point. (ONNX Runtime pads a
    column's zero points to whole bytes, half a byte per column when its block count is odd;
    ONNX's packed UINT4 zero points, which loraq writes, have no such padding. Not counting it
    keeps the same grid at the same bits.)"""
    codes, scales = tensors[0], tensors[1]
    bits = int(codes.nbytes) * 8 + int(scales.size) * scales.dtype.itemsize * 8
    if len(tensors) > 2:
        bits += int(scales.size) * 4  # one zero point per block, as there is one scale per block
    return bits


def ort_rtn_layers(model: onnx.ModelProto, layer_nodes: dict[str, str], weights_kn: dict[str, np.ndarray]) -> dict:
    """Per layer: stored bits, weight count, relative weight error, and the dequantized weight."""
    out = {}
    for name, node_name in layer_nodes.items():
        node, tensors = matmulnbits_tensors(model, f"{node_name}_Q4")
        w = weights_kn[name].astype(np.float64)
        deq = dequantize_matmulnbits(node, tensors)
        err = float(np.linalg.norm(w - deq) / max(np.linalg.norm(w), 1e-300))
        out[name] = {"bits": stored_bits(tensors), "weights": int(w.size), "rel_error": err, "weight_kn": deq}
    return out


@contextmanager
def replaced_weights(module: torch.nn.Module, weights_kn: dict[str, np.ndarray]):
    """``module`` with the named Linear weights replaced (from (in, out) arrays), restored on exit:
    the torch twin of a peer's ONNX model."""
    mods = dict(module.named_modules())
    saved = {name: mods[name].weight.data for name in weights_kn}
    try:
        for name, w in weights_kn.items():
            mods[name].weight.data = torch.from_numpy(np.ascontiguousarray(w.T)).to(replacement_dtype(mods[name]))
        yield module
    finally:
        for name, w in saved.items():
            mods[name].weight.data = w


def check_peer_format(method: str, fmt: WeightFormat, recipe: str) -> None:
    """Before any fitting: what ONNX Runtime's quantizer can express."""
    if method == "ort-rtn" and fmt.group_size not in ORT_BLOCK_SIZES:
        raise UserError(f"pair ort-rtn x {recipe}: ONNX Runtime's MatMulNBits takes block sizes "
                        f"{', '.join(map(str, ORT_BLOCK_SIZES))}, not per channel; use a g32/g64/g128 recipe")
