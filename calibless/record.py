"""The ONE in-memory record of a quantized Linear. The torch module, the checkpoint and the
ONNX writer all read it; none re-derives quantization."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from calibless.formats import BranchFormat, LayerFormat, WeightFormat
from calibless.quant import choose_qparams, dequantize, fake_quant_act, quantize
from calibless.rotation import Rotation


@dataclass
class QTensor:
    """A quantized (K, N) matrix: integer codes, scales and zero points per block along K."""

    codes: torch.Tensor  # int8 (symmetric) or uint8 (asymmetric), shape (K, N)
    scale: torch.Tensor  # float32, shape (K / block, N)
    zero_point: Optional[torch.Tensor]  # uint8 like scale, asymmetric formats only
    fmt: WeightFormat

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: WeightFormat, scale: Optional[torch.Tensor] = None,
                   zero_point: Optional[torch.Tensor] = None) -> "QTensor":
        """Round-to-nearest with the format's min/max qparams, or with the given ``scale`` (and, for
        asymmetric formats, ``zero_point``)."""
        w = w.detach().float()
        s, zp = choose_qparams(w, fmt)
        if scale is not None:
            s = scale.detach().float()
        if zero_point is not None:
            zp = zero_point.detach().float()
        codes = quantize(w, s, zp, fmt)
        storage = torch.int8 if fmt.symmetric else torch.uint8
        return cls(codes.to(storage).contiguous(), s.contiguous(), None if zp is None else zp.to(torch.uint8).contiguous(), fmt)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)

    def stored_bits(self) -> int:
        bits = self.codes.numel() * self.fmt.storage_bits + self.scale.numel() * self.scale.element_size() * 8
        if self.zero_point is not None:
            bits += self.zero_point.numel() * self.fmt.storage_bits
        return bits


BranchFactor = Union[QTensor, torch.Tensor]  # a float16 tensor for the 16-bit branch


@dataclass
class Branch:
    """Low-rank branch y += (x A) B with A (in, r) and B (r, out), each quantized per ``fmt``."""

    down: BranchFactor
    up: BranchFactor
    fmt: BranchFormat

    @classmethod
    def from_float(cls, a: torch.Tensor, b: torch.Tensor, fmt: BranchFormat) -> "Branch":
        if fmt.weight is None:
            return cls(a.detach().half(), b.detach().half(), fmt)
        return cls(QTensor.from_float(a, down_format(fmt, a.shape[0])),
                   QTensor.from_float(b, up_format(fmt)), fmt)

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @staticmethod
    def _float(f: BranchFactor) -> torch.Tensor:
        return f.dequantize() if isinstance(f, QTensor) else f.float()

    def down_weight(self) -> torch.Tensor:
        return self._float(self.down)

    def up_weight(self) -> torch.Tensor:
        return self._float(self.up)

    def stored_bits(self) -> int:
        return sum(f.stored_bits() if isinstance(f, QTensor) else f.numel() * 16 for f in (self.down, self.up))


def low_rank_term(x: torch.Tensor, b: Branch) -> torch.Tensor:
    """Qm(Qi(x) @ A) @ B: a branch (or adapter) term as the QDQ graph computes it."""
    xb = fake_quant_act(x, b.fmt.act)
    h = fake_quant_act(xb @ b.down_weight(), b.fmt.act)
    return h @ b.up_weight()


def down_format(fmt: BranchFormat, k: int) -> WeightFormat:
    """A is blocked like the main weight when the block divides in_features, else per channel."""
    w = fmt.weight
    g = w.group_size if (w.group_size is not None and k % w.group_size == 0) else None
    return WeightFormat(w.bits, w.symmetric, g)


def up_format(fmt: BranchFormat) -> WeightFormat:
    """B is quantized per output channel: its reduction dim is the rank, too short to block."""
    return WeightFormat(fmt.weight.bits, fmt.weight.symmetric, None)


@dataclass
class LayerRecord:
    """Everything needed to compute, store and export one quantized Linear layer.

    Math: x' = x P H (when rotated online; a folded rotation arrives already applied);
    y = Qa(x') @ deq(W) + Qb2(Qb1(x') @ A) @ B + bias + bias_shift, with W, A, B fitted on the
    rotated weight; ``bias_shift`` (methods with input statistics) cancels the output error's
    mean: the exported graph adds it to the layer's bias. ``adapter`` (LoRA adapters, see
    calibless/adapters.py) is one more low-rank term computed like the branch and added last,
    after the bias, so that an all-zero adapter leaves every other sum bit-identical.
    """

    weight: QTensor  # (in, out), in the rotated basis when ``rotation`` is set
    fmt: LayerFormat
    branch: Optional[Branch] = None
    rotation: Optional[Rotation] = None
    method: str = ""
    stats: dict = field(default_factory=dict)
    bias_shift: Optional[torch.Tensor] = None  # float32 (out,)
    adapter: Optional[Branch] = None  # LoRA adapters, concatenated along the rank, in the record's basis

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def effective_weight(self) -> torch.Tensor:
        """The (in, out) matrix the layer applies to its unrotated input when activations are not
        quantized (comparable with the FP weight)."""
        w = self.weight.dequantize()
        for b in (self.branch, self.adapter):
            if b is not None:
                w = w + b.down_weight() @ b.up_weight()
        if self.rotation is None or self.rotation.folded:
            return w
        return self.rotation.unrotate_weight(w)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact reference computation, op for op what the QDQ ONNX graph computes."""
        if self.rotation is not None and self.rotation.folded is None:
            x = self.rotation.rotate_input(x)
        xm = fake_quant_act(x, self.fmt.act)
        y = xm @ self.weight.dequantize()
        if self.branch is not None:
            y = y + low_rank_term(x, self.branch)
        bias = self.shifted_bias(bias)
        if bias is not None:
            y = y + bias
        if self.adapter is not None:
            y = y + low_rank_term(x, self.adapter)
        return y

    def shifted_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The bias the layer adds: the model's, plus ``bias_shift`` when the method set one."""
        if self.bias_shift is None:
            return bias
        return self.bias_shift if bias is None else bias.float() + self.bias_shift

    def stored_bits(self) -> int:
        bits = self.weight.stored_bits()
        if self.branch is not None:
            bits += self.branch.stored_bits()
        if self.rotation is not None:
            bits += self.rotation.stored_bits()
        return bits

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.in_features * self.out_features)


def relative_error(w: torch.Tensor, q: LayerRecord) -> float:
    """||W - W_eff||_F / ||W||_F with W in (in, out) layout."""
    w = w.double()  # float32 norms over- or underflow for weights near 1e+-20
    return float(torch.linalg.norm(w - q.effective_weight().double()) / torch.linalg.norm(w).clamp_min(1e-300))
