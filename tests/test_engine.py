"""`loraq engine` up to where TensorRT is needed: optimization profiles derived from real exported
graphs, the trtexec command lines, the missing-TensorRT error, and the ONNX Runtime bench."""
import re
import sys

import numpy as np
import onnx
import pytest

from diffusion_fixtures import tiny_config
from graph_fixtures import fp32_chain, single_model
from loraq_export.cli import main
from loraq_export.engine.shapes import DIFFUSION_BATCH, DIM_RANGES, derive_profile, feeds_at, parse_shapes, \
    trtexec_build_command, trtexec_timing_command
from loraq_export.errors import UserError
from loraq_export.export.onnx_export import export_graph


@pytest.fixture(scope="module")
def minilm_graph(minilm):
    return export_graph(minilm, minilm.make_inputs(seed=0, batch=2))[0]


def _diffusion_graph(preset):
    from loraq_export.models.diffusion import build_from_config, make_diffusion_model
    loaded = make_diffusion_model(build_from_config(*tiny_config(preset), 0), preset)
    return export_graph(loaded, loaded.make_inputs(seed=0, batch=2))[0]


def _expected(dims, ranges, i):
    return tuple(ranges[d][i] if isinstance(d, str) else d for d in dims)


def _symbolic(model):
    return {vi.name: tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in model.graph.input}


def test_minilm_profile_covers_batch_and_sequence(minilm_graph):
    profile = derive_profile(minilm_graph)
    dims = _symbolic(minilm_graph)
    assert set(profile.shapes) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, (lo, opt, hi) in profile.shapes.items():
        assert dims[name] == ("batch", "sequence")
        assert (lo, opt, hi) == tuple(_expected(dims[name], DIM_RANGES, i) for i in range(3))
    # the profile's shapes run: ONNX Runtime takes the min and max feeds
    from graphs.runtime import ort_session
    sess = ort_session(minilm_graph, threads=1)
    for which in (0, 2):
        out = sess.run(None, feeds_at(minilm_graph, profile.at(which)))[0]
        assert out.shape[:2] == profile.at(which)["input_ids"] and np.isfinite(out).all()


@pytest.mark.parametrize("preset, image_dims", [("pixart-sigma", False), ("sana-600m", True)])
def test_diffusion_profiles(preset, image_dims):
    graph = _diffusion_graph(preset)
    profile = derive_profile(graph)
    dims = _symbolic(graph)
    ranges = {**DIM_RANGES, "batch": DIFFUSION_BATCH}  # classifier-free guidance batches two
    for name, shapes in profile.shapes.items():
        assert shapes == tuple(_expected(dims[name], ranges, i) for i in range(3))
    assert ("height" in dims["hidden_states"]) == image_dims  # PixArt's positional table fixes H and W
    assert profile.shapes["encoder_hidden_states"][1][:2] == (DIFFUSION_BATCH[1], DIM_RANGES["text_len"][1])


def test_shapes_override_and_errors(minilm_graph):
    profile = derive_profile(minilm_graph, parse_shapes(["batch=2", "sequence=16:64:256"]))
    assert profile.shapes["input_ids"] == ((2, 16), (2, 64), (2, 256))
    for bad in (["batch=0"], ["batch=4:2:8"], ["batch"], ["batch=1:2"]):
        with pytest.raises(UserError, match="--shapes"):
            parse_shapes(bad)
    with pytest.raises(UserError, match="no input of the model has"):
        derive_profile(minilm_graph, parse_shapes(["tokens=8"]))
    chain = single_model()  # dims ('batch', 'tokens'): 'tokens' has no known range
    with pytest.raises(UserError, match=r"--shapes tokens=MIN:OPT:MAX"):
        derive_profile(chain)
    assert derive_profile(chain, parse_shapes(["tokens=8:32:64"])).shapes["x"][2] == (DIM_RANGES["batch"][2], 64, 128)


def test_trtexec_lines(minilm_graph, tmp_path):
    profile = derive_profile(minilm_graph)
    line = trtexec_build_command(tmp_path / "m.onnx", tmp_path / "m.plan", profile, tmp_path / "tc.bin")
    args = line.split()
    assert args[:3] == ["trtexec", f"--onnx={tmp_path / 'm.onnx'}", "--stronglyTyped"]
    assert not {"--fp16", "--int8", "--best"} & set(args)  # strongly typed: no precision flags
    for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        value = next(a for a in args if a.startswith(flag + "=")).split("=", 1)[1]
        got = dict(item.split(":") for item in value.split(","))
        assert got == {n: "x".join(map(str, s)) for n, s in profile.at(which).items()}
    assert f"--saveEngine={tmp_path / 'm.plan'}" in args and f"--timingCacheFile={tmp_path / 'tc.bin'}" in args
    timing = trtexec_timing_command(tmp_path / "m.plan", profile).split()
    assert f"--loadEngine={tmp_path / 'm.plan'}" in timing and "--noDataTransfers" in timing
    assert any(a.startswith("--shapes=input_ids:" + "x".join(map(str, profile.at(1)["input_ids"]))) for a in timing)


def test_build_dry_run_needs_no_tensorrt(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(fp32_chain([64, 32]), path)
    assert main(["engine", "build", str(path), "--shapes", "tokens=1:16:64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "profile x: min [1, 1, 64] opt [1, 16, 64] max [8, 64, 64]" in out and "trtexec --onnx=" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("cmd", [["build", "{m}"], ["build", "{m}", "--out", "{d}/e.plan"], ["compare", "{m}"],
                                 ["bench", "{m}", "--backend", "tensorrt"]])
def test_without_tensorrt_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, cmd):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError, as where it is absent
    path = tmp_path / "m.onnx"
    onnx.save(fp32_chain([64, 32]), path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["engine", *(a.format(m=path, d=tmp_path) for a in cmd), "--shapes", "tokens=1:16:64"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert "TensorRT is missing" in err and "pip install tensorrt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bench_ort_times_a_quantized_graph_against_its_float_one(tmp_path, capsys):
    q, fp = tmp_path / "q.onnx", tmp_path / "fp.onnx"
    onnx.save(single_model(256, 256, 16, branch="w8a8"), q)
    onnx.save(fp32_chain([256, 256]), fp)
    assert main(["engine", "bench", str(q), "--baseline", str(fp), "--shapes", "tokens=64", "--rounds", "5",
                 "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    medians = [float(m) for m in re.findall(r"median ([0-9.]+) ms", out)]
    p90s = [float(m) for m in re.findall(r"p90 ([0-9.]+) ms", out)]
    assert len(medians) == 2 and all(0 < m <= p for m, p in zip(medians, p90s))
    ratio = float(re.search(r"ratio q.onnx / fp.onnx: ([0-9.]+)", out).group(1))
    assert ratio == pytest.approx(medians[0] / medians[1], rel=1e-2, abs=1e-3)
    assert main(["engine", "bench", str(tmp_path / "missing.onnx")]) == 2


def test_compare_bound_comes_from_the_export_report(tmp_path):
    import json
    from loraq_export.commands.engine import FP16_REL_L2, export_bound
    with pytest.raises(UserError, match="--bound"):
        export_bound(tmp_path / "model.onnx")
    for e2e in (0.021, 1e-4):
        (tmp_path / "report.json").write_text(json.dumps({"validation": {"end_to_end": {"rel_l2": e2e}}}))
        assert export_bound(tmp_path / "model.onnx") == max(e2e, FP16_REL_L2)
