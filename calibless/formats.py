"""Quantization formats as data: frozen dataclasses that round-trip through JSON
(``calibless.config.to_dict`` / ``from_dict``).

Conventions used everywhere in the package:
- A matrix is stored in "math" layout (K, N): K is the reduction (input) dimension, N the
  output dimension, so y = x @ M. This is the layout of ONNX MatMul's B input and of
  DequantizeLinear(axis=0, block_size), so the ONNX writer needs no transposes.
- Weights are quantized in blocks of ``group_size`` along K (``None`` = one block spanning K,
  i.e. per-output-channel).
- 6-bit values are stored as int8 limited to [-32, 31]: neither ONNX nor TensorRT has a 6-bit type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

WEIGHT_BITS = (4, 6, 8)
ACT_BITS = (4, 6, 8)
GROUP_SIZES = (None, 32, 64, 128)
ACT_MODES = ("none", "dynamic_per_token")
# Activation groups and Hadamard blocks: powers of two in this range (a Hadamard block of B costs a
# B x B constant and B multiply-adds per input value; past 1024 it is a dense rotation, not a block one).
MIN_BLOCK, MAX_BLOCK = 2, 1024


def is_block_size(n) -> bool:
    """A power of two in [MIN_BLOCK, MAX_BLOCK]: what -ag<N> and -had<B> take."""
    return isinstance(n, int) and not isinstance(n, bool) and MIN_BLOCK <= n <= MAX_BLOCK and not n & (n - 1)


@dataclass(frozen=True)
class WeightFormat:
    bits: int = 4
    symmetric: bool = True
    group_size: Optional[int] = 64
    signed_scales: bool = False  # symmetric grids: scales may be negative (ONNX Runtime, not TensorRT)

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.signed_scales and not self.symmetric:
            raise ValueError("signed scales apply to symmetric grids only")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_bits(self) -> int:
        """Bits each code occupies in ONNX / TensorRT (6-bit rides in int8)."""
        return 4 if self.bits == 4 else 8

    def block_size(self, k: int) -> int:
        return k if self.group_size is None else self.group_size


@dataclass(frozen=True)
class ActFormat:
    """Activation quantization: symmetric, dynamic per token (scales computed in the graph), or none.
    ``group_size``: one scale per token per that many channels (None: one per token over the row).
    (Static per-tensor scales exist only in TensorRT graphs, set by its legalizer's calibration.)"""

    bits: Optional[int] = None
    mode: str = "none"
    group_size: Optional[int] = None

    def __post_init__(self):
        if self.mode not in ACT_MODES:
            raise ValueError(f"activation mode must be one of {ACT_MODES}, got {self.mode!r}")
        if self.mode == "none" and (self.bits is not None or self.group_size is not None):
            raise ValueError("activation mode 'none' takes no bits and no group")
        if self.mode != "none" and self.bits not in ACT_BITS:
            raise ValueError(f"activation bits must be one of {ACT_BITS}, got {self.bits}")
        if self.group_size is not None and not is_block_size(self.group_size):
            raise ValueError(f"activation group must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, "
                             f"got {self.group_size}")

    def group_for(self, width: int) -> int:
        """The channels each scale covers for an activation ``width`` wide: the group where it
        splits the width, else the whole width (e.g. a rank-32 branch middle under -ag64)."""
        g = self.group_size
        return g if g is not None and g < width and width % g == 0 else width

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))


NO_ACT = ActFormat()


@dataclass(frozen=True)
class LayerFormat:
    """The W4 main path of a quantized Linear: weight format plus input-activation format."""

    weight: WeightFormat
    act: ActFormat = NO_ACT


@dataclass(frozen=True)
class BranchFormat:
    """Format of the low-rank branch x -> (x A) B.

    ``weight`` None means the factors are stored in 16-bit float (W16A16). Otherwise A is
    quantized in blocks of ``group_size`` along its K (= in_features) and B per output
    channel (its K is the rank, too short to block).
    """

    name: str
    weight: Optional[WeightFormat]
    act: ActFormat = NO_ACT


def _dyn(bits: Optional[int], group: Optional[int] = None) -> ActFormat:
    return NO_ACT if bits is None else ActFormat(bits, "dynamic_per_token", group)


# name -> (weight bits or None for 16-bit, activation bits or None for unquantized activations).
# w4a16 (INT4 factors, float activations) is the branch that fuses into a W4A16 main GEMM: it is
# the cheapest branch in ONNX Runtime and deployable as INT4 weight-only in TensorRT.
BRANCH_FORMATS = {"fp16": (None, None), "w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4),
                  "w4a16": (4, None)}
# Main formats, same convention. w8a16 (INT8 weights, float activations) is what a budget may give
# the few layers whose error reaches the output most (loraq_export/fit/allocation.py): ONNX Runtime
# runs it as an 8-bit MatMulNBits, TensorRT as an INT8 weight-only GEMM (per channel).
MAIN_FORMATS = {"w4a16": (4, None), "w4a8": (4, 8), "w4a4": (4, 4), "w8a16": (8, None)}


def branch_format(name: str, group_size: Optional[int] = 64, act_group: Optional[int] = None) -> BranchFormat:
    if name not in BRANCH_FORMATS:
        raise ValueError(f"unknown branch format {name!r}; choose one of {sorted(BRANCH_FORMATS)}")
    wbits, abits = BRANCH_FORMATS[name]
    weight = None if wbits is None else WeightFormat(wbits, True, group_size)
    return BranchFormat(name, weight, _dyn(abits, act_group))


def main_format(name: str, group_size: Optional[int] = 64, symmetric: bool = True,
                act_group: Optional[int] = None) -> LayerFormat:
    if name not in MAIN_FORMATS:
        raise ValueError(f"unknown main format {name!r}; choose one of {sorted(MAIN_FORMATS)}")
    wbits, abits = MAIN_FORMATS[name]
    return LayerFormat(WeightFormat(wbits, symmetric, group_size), _dyn(abits, act_group))


@dataclass(frozen=True)
class FitSpec:
    """What a method must produce for one layer: main format, branch rank and format, and the
    method's options (an instance of the options class it registered; None: its defaults)."""

    main: LayerFormat
    rank: int = 0
    branch: Optional[BranchFormat] = None
    options: object = None
    rotation: Optional[int] = None  # block of the online Walsh-Hadamard rotation of the input (-had<B>)

    def __post_init__(self):
        if self.rotation is not None and not is_block_size(self.rotation):
            raise ValueError(f"Hadamard block must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}, got {self.rotation}")
