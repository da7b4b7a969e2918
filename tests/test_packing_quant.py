import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

from calibless.formats import ActFormat, WeightFormat
from calibless.packing import pack_int4, unpack_int4
from calibless.quant import choose_qparams, dequantize, fake_quant_act, fake_quant_weight, quantize
from calibless.record import QTensor


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 33), (128, 64)])
def test_pack_int4_matches_onnx_bit_exactly(signed, shape):
    rng = np.random.default_rng(0)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, size=shape)
    dtype = ml_dtypes.int4 if signed else ml_dtypes.uint4
    onnx_bytes = numpy_helper.from_array(codes.astype(dtype), "t").raw_data
    ours = pack_int4(codes)
    assert ours.tobytes() == onnx_bytes
    np.testing.assert_array_equal(unpack_int4(ours, codes.size, signed).reshape(shape), codes)


@settings(max_examples=60, deadline=None)
@given(arrays(np.int8, st.integers(1, 300), elements=st.integers(-8, 7)))
def test_pack_unpack_round_trip_property(codes):
    assert np.array_equal(unpack_int4(pack_int4(codes), codes.size, True), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([16]))
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(3, np.uint8), 8)


@pytest.mark.parametrize("fmt", [WeightFormat(4, True, 64), WeightFormat(4, False, 64), WeightFormat(6, True, None),
                                 WeightFormat(8, True, 128)])
def test_dequantize_error_within_half_step(fmt):
    w = torch.randn(256, 48)
    q = QTensor.from_float(w, fmt)
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    err = (q.dequantize() - w).abs()
    step = q.scale.repeat_interleave(fmt.block_size(256), dim=0)
    assert (err <= step / 2 + 1e-6).all()


def test_zero_rows_and_columns_give_finite_positive_scales():
    w = torch.randn(128, 16)
    w[:, 3] = 0
    w[:64] = 0
    for fmt in (WeightFormat(4, True, 64), WeightFormat(4, False, 64)):
        s, _ = choose_qparams(w, fmt)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.isfinite(QTensor.from_float(w, fmt).dequantize()).all()
    assert torch.equal(fake_quant_act(torch.zeros(2, 5, 8), ActFormat(4, "dynamic_per_token")), torch.zeros(2, 5, 8))


def test_fake_quant_weight_matches_quantize_and_has_gradient():
    w = torch.randn(128, 8, requires_grad=True)
    fmt = WeightFormat(4, True, 64)
    fq = fake_quant_weight(w, fmt)
    s, zp = choose_qparams(w.detach(), fmt)
    assert torch.allclose(fq.detach(), dequantize(quantize(w.detach(), s, zp, fmt), s, zp))
    fq.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fake_quant_act_levels(bits):
    x = torch.randn(3, 7, 64) * 5
    y = fake_quant_act(x, ActFormat(bits, "dynamic_per_token"))
    scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = y / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
    assert (y - x).abs().max() <= scale.max() / 2 + 1e-5


def test_symmetric_grids_use_all_sixteen_levels():
    """The extreme of larger magnitude lands on -8: with positive scales when it is negative (the
    TensorRT rule), whatever its sign with signed scales (ONNX Runtime, as its own quantizer does)."""
    w = torch.tensor([[-1.6, 0.7], [0.2, 1.4], [0.1, -0.3], [0.0, 0.2]])  # one block of 4 rows, 2 columns
    pos = QTensor.from_float(w, WeightFormat(4, True, None))
    assert torch.allclose(pos.scale, torch.tensor([[1.6 / 8, 1.4 / 7]]))
    assert pos.codes[0, 0] == -8 and pos.codes[1, 1] == 7
    signed = QTensor.from_float(w, WeightFormat(4, True, None, signed_scales=True))
    assert torch.allclose(signed.scale, torch.tensor([[1.6 / 8, -1.4 / 8]]))
    assert signed.codes[0, 0] == -8 and signed.codes[1, 1] == -8
    for q in (pos, signed):  # never coarser than absmax / 7
        err = (q.dequantize() - w).abs().max()
        assert err <= (w.abs().amax(0) / 7 / 2).max() + 1e-6
    with pytest.raises(ValueError, match="symmetric grids only"):
        WeightFormat(4, False, 64, signed_scales=True)
