"""Target legalizers and `check`: every rule caught on a small graph built to break it; legalized
graphs pass their target's check; ORT claims verified on ORT's optimized model."""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import pytest

from graph_fixtures import chain_model, dq_matmul_model, inputs, layer_spec, rel_l2, run, single_model
from graphs.check import check_main, check_model, format_violations
from graphs.runtime import ort_optimized
from graphs.passes import DEFAULT_PASSES, apply_passes
from graphs.targets import TargetError, legalize
from graphs.targets.tensorrt import synthetic_inputs


def rules(model, target) -> set:
    return {v.rule for v in check_model(model, target)}


def nbits(model) -> int:
    return collections.Counter(n.op_type for n in ort_optimized(model).graph.node)["MatMulNBits"]


# ------------------------------------------------------------------ check: ONNX Runtime
@pytest.mark.parametrize("kw, rule", [
    (dict(block=8), "ort-block-size"),
    (dict(axis=1, block=16), "ort-dq-axis"),
    (dict(consumers=2), "ort-dq-direct"),
    (dict(scale_input=True), "ort-constant-weight"),
    (dict(scale_dtype=ml_dtypes.bfloat16), "ort-scale-type"),
    (dict(act="dynamic8"), "ort-activation-dq"),
    (dict(act="static8"), "ort-activation-dq"),
])
def test_ort_rules(kw, rule):
    found = check_model(dq_matmul_model(**kw), "ort")
    assert rule in {v.rule for v in found}
    assert all(v.node and v.message for v in found)
    # the decisive rule, checked in ORT's optimized graph (ort-session when ORT refuses the model)
    assert {"ort-matmulnbits", "ort-session"} & {v.rule for v in found}


def test_ort_clean_graph_passes_and_is_really_fused():
    model = dq_matmul_model()
    assert check_model(model, "ort") == []
    assert nbits(model) == 1


def test_ort_float_cast_that_ort_removes_is_not_a_violation():
    assert check_model(dq_matmul_model(between="Cast"), "ort") == []  # ORT drops the no-op Cast, then fuses


def test_ort_activation_dq_blocks_matmulnbits_and_legalize_fixes_it_exactly():
    for act in ("dynamic8", "dynamic4", "static8", "static_u8", "per_channel8"):
        before = dq_matmul_model(act=act)
        assert nbits(before) == 0
        after = legalize(before, "ort")
        assert check_model(after, "ort") == [] and nbits(after) == 1
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 128)).astype(np.float32)}
        assert rel_l2(run(before, feeds), run(after, feeds)) < 1e-6  # Mul(Cast(q), s) == DQ(q, s)


def test_ort_legalize_duplicates_shared_weight_dq():
    after = legalize(dq_matmul_model(consumers=2), "ort")
    assert nbits(after) == 2


def test_ort_refuses_what_it_cannot_fix():
    with pytest.raises(TargetError, match="g64") as e:
        legalize(dq_matmul_model(block=8), "ort")
    assert "\n" not in str(e.value) and "ort-block-size" in str(e.value)


def test_ort_legalize_quantized_recipes():
    for kw in (dict(main_act=8, branch="w4a8"), dict(main_act=4, branch="w4a4"), dict(branch="w8a8")):
        before = chain_model([layer_spec(128, 64, 16, **kw), layer_spec(64, 128, 16, seed=1, **kw)])
        for m in (before, apply_passes(before, DEFAULT_PASSES)):
            after = legalize(m, "ort")
            assert check_model(after, "ort") == []
            assert rel_l2(run(before, inputs(128)), run(after, inputs(128))) < 1e-5


@pytest.mark.parametrize("branch, rank, fp32_factors", [
    ("w4a16", 16, 2), ("w8a8", 16, 2), ("w4a8", 64, 2), ("w4a16", 128, 0)])
def test_ort_skinny_factors_run_as_fp32_gemms_from_int4_storage(branch, rank, fp32_factors):
    """Factors of rank <= 64 leave MatMulNBits (faster as fp32 GEMMs in ORT), stay integer in the
    file, and compute the same values; rank 128 stays in MatMulNBits."""
    before = single_model(256, 192, rank, branch=branch)
    after = legalize(before, "ort")
    opt = collections.Counter(n.op_type for n in ort_optimized(after).graph.node)
    assert opt["FusedMatMul"] == fp32_factors and opt["MatMulNBits"] == 3 - fp32_factors
    factors = [i for i in after.graph.initializer if i.name.endswith((".down_q", ".up_q"))]
    assert len(factors) == 2 and all(i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8) for i in factors)
    assert check_model(after, "ort") == []
    feeds = inputs(256)
    # accuracy_level 0 on both sides: MatMulNBits then computes in fp32 too, so only the order differs
    assert rel_l2(run(before, feeds), run(after, feeds)) < 1e-5


