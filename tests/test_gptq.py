"""gptq and the input statistics it reads: the rounding lowers the output error the statistics
predict, the bias shift cancels the error's mean, the codes lie on the block grid, and the
statistics gathered from a model are the ones a direct computation gives."""
import pytest
import torch

from calibless.formats import FitSpec, main_format
from calibless.input_stats import InputStats, output_error, rotate_stats
from calibless.methods import fit_layer
from calibless.rotation import Rotation


def correlated_inputs(k: int, rows: int = 3000, seed: int = 0) -> torch.Tensor:
    """Inputs with a strong mean and correlated channels of very different scales, like a
    transformer's normalised hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    scale = torch.logspace(-1, 0.7, k)
    return (torch.randn(rows, k, generator=g) @ mix) * scale + torch.linspace(-1, 2, k)


@pytest.mark.parametrize("asym", [True, False])
def test_gptq_lowers_the_output_error_and_cancels_its_mean(asym):
    g = torch.Generator().manual_seed(1)
    k, n = 256, 192
    w = torch.randn(k, n, generator=g) * 0.05
    x = correlated_inputs(k)
    stats = InputStats.empty(k)
    stats.add(x)
    spec = FitSpec(main_format("w4a16", 64, symmetric=not asym))
    grid = fit_layer(w, spec, "gptq")  # no statistics: the clipping-searched grid, no shift
    rec = fit_layer(w, spec, "gptq", input_stats=stats)
    cov = stats.covariance()
    e_grid = output_error(w - grid.effective_weight(), cov)
    e_gptq = output_error(w - rec.effective_weight(), cov)
    assert grid.bias_shift is None and rec.bias_shift is not None
    assert e_gptq < 0.7 * e_grid, (e_gptq, e_grid)
    # the output error on the inputs themselves: its mean over tokens is cancelled by the shift
    err = x @ w - rec.forward(x)
    assert err.mean(0).abs().max() < 1e-3 * err.abs().mean()
    assert float((err ** 2).mean()) < float(((x @ w - grid.forward(x)) ** 2).mean())
    # the codes are on the blocks' grid: quantizing the result again with its scales changes nothing
    again = rec.weight.dequantize()
    from calibless.record import QTensor
    assert torch.equal(QTensor.from_float(again, rec.weight.fmt, rec.weight.scale, rec.weight.zero_point).codes,
                       rec.weight.codes)


def test_rotated_statistics_are_those_of_the_rotated_inputs():
    k = 128
    x = correlated_inputs(k, rows=500)
    rot = Rotation(32, torch.randperm(k, generator=torch.Generator().manual_seed(0)))
    direct, rotated = InputStats.empty(k), InputStats.empty(k)
    direct.add(rot.rotate_input(x))
    rotated.add(x)
    rotated = rotate_stats(rotated, rot)
    assert torch.allclose(rotated.mean, direct.mean, atol=1e-5)
    assert torch.allclose(rotated.covariance(), direct.covariance(), atol=1e-4 * float(direct.covariance().abs().max()))


def test_statistics_that_do_not_fit_the_layer_are_refused():
    stats = InputStats.empty(64)
    stats.add(torch.randn(10, 64))
    with pytest.raises(ValueError, match="64 wide"):
        fit_layer(torch.randn(128, 32), FitSpec(main_format("w4a16", 64)), "gptq", input_stats=stats)


def test_gptq_options_are_checked():
    from calibless.methods import method_options
    with pytest.raises(ValueError, match="damp"):
        method_options("gptq", {"damp": 0.0})
    with pytest.raises(ValueError, match="dampp|unknown"):
        method_options("gptq", {"dampp": 0.1})


def test_model_statistics_match_a_direct_computation():
    """One pass over MiniLM's synthetic sequences: q, k and v share one accumulator, padding rows are
    left out, and the numbers are those of the layer's actual inputs."""
    from loraq_export.fit.input_stats import collect_input_stats
    from loraq_export.models import load_model
    loaded = load_model(None)
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
             "encoder.layer.0.attention.output.dense", "encoder.layer.1.intermediate.dense"]
    batches = loaded.synthetic_batches(3)[:2]
    stats = collect_input_stats(loaded.module, names, batches, lambda b: loaded.wrapper(*b))
    assert stats[names[0]] is stats[names[1]] and stats[names[0]] is not stats[names[2]]
    seen = []
    hook = loaded.module.get_submodule(names[3]).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        for inputs, _ in batches:
            loaded.wrapper(*inputs)
    finally:
        hook.remove()
    rows = torch.cat([x.reshape(-1, x.shape[-1])[mask] for x, (_, mask) in zip(seen, batches)])
    s = stats[names[3]]
    assert s.count == rows.shape[0] == sum(int(m.sum()) for _, m in batches) < sum(m.numel() for _, m in batches)
    assert torch.allclose(s.mean, rows.mean(0), atol=1e-5)
    ref = torch.cov(rows.T.double(), correction=0).float()
    assert torch.allclose(s.covariance(), ref, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("recipe_rank", [0, 16])
def test_loraq_rounds_its_main_path_against_the_statistics(recipe_rank):
    """loraq with input statistics keeps its grid and branch, re-rounds the main codes by GPTQ and
    shifts the bias (rank 0: a layer an allocation gives no branch)."""
    from calibless.formats import branch_format
    from calibless.methods import method_options
    g = torch.Generator().manual_seed(2)
    k, n = 256, 128
    w = torch.randn(k, n, generator=g) * 0.05
    x = correlated_inputs(k, seed=3)
    stats = InputStats.empty(k)
    stats.add(x)
    branch = branch_format("w4a16", 64) if recipe_rank else None
    spec = FitSpec(main_format("w4a16", 64, symmetric=False), recipe_rank, branch,
                   method_options("loraq", {"steps": 10}))
    plain = fit_layer(w, spec, "loraq")
    with_stats = fit_layer(w, spec, "loraq", input_stats=stats)
    off = fit_layer(w, FitSpec(spec.main, spec.rank, spec.branch, method_options("loraq", {"steps": 10, "input_stats": False})),
                    "loraq", input_stats=stats)
    assert plain.bias_shift is None and off.bias_shift is None and with_stats.bias_shift is not None
    assert torch.equal(off.weight.codes, plain.weight.codes)  # the option turns it off
    assert torch.equal(with_stats.weight.scale, plain.weight.scale)  # same grid, other codes
    cov = stats.covariance()
    assert output_error(w - with_stats.effective_weight(), cov) < 0.8 * output_error(w - plain.effective_weight(), cov)


_INVERSE_DIGEST = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from calibless.methods.gptq import _inverse_factor_of_reversed
g = torch.Generator().manual_seed(0)
x = torch.randn(2048, 512, generator=g)
h = x.T @ x / 2048
print(hashlib.sha256(_inverse_factor_of_reversed(h.flip(0, 1), float(h.diagonal().mean()), 0.01).numpy().tobytes()).hexdigest())
"""


def test_inverse_factor_does_not_depend_on_the_blas_thread_count():
    """scipy's OpenBLAS rounds its threaded triangular inverse differently per thread count (a
    512-wide one differed between 1 and 2 threads); fitted codes must not depend on the machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = _INVERSE_DIGEST.format(root=str(Path(__file__).resolve().parents[1]))
    digests = set()
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def _gptq_algorithm_1(w, cov, grid, damp=0.01):
    """GPTQ as its paper's Algorithm 1 writes it (act order, static groups), in float64 and with
    none of gptq_round's shortcuts: H^-1 by inversion, its upper Cholesky factor, one row at a
    time with every later row updated at once."""
    k = w.shape[0]
    fmt, g = grid.fmt, grid.fmt.block_size(k)
    h = cov.double()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h, w = h[perm][:, perm], w.double()[perm].clone()
    h = h + torch.eye(k, dtype=torch.float64) * damp * float(torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    s = grid.scale.double()[perm // g]
    z = None if grid.zero_point is None else grid.zero_point.double()[perm // g]
    q = torch.empty_like(w)
    for i in range(k):
        c = torch.round(w[i] / s[i])
        c = c.clamp(fmt.qmin, fmt.qmax) if z is None else (c + z[i]).clamp(fmt.qmin, fmt.qmax) - z[i]
        q[i] = c * s[i]
        w[i:] -= torch.outer(u[i, i:], (w[i] - q[i]) / u[i, i])
    return q[torch.argsort(perm)].float()


@pytest.mark.parametrize("asym", [True, False])
def test_gptq_round_agrees_with_the_papers_algorithm(asym):
    """The lazy batches (any block, ragged ones too), the one-factorisation inverse factor and the
    in-place rounding change float sums only: the codes are Algorithm 1's."""
    from calibless.methods.gptq import GptqOptions, gptq_round
    from calibless.methods.loraq import quantize_mse
    g = torch.Generator().manual_seed(4)
    k, n = 320, 96
    w = torch.randn(k, n, generator=g) * 0.05
    stats = InputStats.empty(k)
    stats.add(correlated_inputs(k, seed=5), lower_only=True)
    stats.fill_upper()
    cov = stats.covariance()
    grid, _ = quantize_mse(w, main_format("w4a16", 64, symmetric=not asym).weight)
    ref = _gptq_algorithm_1(w, cov, grid)
    assert (ref != grid.dequantize()).float().mean() > 0.2  # GPTQ moved many codes off round to nearest
    for block in (1, 7, 128, 1000):
        got = gptq_round(w, cov, grid, GptqOptions(block=block))
        assert (got != ref).float().mean() < 1e-3, block


@pytest.mark.parametrize("k", [100, 256, 300, 1000])
def test_gram_from_its_lower_blocks_is_the_whole_product(k):
    """add(lower_only=True) then fill_upper: x^T x, exactly symmetric, at widths the blocks and the
    mirroring strips do not divide."""
    g = torch.Generator().manual_seed(k)
    x1, x2 = torch.randn(500, k, generator=g) + 1.0, torch.randn(200, k, generator=g)
    stats = InputStats.empty(k)
    stats.add(x1, lower_only=True)
    stats.add(x2, lower_only=True)
    stats.fill_upper()
    x = torch.cat([x1, x2]).double()
    ref = x.T @ x
    assert torch.equal(stats.gram, stats.gram.T)
    assert float((stats.gram.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    assert stats.count == 700 and torch.allclose(stats.total, x.sum(0))
