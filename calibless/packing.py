"""Exact INT4 packing as ONNX and TensorRT lay it out: two values per byte, the first element
of each pair (row-major order) in the low nibble. An odd count leaves the last high nibble 0."""
from __future__ import annotations

import numpy as np


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack int4 ([-8, 7]) or uint4 ([0, 15]) values to a flat uint8 array of ceil(n / 2) bytes."""
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 15):
        raise ValueError("values out of the 4-bit range")
    nib = (flat & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of ``pack_int4``: ``count`` values as int8 (signed) or uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != (count + 1) // 2:
        raise ValueError(f"{packed.size} packed bytes cannot hold exactly {count} int4 values")
    nib = np.empty(packed.size * 2, np.uint8)
    nib[0::2] = packed & 0x0F
    nib[1::2] = packed >> 4
    nib = nib[:count]
    if not signed:
        return nib
    return np.where(nib >= 8, nib.astype(np.int16) - 16, nib).astype(np.int8)
