"""What a layer costs in stored bits, from its shape and formats alone (no fitting): the same count
as ``LayerRecord.stored_bits`` (tests check both agree), used to plan allocations under a budget.

Every stored bit counts: codes at their storage width (4, or 8 for 6- and 8-bit values), one
float32 scale per block, zero points at the codes' width for asymmetric grids, branch factors
(quantized the same way, or float16), and a channel permutation as int32 indices.
"""
from __future__ import annotations

from calibless.formats import BranchFormat, FitSpec, WeightFormat
from calibless.record import down_format, up_format

SCALE_BITS = 32
FP16_BITS = 16
PERM_BITS = 32


def matrix_bits(k: int, n: int, fmt: WeightFormat) -> int:
    """A (K, N) matrix quantized in ``fmt`` (blocks along K)."""
    blocks = -(-k // fmt.block_size(k))
    bits = k * n * fmt.storage_bits + blocks * n * SCALE_BITS
    if not fmt.symmetric:
        bits += blocks * n * fmt.storage_bits
    return bits


def branch_bits(k: int, n: int, rank: int, fmt: BranchFormat) -> int:
    if rank == 0:
        return 0
    if fmt.weight is None:
        return (k * rank + rank * n) * FP16_BITS
    return matrix_bits(k, rank, down_format(fmt, k)) + matrix_bits(rank, n, up_format(fmt))


def layer_bits(k: int, n: int, spec: FitSpec, with_branch: bool = True, permuted: bool = False) -> int:
    """Stored bits of a (K, N) layer fitted to ``spec``; ``with_branch`` False for methods that fit
    no branch; ``permuted`` for methods that store an input permutation (lopro)."""
    bits = matrix_bits(k, n, spec.main.weight)
    if with_branch and spec.branch is not None:
        bits += branch_bits(k, n, spec.rank, spec.branch)
    return bits + (k * PERM_BITS if permuted else 0)
