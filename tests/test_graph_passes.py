"""Graph passes: each runs ONNX Runtime before and after on the same inputs (accuracy_level 0)
and shows the outputs agree, plus what each pass is for (the graph changed as intended)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_fixtures import chain_model, inputs, layer_spec, rel_l2, run, single_model
from graphs.check import check_model
from graphs.runtime import ort_optimized
from graphs.passes import DEFAULT_PASSES, NO_FUSE_PASSES, PASSES, apply_passes, register_pass, to_model
from graphs.passes.fold_up import fold_up
from graphs.targets import legalize

TOL = 1e-5


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def agree(before: onnx.ModelProto, after: onnx.ModelProto, k: int = 128, tol: float = TOL) -> float:
    feeds = inputs(k)
    err = rel_l2(run(before, feeds), run(after, feeds))
    assert err < tol, f"outputs differ: rel L2 {err:.2e}"
    return err


def mixed_chain() -> onnx.ModelProto:
    """K <= N and K > N layers, shared and unshared activation formats, per-channel and blocked."""
    return chain_model([layer_spec(128, 64, 16, main_act=8, branch="w4a8", seed=0),
                        layer_spec(64, 128, 16, branch="w4a8", seed=1),
                        layer_spec(128, 128, 32, branch="w4a16", block=None, seed=2),
                        layer_spec(128, 64, 16, branch="w4a16", block=32, seed=3)])


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registered_pass_keeps_outputs(name):
    before = mixed_chain()
    agree(before, apply_passes(before, [name]))


def test_share_act_quant_merges_identical_quantizers():
    before = single_model(main_act=8, branch="w4a8")  # main and branch both quantize x to INT8 per token
    after = apply_passes(before, ["share_act_quant"])
    assert ops(before)["QuantizeLinear"] == 3 and ops(after)["QuantizeLinear"] == 2
    assert agree(before, after) == 0.0


def test_share_act_quant_keeps_different_formats_apart():
    before = single_model(main_act=4, branch="w4a8")  # INT4 main, INT8 branch: different quantizers
    after = apply_passes(before, ["share_act_quant"])
    assert ops(after)["QuantizeLinear"] == 3


def test_fold_up_one_gemm_over_k_plus_r():
    before = single_model(64, 128, 16, branch="w4a8")  # K <= N: fold_up's layer
    after = apply_passes(before, ["fold_up", "cleanup"])
    o = ops(after)
    assert o["MatMul"] == 2 and o["Add"] == 1 and o["Concat"] == 1  # down + [x | h] @ [W ; B]; bias Add left
    w = {i.name: i for i in after.graph.initializer}["l0.weight_up_q"]
    assert list(w.dims) == [128, 128]  # 64 + 16, padded to a multiple of 64 with zero rows
    agree(before, after, k=64)
    opt = ort_optimized(legalize(after, "ort"))
    assert "Add" not in ops(opt)  # ONNX Runtime fused the bias into MatMulNBits


def test_fold_up_leaves_k_greater_than_n_to_fuse_down():
    before = single_model(128, 64, 16, branch="w4a16")
    assert "Concat" not in ops(apply_passes(before, ["fold_up"]))
    graph = gs.import_onnx(before)
    fold_up(graph, max_k_over_n=None)
    assert "Concat" in ops(to_model(graph, before))


def test_fuse_down_one_gemm_of_n_plus_r_columns():
    before = single_model(128, 64, 16, branch="w4a16")  # branch input = main input: fusable
    after = apply_passes(before, ["fuse_down", "cleanup"])
    o = ops(after)
    assert o["Split"] == 1 and o["MatMul"] == 2
    assert [list(i.dims) for i in after.graph.initializer if i.name == "l0.weight_down_q"] == [[128, 80]]
    agree(before, after)
    opt = ops(ort_optimized(legalize(after, "ort")))
    # [W | A] is one MatMulNBits; the rank-16 up projection runs as an fp32 FusedMatMul (legalize
    # keeps skinny factors out of MatMulNBits); the bias is absorbed before the Split
    assert opt["MatMulNBits"] == 1 and opt["FusedMatMul"] == 1 and opt["Add"] == 1


def test_fuse_down_needs_the_same_activation():
    before = single_model(128, 64, 16, branch="w4a8")  # main float, branch INT8: not the same x
    assert "Split" not in ops(apply_passes(before, ["share_act_quant", "fuse_down"]))
    shared = single_model(128, 64, 16, main_act=8, branch="w4a8")
    assert "Split" not in ops(apply_passes(shared, ["fuse_down"]))  # two quantizers: not shared yet
    after = apply_passes(shared, ["share_act_quant", "fuse_down"])
    assert "Split" in ops(after)
    agree(shared, after)


def test_incompatible_weights_are_left_alone():
    for before in (single_model(128, 64, 16, branch="w8a8"),  # INT8 factors: no INT4 [W | A]
                   single_model(128, 64, 16, branch="w4a8", symmetric=False),  # uint4 main, int4 branch
                   single_model(128, 64, 16, branch="fp16")):
        after = apply_passes(before, DEFAULT_PASSES)
        assert not {"Concat", "Split"} & set(ops(after))
        agree(before, after)


def test_remove_redundant_qdq():
    rng = np.random.default_rng(0)
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    q = {"output_dtype": TensorProto.INT8}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q1"], **q), helper.make_node("DequantizeLinear", ["q1", "s"], ["d1"]),
             helper.make_node("QuantizeLinear", ["d1", "s"], ["q2"], **q), helper.make_node("DequantizeLinear", ["q2", "s"], ["d2"]),
             helper.make_node("Identity", ["d2"], ["i"]), helper.make_node("MatMul", ["i", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [s, w])
    before = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    after = apply_passes(before, ["remove_redundant_qdq"])
    assert ops(after) == {"QuantizeLinear": 1, "DequantizeLinear": 1, "MatMul": 1}
    x = {"x": (3 * np.random.default_rng(1).standard_normal((2, 16))).astype(np.float32)}
    assert np.array_equal(run(before, x), run(after, x))


def test_cleanup_infers_shapes_and_sorts():
    after = apply_passes(single_model(), ["cleanup"])
    onnx.checker.check_model(after)
    assert len(after.graph.value_info) > 5


@pytest.mark.parametrize("kw", [dict(main_act=None, branch="w4a8"), dict(main_act=8, branch="w4a8"),
                                dict(main_act=4, branch="w4a4"), dict(main_act=None, branch="w4a16"),
                                dict(main_act=None, branch="w8a8"), dict(main_act=None, branch="fp16"),
                                dict(main_act=8, branch="w4a8", block=None), dict(branch="w4a16", block=32),
                                dict(main_act=None, branch="w4a8", symmetric=False)])
def test_default_passes_on_chains(kw):
    before = chain_model([layer_spec(128, 64, 16, seed=0, **kw), layer_spec(64, 128, 24, seed=1, **kw)])
    after = apply_passes(before, DEFAULT_PASSES)
    agree(before, after)
    legal = legalize(after, "ort")  # every main weight becomes MatMulNBits (check_model verifies it in ORT)
    agree(before, legal)


def test_no_fuse_keeps_the_branch_apart():
    before = single_model(64, 128, 16, branch="w4a16")
    after = apply_passes(before, NO_FUSE_PASSES)
    assert ops(after)["MatMul"] == 3 and not {"Concat", "Split"} & set(ops(after))


def test_passes_compose():
    before = mixed_chain()
    once = apply_passes(before, DEFAULT_PASSES)
    stepwise = before
    for name in DEFAULT_PASSES:
        stepwise = apply_passes(stepwise, [name])
    feeds = inputs(128)
    assert rel_l2(run(once, feeds), run(stepwise, feeds)) < TOL
    again = apply_passes(once, DEFAULT_PASSES)  # idempotent: nothing left to fuse
    assert ops(again) == ops(once)


def test_registry():
    with pytest.raises(KeyError, match="unknown graph pass"):
        apply_passes(single_model(), ["no_such_pass"])
    with pytest.raises(ValueError, match="already registered"):
        register_pass("fold_up")(lambda g: g)
    assert set(DEFAULT_PASSES) <= set(PASSES)


def test_main_weights_fused_after_default_passes_and_legalize():
    model = legalize(apply_passes(mixed_chain(), DEFAULT_PASSES), "ort")
    assert check_model(model, "ort") == []
    assert ops(ort_optimized(model))["MatMulNBits"] >= 4
