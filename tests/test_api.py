"""The Python entry point ``quantize_`` on a user's own nn.Module."""
import pytest
import torch
from torch import nn

from loraq_export import quantize_
from loraq_export.errors import UserError
from loraq_export.fit.swap import LoraqLinear


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()


def inputs(seed=1, rows=512):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 128, generator=g) * torch.linspace(0.1, 3, 128) + 0.5,)


def test_quantize_replaces_the_selected_layers_in_place():
    m = toy()
    x = inputs()[0]
    ref = m(x)
    out = quantize_(m, "w4a16-g64-r16-w8a8", method="svdquant", filter_fn=lambda lin, name: name == "0")
    assert out is m and isinstance(m[0], LoraqLinear) and isinstance(m[2], nn.Linear)
    assert m[0].record.branch.rank == 16
    err = float((m(x) - ref).norm() / ref.norm())
    assert 0 < err < 0.1


def test_example_inputs_give_gptq_its_statistics():
    ex = inputs()
    plain, with_stats = toy(), toy()
    ref = plain(*ex)
    quantize_(plain, "w4a16-g64-asym", method="gptq")
    quantize_(with_stats, "w4a16-g64-asym", method="gptq", example_inputs=ex)
    assert plain[0].record.bias_shift is None and with_stats[0].record.bias_shift is not None
    held_out = inputs(seed=7)[0]
    ref_h = toy()(held_out)
    err = lambda m, x, r: float((m(x) - r).norm() / r.norm())  # noqa: E731
    assert err(with_stats, *ex, ref) < err(plain, *ex, ref)
    assert err(with_stats, held_out, ref_h) < err(plain, held_out, ref_h)  # same distribution, other samples


def test_a_layer_the_example_inputs_never_reach_is_one_clear_error():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(UserError, match="never called"):
        quantize_(Unused(), "w4a16-g64", method="gptq", example_inputs=(torch.randn(8, 64),))
