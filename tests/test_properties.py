"""Property-based tests (hypothesis) of the calibless primitives: INT4 packing, quantize /
dequantize bounds for every weight format, every branch format's code range, dynamic activation
quantization; odd shapes (1 x n, n x 1, primes) and extreme values (1e38, 1e-30, denormals,
all-equal, all-zero). Fixed-case tests of the same primitives are in test_packing_quant.py."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

from calibless.formats import BRANCH_FORMATS, GROUP_SIZES, WEIGHT_BITS, ActFormat, WeightFormat, branch_format
from calibless.packing import pack_int4, unpack_int4
from calibless.quant import choose_qparams, fake_quant_act, fake_quant_weight
from calibless.record import Branch, QTensor

FAST = settings(max_examples=60, deadline=None)
PRIMES = [1, 2, 3, 5, 7, 11, 13, 31, 61, 97, 127, 131]
FMAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)  # 1.4e-45


# ------------------------------------------------------------------ packing
@FAST
@given(st.booleans(), st.integers(1, 301), st.data())
def test_pack_unpack_round_trip_and_onnx_layout(signed, n, data):
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int16)
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
    if n % 2:
        assert packed[-1] >> 4 == 0  # an odd count leaves the last high nibble 0
    out = unpack_int4(packed, n, signed)
    assert out.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(out, codes)
    onnx_type = ml_dtypes.int4 if signed else ml_dtypes.uint4
    assert packed.tobytes() == numpy_helper.from_array(codes.astype(onnx_type), "t").raw_data


@FAST
@given(st.integers(1, 200), st.integers(-3, 3).filter(lambda d: d != 0))
def test_unpack_refuses_a_wrong_count(n, delta):
    packed = pack_int4(np.zeros(n, np.int8))
    count = n + delta
    assume(count >= 0 and (count + 1) // 2 != packed.size)
    with pytest.raises(ValueError):
        unpack_int4(packed, count)


@FAST
@given(st.one_of(st.integers(-1000, -9), st.integers(16, 1000)))
def test_pack_refuses_values_outside_4_bits(v):
    with pytest.raises(ValueError):
        pack_int4(np.array([0, v]))


# ------------------------------------------------------------------ weights
formats = st.builds(WeightFormat, st.sampled_from(WEIGHT_BITS), st.booleans(), st.sampled_from(GROUP_SIZES))


@st.composite
def shapes(draw, fmt):
    """(K, N): K a multiple of the group (or a prime / 1 per channel); N 1, prime or small."""
    if fmt.group_size is None:
        k = draw(st.sampled_from(PRIMES + [64, 100]))
    else:
        k = fmt.group_size * draw(st.integers(1, 3))
    n = draw(st.sampled_from(PRIMES[:8] + [16]))
    if draw(st.booleans()):  # the thin extremes: 1 x n and n x 1
        k, n = (k, 1) if draw(st.booleans()) else ((1, n) if fmt.group_size is None else (k, n))
    return k, n


MAGNITUDES = [1e-30, 1e-3, 1.0, 1e3, 1e30, 1e38]


@st.composite
def matrices(draw, k, n):
    kind = draw(st.sampled_from(["normal", "zero", "equal", "denormal", "zero_rows_cols", "spiky"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mag = draw(st.sampled_from(MAGNITUDES))
    if kind == "zero":
        return torch.zeros(k, n)
    if kind == "equal":
        return torch.full((k, n), draw(st.sampled_from([-1.0, 1.0])) * mag)
    if kind == "denormal":
        return (torch.randint(-200, 200, (k, n), generator=g) * TINY).float()
    w = torch.randn(k, n, generator=g).clamp(-4, 4) / 4 * mag
    if kind == "zero_rows_cols":
        w[torch.rand(k, generator=g) < 0.5] = 0
        w[:, torch.rand(n, generator=g) < 0.5] = 0
    if kind == "spiky":  # one outlier per matrix, a million times the rest
        w = w / 1e6
        w[draw(st.integers(0, k - 1)), draw(st.integers(0, n - 1))] = mag
    return w


def _check_qtensor(w: torch.Tensor, fmt: WeightFormat):
    q = QTensor.from_float(w, fmt)
    k, n = w.shape
    g = fmt.block_size(k)
    assert q.codes.shape == (k, n) and q.scale.shape == (k // g, n)
    assert q.codes.dtype == (torch.int8 if fmt.symmetric else torch.uint8)
    assert int(q.codes.min()) >= fmt.qmin and int(q.codes.max()) <= fmt.qmax
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    if q.zero_point is not None:
        assert int(q.zero_point.min()) >= 0 and int(q.zero_point.max()) <= fmt.qmax
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # inside the range every value is within half a step (float rounding: relative 1e-5, plus a
    # few subnormal units for denormal scales)
    step = q.scale.double().repeat_interleave(g, dim=0)
    err = (deq.double() - w.double()).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 64 * TINY).all(), float((err - step / 2).max())
    return q


@FAST
@given(st.data())
def test_quantize_dequantize_within_half_a_step(data):
    fmt = data.draw(formats)
    k, n = data.draw(shapes(fmt))
    _check_qtensor(data.draw(matrices(k, n)), fmt)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_extremes_of_float32(bits, symmetric):
    fmt = WeightFormat(bits, symmetric, None)
    cases = [[FMAX, 0.0], [-FMAX, 0.0], [FMAX, FMAX], [TINY, -TINY], [1e-40, 3e-41], [2e38, -1e38], [1e38, -1e38]]
    if symmetric:  # an asymmetric grid over [-max, max] reaches half a step past it: inf is unavoidable
        cases += [[FMAX, -FMAX], [3e38, -3e38]]
    for vals in cases:
        _check_qtensor(torch.tensor(vals).reshape(-1, 1), fmt)
        _check_qtensor(torch.tensor(vals).reshape(1, -1).repeat(64, 1), WeightFormat(bits, symmetric, 64))


@FAST
@given(formats.filter(lambda f: f.group_size is not None), st.sampled_from(PRIMES[1:]))
def test_a_group_that_does_not_divide_k_raises(fmt, k):
    assume(k % fmt.group_size)
    with pytest.raises(ValueError, match="not divisible"):
        QTensor.from_float(torch.randn(k, 3), fmt)


@FAST
@given(st.data())
def test_fake_quant_weight_equals_qtensor_and_is_finite(data):
    fmt = data.draw(formats)
    k, n = data.draw(shapes(fmt))
    w = data.draw(matrices(k, n))
    fq = fake_quant_weight(w, fmt)
    assert torch.isfinite(fq).all()
    assert torch.allclose(fq, QTensor.from_float(w, fmt).dequantize(), rtol=1e-6, atol=0)
    s, _ = choose_qparams(w, fmt)
    assert torch.isfinite(s).all() and (s > 0).all()


# ------------------------------------------------------------------ branch formats
QUANTIZED_BRANCHES = [name for name, (wbits, _) in BRANCH_FORMATS.items() if wbits is not None]


@FAST
@given(st.sampled_from(QUANTIZED_BRANCHES), st.sampled_from([None, 32, 64]), st.data())
def test_branch_codes_stay_in_their_format_range(name, group, data):
    fmt = branch_format(name, group)
    k = data.draw(st.sampled_from(PRIMES[1:] + [64, 128]))
    r = data.draw(st.sampled_from([1, 2, 7, 16]))
    n = data.draw(st.sampled_from(PRIMES[1:8]))
    a, b = data.draw(matrices(k, r)), data.draw(matrices(r, n))
    br = Branch.from_float(a, b, fmt)
    wbits = BRANCH_FORMATS[name][0]
    lo, hi = -(2 ** (wbits - 1)), 2 ** (wbits - 1) - 1
    for f in (br.down, br.up):
        assert int(f.codes.min()) >= lo and int(f.codes.max()) <= hi
        assert torch.isfinite(f.scale).all() and (f.scale > 0).all()
    if name == "w6a6":
        assert lo == -32 and hi == 31  # 6-bit codes ride in int8 within [-32, 31]
    # A blocks like the main weight when the group divides K, else per channel; B per channel
    expect_g = group if group is not None and k % group == 0 else None
    assert br.down.fmt.group_size == expect_g and br.up.fmt.group_size is None
    assert br.rank == r
    if float(a.abs().max()) * float(b.abs().max()) * r < 1e37:  # else the product itself overflows float32
        assert torch.isfinite(br.down_weight() @ br.up_weight()).all()


@FAST
@given(st.data())
def test_fp16_branch_is_exact_float16(data):
    k, r, n = data.draw(st.sampled_from(PRIMES[1:])), data.draw(st.integers(1, 8)), data.draw(st.sampled_from(PRIMES[1:]))
    a = data.draw(matrices(k, r)).clamp(-60000, 60000)
    b = data.draw(matrices(r, n)).clamp(-60000, 60000)
    br = Branch.from_float(a, b, branch_format("fp16"))
    assert br.down.dtype == torch.float16 and br.up.dtype == torch.float16
    assert torch.isfinite(br.down_weight()).all() and torch.isfinite(br.up_weight()).all()
    assert torch.equal(br.down_weight(), a.half().float())


# ------------------------------------------------------------------ activations
act_formats = st.builds(ActFormat, st.sampled_from([4, 6, 8]), st.just("dynamic_per_token"))


@FAST
@given(act_formats, st.sampled_from([(1, 1), (1, 7), (3, 1), (2, 5, 13), (4, 64)]), st.data())
def test_fake_quant_act_levels_and_bounds(fmt, shape, data):
    tokens = shape[:-1]
    width = shape[-1]
    x = data.draw(matrices(math.prod(tokens), width)).reshape(shape)
    # the dynamic scale amax / qmax at float32's very top would dequantize qmax * scale past it;
    # activations stay below 1e38 (ONNX Runtime computes the same ops, so it would agree anyway)
    assume(float(x.abs().max()) <= 1e38)
    y = fake_quant_act(x, fmt)
    assert y.shape == x.shape and torch.isfinite(y).all()
    s = (x.abs().amax(-1, keepdim=True) / fmt.qmax).clamp(min=1e-8)
    codes = (y / s).double()
    assert (codes - codes.round()).abs().max() <= 1e-3
    assert codes.abs().max() <= fmt.qmax + 1e-3
    assert ((y - x).double().abs() <= s.double() / 2 * (1 + 1e-5) + 64 * TINY).all()
    if float(x.abs().max()) < 1e-8 * fmt.qmax / 2:  # below the scale floor: everything rounds to 0
        assert (y == 0).all()


def test_fake_quant_act_all_zero_and_disabled():
    z = torch.zeros(2, 3, 8)
    for bits in (4, 6, 8):
        assert torch.equal(fake_quant_act(z, ActFormat(bits, "dynamic_per_token")), z)
    x = torch.randn(2, 3)
    assert fake_quant_act(x, ActFormat()) is x
