"""TensorRT deployment from the command line: what TensorRT cannot block is refused before fitting,
and `check --target tensorrt` catches an INT4 block TensorRT does not take in a real export."""
import onnx
import pytest

from loraq_export.cli import main


@pytest.mark.parametrize("recipe, legal", [("w4a16-g32-r32-w4a16", "w4a16-g64-r32-w4a16"),
                                           ("w4a16-g32", "w4a16-g64")])
def test_tensorrt_refuses_int4_blocks_of_32_before_fitting(tmp_path, capsys, recipe, legal):
    out = tmp_path / "o"
    code = main(["export", "--recipe", recipe, "--target", "tensorrt", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "by 32" in err and f"use {legal}" in err and "64 or 128" in err
    assert not out.exists()


@pytest.mark.slow
def test_a_g32_export_for_ort_fails_the_tensorrt_check(tmp_path, capsys):
    out = tmp_path / "g32"
    assert main(["export", "--recipe", "w4a16-g32", "--method", "rtn", "--out", str(out), "--no-progress",
                 "--no-quality"]) == 0
    assert main(["check", str(out / "model.onnx"), "--target", "ort"]) == 0
    capsys.readouterr()
    assert main(["check", str(out / "model.onnx"), "--target", "tensorrt"]) == 1
    lines = capsys.readouterr().out.splitlines()
    sized = [ln for ln in lines if "[trt-int4-block-size]" in ln]
    model = onnx.load(out / "model.onnx")
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    int4_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    assert int4_dqs and len(sized) == len(int4_dqs)  # every INT4 weight (q, k, v share one after fusion)
    assert all("block size 32" in ln for ln in sized)