# ------------------------------------------------------------------ check: TensorRT
@pytest.mark.parametrize("kw, rule", [
    (dict(act="dynamic4"), "trt-int4-activation"),
    (dict(act="dynamic8"), "trt-constant-scale"),
    (dict(act="dynamic8"), "trt-block-int4-only"),
    (dict(act="static8"), "trt-int4-weight-only"),
    (dict(act="per_channel8", bits=8, block=None), "trt-activation-per-tensor"),
    (dict(act="static_u8"), "trt-quant-type"),
    (dict(signed=False, zero_point=8), "trt-quant-type"),
    (dict(bits=8, block=None, zero_point=3), "trt-zero-point"),
    (dict(negative_scale=True), "trt-positive-scale"),
    (dict(scale_input=True), "trt-constant-scale"),
    (dict(bits=8, block=64), "trt-block-int4-only"),
    (dict(block=None), "trt-int4-block"),
    (dict(block=32), "trt-int4-block-size"),
    (dict(block=16), "trt-int4-block-size"),
    (dict(axis=1, block=32), "trt-int4-block-size"),
    (dict(zero_point=2), "trt-zero-point"),
    (dict(between="Cast"), "trt-dq-feeds-gemm"),
])
def test_tensorrt_rules(kw, rule):
    found = check_model(dq_matmul_model(**kw), "tensorrt")
    assert rule in {v.rule for v in found}, format_violations(found, "tensorrt")
    assert all(v.node and v.message for v in found)


def test_tensorrt_clean_graphs_pass():
    assert check_model(dq_matmul_model(), "tensorrt") == []  # INT4 block weight-only, float activations
    assert check_model(dq_matmul_model(block=128), "tensorrt") == []
    assert check_model(dq_matmul_model(axis=1, block=64), "tensorrt") == []  # blocked along N
    assert check_model(dq_matmul_model(bits=8, block=None, act="static8"), "tensorrt") == []  # W8A8


def test_tensorrt_refuses_4bit_activations_naming_alternatives():
    model = single_model(main_act=4, branch="w4a4")
    with pytest.raises(TargetError) as e:
        legalize(model, "tensorrt")
    msg = str(e.value)
    assert "\n" not in msg and "4-bit activations" in msg and "w4a16" in msg and "w8a8" in msg
    with pytest.raises(TargetError, match="INT4 is weight-only"):
        legalize(single_model(main_act=8, branch="w4a8"), "tensorrt")


def test_tensorrt_conversion_when_asked():
    model = single_model(main_act=4, branch="w4a4")
    report = {}
    out = legalize(model, "tensorrt", allow_conversion=True, report=report)
    assert check_model(out, "tensorrt") == []
    assert report["conversions"] and report["violations"] == []
    assert rules(model, "tensorrt") >= {"trt-int4-activation", "trt-int4-weight-only"}


@pytest.mark.parametrize("fuse", [False, True])
def test_tensorrt_deployable_recipe_with_calibration(fuse):
    model = chain_model([layer_spec(128, 64, 16, branch="w8a8"), layer_spec(64, 128, 16, branch="w8a8", seed=1)])
    if fuse:
        model = apply_passes(model, DEFAULT_PASSES)
    report = {}
    out = legalize(model, "tensorrt", report=report)
    assert check_model(out, "tensorrt") == []
    cal = report["calibration"]
    assert cal["batches"] >= 1 and cal["inputs"] == {"x": [1, 64, 128]} and len(cal["scales"]) == 4
    assert all(s["scale"] > 0 and s["bits"] == 8 for s in cal["scales"].values())
    assert any("per channel" in r for r in report["rewrites"])  # the INT8 blocked down projection
    # static scales and per-channel A move the output a little, not a lot
    assert rel_l2(run(model, inputs(128)), run(out, inputs(128))) < 0.1


