"""LoRaQ's tiled passes (clipping search, refinement step) against the whole-layer formulas they
replace: tiling changes only the order of float sums (so the least-squares scales may differ in
their last bits between tile sizes), never what is computed."""
import pytest
import torch

from calibless.formats import WeightFormat
from calibless.methods import loraq
from calibless.quant import choose_qparams

FORMATS = [WeightFormat(4, False, 32), WeightFormat(4, True, 64), WeightFormat(4, True, 32, signed_scales=True)]
SHAPES = [(128, 96), (128, 4096), (192, 200)]  # several blocks per tile; column spans; ragged edges


def _weight(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.02
    w[3] *= 30  # an outlier row: clipping matters
    return w


def _block_errors(w, fmt, scale, zero_point):
    """Each block's squared error on the grid ``scale``, computed on the whole layer."""
    k, n = w.shape
    nb = scale.shape[0]
    blocks = w.reshape(nb, k // nb, n)
    lo, hi = loraq.code_range(fmt, zero_point)
    q = torch.round(blocks / scale[:, None, :]).clamp(lo, hi)
    return ((q * scale[:, None, :] - blocks) ** 2).sum(1)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"g{f.group_size}{'' if f.symmetric else 'asym'}")
@pytest.mark.parametrize("shape", SHAPES)
def test_clipping_search_picks_each_blocks_best_candidate(fmt, shape):
    w = _weight(*shape)
    q, ratio = loraq.quantize_mse(w, fmt)
    base, zp = choose_qparams(w, fmt)
    zpf = None if zp is None else zp.float()
    chosen = _block_errors(w, fmt, q.scale, zpf)
    candidates = torch.stack([_block_errors(w, fmt, base * c, zpf) for c in loraq.CLIP_RATIOS])
    assert bool((chosen <= candidates.min(0).values * (1 + 1e-5) + 1e-12).all())
    # a searched grid beats the min/max one somewhere (the outlier row forces clipping)
    assert float(chosen.sum()) < float(candidates[0].sum()) * 0.999
    assert torch.equal(ratio, q.scale / base)


@pytest.mark.parametrize("fmt", FORMATS[:2], ids=["asym", "sym"])
def test_clipping_search_does_not_depend_on_the_tile_size(fmt, monkeypatch):
    w = _weight(192, 200, seed=1)
    ref, ref_ratio = loraq.quantize_mse(w, fmt)
    neighbours = [ref_ratio * f for f in loraq.NEIGHBOURS]
    ref2, _ = loraq.quantize_mse(w, fmt, neighbours)
    for tile in (1000, 3 * 32 * 7, 1 << 20):  # column spans with a ragged edge; a few blocks; the whole layer
        monkeypatch.setattr(loraq, "TILE_ELEMENTS", tile)
        got, ratio = loraq.quantize_mse(w, fmt)
        assert torch.equal(got.codes, ref.codes)
        torch.testing.assert_close(got.scale, ref.scale, rtol=1e-4, atol=0)
        torch.testing.assert_close(ratio, ref_ratio, rtol=1e-4, atol=0)
        torch.testing.assert_close(loraq.quantize_mse(w, fmt, neighbours)[0].scale, ref2.scale, rtol=1e-4, atol=0)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"g{f.group_size}{'' if f.symmetric else 'asym'}")
@pytest.mark.parametrize("tile", [1000, 1 << 17])
def test_refinement_step_equals_the_whole_layer_formulas(fmt, tile, monkeypatch):
    monkeypatch.setattr(loraq, "TILE_ELEMENTS", tile)
    k, n, r = 192, 200, 8
    w = _weight(k, n, seed=2)
    g = fmt.block_size(k)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(k, r, generator=gen) * 0.05, torch.randn(r, n, generator=gen) * 0.05
    base, zp = choose_qparams(w - a @ b, fmt)
    z = None if zp is None else zp.float()
    lo, hi = loraq.code_range(fmt, z)
    grad_a, grad_b, grad_s, err = loraq._TiledError(w, g, lo, hi)(a, b, base, evaluate=True, gradients=True)

    blocks = (w - a @ b).reshape(k // g, g, n)
    codes = torch.round(blocks / base[:, None, :]).clamp(lo, hi)
    e = blocks - codes * base[:, None, :]
    e2 = e.reshape(k, n)
    torch.testing.assert_close(grad_a, -2 * e2 @ b.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, -2 * a.T @ e2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s, -2 * (e * codes).sum(1), rtol=1e-5, atol=1e-5)
    assert err == pytest.approx(float(e.norm()), rel=1e-5)
    assert err > 0

    none = loraq._TiledError(w, g, lo, hi)(a, b, base, evaluate=True, gradients=False)
    assert none[:3] == (None, None, None) and none[3] == pytest.approx(err, rel=1e-6)
