"""Activation groups (-ag<N>) and online rotation (-had<B>), data-free outlier handling: the torch
reference, the ONNX graph and the checkpoint agree, rotations are exact, bad values are refused."""
import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from calibless.formats import ActFormat
from calibless.quant import fake_quant_act
from calibless.rotation import Rotation, block_hadamard, hadamard, rotation_block
from graphs.qdq import hadamard_matrix
from graphs.targets import legalize
from loraq_export.cli import main
from test_export_ort import export_and_validate, fit_all, mlp_model


@pytest.mark.parametrize("b", [2, 16, 64, 256])
def test_hadamard_is_orthogonal_and_the_same_on_both_sides(b):
    h = hadamard(b, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert np.array_equal(hadamard_matrix(b), hadamard(b).numpy())


def test_a_rotated_fp_model_equals_the_fp_model():
    torch.manual_seed(0)
    w, x = torch.randn(256, 96, dtype=torch.float64), torch.randn(4, 7, 256, dtype=torch.float64)
    for perm in (None, torch.randperm(256)):
        rot = Rotation(64, perm)
        assert torch.allclose(rot.rotate_input(x) @ rot.rotate_weight(w), x @ w, atol=1e-10)
        assert torch.allclose(rot.unrotate_weight(rot.rotate_weight(w)), w, atol=1e-12)


def test_rotation_spreads_an_outlier_channel():
    x = torch.zeros(1, 128)
    x[0, 5] = 100.0
    x[0, 70] = 1.0
    y = block_hadamard(x, 64)
    assert y[0, :64].abs().max() == pytest.approx(100 / 8)  # spread evenly over its block of 64
    assert torch.allclose(y.norm(), x.norm())


def test_grouped_activation_scales_are_per_token_per_group():
    torch.manual_seed(1)
    x = torch.randn(3, 128)
    x[:, 7] = 50.0  # one outlier channel, in the first group of 32
    per_token = fake_quant_act(x, ActFormat(4, "dynamic_per_token"))
    grouped = fake_quant_act(x, ActFormat(4, "dynamic_per_token", 32))
    rest = slice(32, 128)  # groups without the outlier keep their resolution only when grouped
    assert (grouped - x)[:, rest].norm() < 0.2 * (per_token - x)[:, rest].norm()
    assert torch.equal(fake_quant_act(x, ActFormat(4, "dynamic_per_token", 128)), per_token)
    assert ActFormat(8, "dynamic_per_token", 64).group_for(32) == 32  # a rank-32 branch middle: per token


@pytest.mark.parametrize("recipe,method", [
    ("w4a4-g64-ag32-r16-w8a8-had64", "loraq"), ("w4a8-g64-ag64-r16-w4a8", "lqer"),
    ("w4a16-g64-r16-w4a16-had128", "svdquant"), ("w4a4-g32-ag16-had32", "rtn"),
    ("w4a8-g64-ag64-r16-w8a8-had64", "lopro"), ("w4a16-gch-r8-fp16-had16-asym", "lqer")])
def test_every_new_token_exports_and_agrees_with_torch_layer_by_layer(recipe, method):
    model = mlp_model()
    records = fit_all(model, recipe, method)
    graph, v = export_and_validate(model, records)
    assert v["passed"] and v["worst_layer"]["rel_l2"] < 1e-2 and v["worst_layer"]["disagreeing"] <= 1e-3
    ops = [n.op_type for n in graph.graph.node]
    rotations = [n for n in graph.graph.node if n.op_type == "MatMul" and any("hadamard" in i for i in n.input)]
    assert len(rotations) == (2 if "had" in recipe or method == "lopro" else 0)
    assert ("Gather" in ops) == (method == "lopro")  # lopro's channel permutation
    if "-ag" in recipe:  # per token per group: Q/DQ on the (-1, group) view
        q = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
        blocks = {a.i for n in q for a in n.attribute if a.name == "block_size"}
        assert int(recipe.split("-ag")[1].split("-")[0]) in blocks
    legalize(graph, "ort")  # raises unless every main weight still fuses into MatMulNBits


def test_rotation_is_computed_once_for_inputs_read_by_several_layers():
    from graphs.passes import DEFAULT_PASSES, apply_passes

    class Qkv(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.q, self.k, self.v = nn.Linear(128, 64), nn.Linear(128, 64), nn.Linear(128, 64)

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    model = mlp_model()
    model.module = model.wrapper = Qkv().eval()
    records = fit_all(model, "w4a8-g64-ag64-had64", "rtn")
    graph, _ = export_and_validate(model, records)
    count = lambda g: sum(n.op_type == "MatMul" and any("hadamard" in i for i in n.input) for n in g.graph.node)
    assert count(graph) == 3 and count(apply_passes(graph, DEFAULT_PASSES)) == 1


@pytest.mark.parametrize("args,needle", [
    (["--recipe", "w4a4-g64-ag48-r32-w8a8"], "activation group 48 is not a power of two"),
    (["--recipe", "w4a16-g64-had96"], "Hadamard block 96 is not a power of two"),
    (["--recipe", "w4a4-g64-ag256-r32-w8a8"], "activation group -ag256 does not divide the 384 inputs"),
    (["--recipe", "w4a16-g64-ag64"], "quantizes none"),
    (["--recipe", "w4a4-g64-had64-ag64"], "unexpected 'ag64'"),
])
def test_bad_groups_and_blocks_are_refused_with_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert main(["export", *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loraq: error:") and needle in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("block,width,expected", [(128, 1152, 128), (128, 2240, 64), (256, 384, 128),
                                                  (64, 96, 32), (16, 4608, 16), (128, 35, 1)])
def test_rotation_block_is_the_largest_power_of_two_up_to_b_dividing_the_width(block, width, expected):
    assert rotation_block(block, width) == expected


def test_a_hadamard_block_wider_than_a_layer_allows_is_lowered_for_that_layer():
    """-had128 on a 192-wide input (SANA-1.6B's 2240 in small): that layer rotates by 64, the
    other by 128, and the graph agrees with torch."""
    class Mlp192(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.up, self.down = nn.Linear(128, 192), nn.Linear(192, 128)

        def forward(self, x):
            return self.down(nn.functional.gelu(self.up(x))) + x

    model = mlp_model()
    model.module = model.wrapper = Mlp192().eval()
    records = fit_all(model, "w4a16-g64-r16-w4a16-had128", "loraq")
    assert {n: r.rotation.block for n, r in records.items()} == {"up": 128, "down": 64}
    graph, v = export_and_validate(model, records)
    assert v["passed"] and v["worst_layer"]["rel_l2"] < 1e-2
    inits = {i.name: tuple(i.dims) for i in graph.graph.initializer if "hadamard" in i.name}
    assert sorted(set(inits.values())) == [(64, 64), (128, 128)], inits


def test_an_odd_width_cannot_be_rotated_and_is_refused_with_its_name():
    from loraq_export.errors import UserError
    from loraq_export.fit.plan import plan_layers
    from loraq_export.fit.recipes import load_recipe
    odd = nn.Sequential(nn.Linear(128, 97), nn.Linear(97, 64))
    with pytest.raises(UserError, match="no Hadamard block divides the 97 inputs of layer 1"):
        plan_layers(odd, load_recipe("w4a16-gch-had64", "rtn"), lambda n, m: (True, "test"))


def test_folds_keep_the_fp_model_and_need_no_online_op():
    """PixArt's attention (heads of 16 at toy size): -had16 folds into to_v -> to_out.0."""
    from diffusion_fixtures import tiny_config
    from loraq_export.fit.folds import plan_and_fold
    from loraq_export.fit.recipes import load_recipe
    from loraq_export.models.diffusion import build_from_config, make_diffusion_model
    loaded = make_diffusion_model(build_from_config(*tiny_config("pixart-sigma"), seed=4), "px")
    x = loaded.make_inputs(seed=9, batch=2)
    with torch.no_grad():
        before = loaded.wrapper(*x)
    plans = plan_and_fold(loaded, load_recipe("w4a16-g32-had16", "rtn"), seed=0)
    with torch.no_grad():
        after = loaded.wrapper(*x)
    folded = {p.name: p.folded_by for p in plans if p.folded_by}
    assert folded == {"transformer_blocks.0.attn1.to_out.0": "transformer_blocks.0.attn1.to_v",
                      "transformer_blocks.0.attn2.to_out.0": "transformer_blocks.0.attn2.to_v"}
    assert float((after - before).norm() / before.norm()) < 1e-5
    plans32 = plan_and_fold(make_diffusion_model(build_from_config(*tiny_config("pixart-sigma"), seed=4), "px"),
                            load_recipe("w4a16-g32-had32", "rtn"), seed=0)
    assert not any(p.folded_by for p in plans32)  # a block of 32 spans two heads of 16: online


@pytest.mark.slow
def test_rotated_checkpoints_round_trip_exactly(tmp_path, capsys):
    """quantize -> export CKPT is byte-identical to a direct export, for online, folded and
    permuted rotations; the report says which."""
    common = ["pixart-sigma", "--num-layers", "1", "--workers", "1", "--no-progress", "--seed", "2"]
    # full-width PixArt: heads of 72, so a block of 8 folds into to_v -> to_out.0
    for recipe, method in (("w4a8-g32-ag16-r8-w8a8-had8", "lqer"), ("w4a16-g32-r8-w4a16-had32", "lopro")):
        ck, a, b = (tmp_path / f"{method}-{n}" for n in ("ck", "a", "b"))
        assert main(["quantize", *common, "--recipe", recipe, "--method", method, "--out", str(ck)]) == 0
        capsys.readouterr()
        assert main(["export", str(ck), "--out", str(a), "--no-progress", "--no-quality"]) == 0
        block, folds = (8, 2) if method == "lqer" else (32, 0)
        assert re.search(rf"rotation: \d+ layer\(s\) rotated online, {folds} folded into their producer "
                         rf"\(blocks: \d+ x {block}\)$", capsys.readouterr().out, re.M)
        assert main(["export", *common, "--recipe", recipe, "--method", method, "--out", str(b), "--no-quality"]) == 0
        assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
        rot = {l["name"]: l["rotation"] for l in json.loads((a / "report.json").read_text())["layers"] if l["quantized"]}
        if method == "lqer":
            assert rot["transformer_blocks.0.attn1.to_out.0"] == "folded into transformer_blocks.0.attn1.to_v (block 8)"
            assert rot["transformer_blocks.0.ff.net.0.proj"] == "online (block 8)"
        else:
            assert set(rot.values()) == {"online (block 32, permuted)"}
        g = onnx.load(str(a / "model.onnx"))
        assert any(n.op_type == "MatMul" and any("hadamard" in i for i in n.input) for n in g.graph.node)