def test_tensorrt_int4_per_channel_becomes_blocked_exactly():
    model = single_model(128, 64, 16, branch="fp16", block=None)
    out = legalize(model, "tensorrt")
    assert check_model(out, "tensorrt") == []
    assert rel_l2(run(model, inputs(128)), run(out, inputs(128))) < 1e-6


def test_tensorrt_dynamic_quantize_linear_is_flagged():
    from onnx import TensorProto, helper
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="act/DynamicQuantizeLinear"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="act/DequantizeLinear"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert "trt-dynamic-quant" in rules(model, "tensorrt")


def test_tensorrt_rank32_int4_factor_becomes_int8_per_channel_exactly():
    # B of a rank-32 w4a16 branch: 32 rows, per channel; no INT4 block of 64 or 128 fits
    model = single_model(256, 128, 32, branch="w4a16")
    assert "trt-int4-block" in rules(model, "tensorrt")
    report = {}
    out = legalize(model, "tensorrt", report=report)
    assert check_model(out, "tensorrt") == []
    assert any("INT8 per channel (exact)" in r and "32 rows" in r for r in report["rewrites"])
    int8 = [i for i in out.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert [list(i.dims) for i in int8] == [[32, 128]]
    assert rel_l2(run(model, inputs(256)), run(out, inputs(256))) < 1e-6


def test_tensorrt_factor_blocked_by_32_becomes_float_exactly():
    from graphs.synthetic import random_weight
    spec = layer_spec(128, 64, 16, branch="w4a16")
    spec.down = random_weight(np.random.default_rng(3), 128, 16, 4, 32, scale=0.05)  # blocks of 32, unequal scales
    model = chain_model([spec])
    assert "trt-int4-block-size" in rules(model, "tensorrt")
    report = {}
    out = legalize(model, "tensorrt", report=report)
    assert check_model(out, "tensorrt") == []
    assert any("blocked by 32" in r and "float32 values" in r for r in report["rewrites"])
    assert rel_l2(run(model, inputs(128)), run(out, inputs(128))) < 1e-6


def test_tensorrt_refuses_a_main_weight_blocked_by_32():
    model = single_model(128, 64, 16, branch="fp16", block=32)
    with pytest.raises(TargetError) as e:
        legalize(model, "tensorrt")
    msg = str(e.value)
    assert "\n" not in msg and "trt-int4-block-size" in msg and "block size 32" in msg and "g64" in msg


def test_synthetic_inputs_follow_the_specs():
    feeds = synthetic_inputs(single_model(), n=2, dims={"tokens": 7})
    assert len(feeds) == 2 and feeds[0]["x"].shape == (1, 7, 128) and feeds[0]["x"].dtype == np.float32


def test_check_main_exit_status(capsys):
    good, bad = dq_matmul_model(), dq_matmul_model(act="dynamic4")
    assert check_main(good, "tensorrt") == 0
    assert "OK" in capsys.readouterr().out
    assert check_main(bad, "tensorrt") == 1
    out = capsys.readouterr().out
    assert "act/QuantizeLinear: [trt-int4-activation]" in out and "FAILED" in out
    with pytest.raises(TargetError):
        legalize(dq_matmul_model(), "tpu")


def test_ort_lowering_needs_no_shape_inference():
    import onnx_graphsurgeon as gs
    from graphs.targets.ort import lower_activation_dq
    graph = gs.import_onnx(single_model(main_act=8, branch="w4a8"))  # as written: no value_info at all
    assert lower_activation_dq(graph) == 3  # the per-token scales are recognised from their ReduceMax


@pytest.mark.parametrize("bits", [8, 4])
def test_ort_quantized_gemm_output_blocks_matmulnbits_and_legalize_fixes_it_exactly(bits):
    # layer 0 has no bias, so its GEMM output goes straight into layer 1's activation quantizer
    model = chain_model([layer_spec(128, 64, 0, bias=False),
                         layer_spec(64, 128, 16, main_act=bits, branch=f"w4a{bits}", seed=1)])
    assert {"ort-output-q", "ort-matmulnbits"} <= rules(model, "ort")
    out = legalize(model, "ort")
    assert check_model(out, "ort") == []
    assert rel_l2(run(model, inputs(128)), run(out, inputs(128))) < 1e-6  # Div/Round/Clip == QuantizeLinear
