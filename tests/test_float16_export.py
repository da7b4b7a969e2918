"""export --dtype: TensorRT graphs are float16 by default (every scale float16, INT4 blocks of 64 or
128, passing `check --target tensorrt`, ONNX Runtime agreeing with the torch reference within the
recorded bound); --dtype fp32 still gives the float32 graph; ONNX Runtime takes float16 graphs too
(MatMulNBits has a float16 kernel); a graph beyond the bound is refused with nothing written."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from graphs.constants import TRT_INT4_BLOCK_SIZES
from graphs.runtime import input_specs, ort_session, random_feed
from loraq_export.cli import main

MINILM = ["--recipe", "w4a16-g64-r32-w4a16", "--method", "rtn"]
PIXART = ["pixart-sigma", "--num-layers", "1", "--method", "rtn"]


def _export(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["export", *args, "--out", str(out), "--no-progress", "--no-quality"]) == 0
    return onnx.load(out / "model.onnx"), json.loads((out / "report.json").read_text()), out


def _dq_scales(model):
    inits = {i.name: i for i in model.graph.initializer}
    return [(n, inits[n.input[1]]) for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]


def _assert_fp16_tensorrt_graph(model, report, path):
    scales = _dq_scales(model)
    assert scales and {s.data_type for _, s in scales} == {TensorProto.FLOAT16}
    int4 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT4}
    blocks = [next(a.i for a in n.attribute if a.name == "block_size") for n, _ in scales if n.input[0] in int4]
    assert blocks and set(blocks) <= set(TRT_INT4_BLOCK_SIZES)
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT16}
    assert main(["check", str(path / "model.onnx"), "--target", "tensorrt"]) == 0
    assert report["graph"]["dtype"] == "fp16"
    fp16 = report["validation"]["fp16"]
    assert fp16["passed"] and fp16["output_dtype"] == "float16"
    assert 0 < fp16["rel_l2"] <= fp16["bound"] and fp16["cosine"] > 0.999


def _agreement_on_fresh_inputs(half, full, seed=7):
    """ONNX Runtime on the float16 and the float32 graph, on inputs neither validation saw."""
    specs = [(n, dt, [2 if isinstance(d, str) else d for d in shape]) for n, dt, shape in input_specs(full)]
    feed = random_feed(specs, np.random.default_rng(seed), int_value=1)
    types = {n: dt for n, dt, _ in input_specs(half)}
    y32 = ort_session(full).run(None, feed)[0].astype(np.float64)
    y16 = ort_session(half).run(None, {n: v.astype(types[n]) for n, v in feed.items()})[0].astype(np.float64)
    return float(np.linalg.norm(y16 - y32) / np.linalg.norm(y32))


@pytest.mark.slow
def test_minilm_tensorrt_export_is_float16_and_fp32_on_request(tmp_path, capsys):
    half, rep16, out16 = _export(tmp_path, "fp16", *MINILM, "--target", "tensorrt")
    _assert_fp16_tensorrt_graph(half, rep16, out16)
    full, rep32, out32 = _export(tmp_path, "fp32", *MINILM, "--target", "tensorrt", "--dtype", "fp32")
    assert rep32["graph"]["dtype"] == "fp32" and "fp16" not in rep32["validation"]
    assert {s.data_type for _, s in _dq_scales(full)} == {TensorProto.FLOAT}
    assert main(["check", str(out32 / "model.onnx"), "--target", "tensorrt"]) == 0
    # the same fit (rtn is deterministic): the float16 graph is the float32 one to float16's precision
    assert _agreement_on_fresh_inputs(half, full) <= rep16["validation"]["fp16"]["bound"]


@pytest.mark.slow
def test_pixart_preset_tensorrt_export_is_float16(tmp_path):
    half, rep, out = _export(tmp_path, "pixart", *PIXART, "--target", "tensorrt")
    _assert_fp16_tensorrt_graph(half, rep, out)
    types = {name: dt for name, dt, _ in input_specs(half)}
    # the timestep feeds only the sinusoidal embedding, kept in float32 (graphs.float16)
    assert types["hidden_states"] == np.float16 and types["timestep"] == np.float32


@pytest.mark.slow
def test_float16_for_onnx_runtime_keeps_matmulnbits(tmp_path):
    model, rep, out = _export(tmp_path, "ort16", *MINILM, "--dtype", "fp16")
    assert rep["graph"]["dtype"] == "fp16" and rep["validation"]["fp16"]["passed"]
    assert {s.data_type for _, s in _dq_scales(model)} == {TensorProto.FLOAT16}
    assert main(["check", str(out / "model.onnx"), "--target", "ort"]) == 0  # every main weight a MatMulNBits


@pytest.mark.slow
def test_a_float16_graph_beyond_the_bound_is_refused(tmp_path, capsys, monkeypatch):
    import loraq_export.export.validate as validate
    monkeypatch.setattr(validate, "FP16_LAYER_FACTOR", 0.0)  # the bound: the float32 graph's own 1e-6
    out = tmp_path / "o"
    assert main(["export", *MINILM, "--target", "tensorrt", "--out", str(out), "--no-progress", "--no-quality"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "float16 graph disagrees with torch" in err and "--dtype fp32" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_unknown_dtype_is_refused_before_loading(tmp_path):
    from loraq_export.commands.export import run_export
    from loraq_export.errors import UserError
    from loraq_export.options import Options
    with pytest.raises(UserError, match="unknown dtype 'bf16'; choose fp16 or fp32"):
        run_export(Options(dtype="bf16", out=tmp_path / "o", progress=False))
    assert list(tmp_path.iterdir()) == []
