"""The command line: a real export on the bundled MiniLM, and bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from loraq_export.cli import main
from loraq_export.fit.recipes import DEFAULT_BUDGET, DEFAULT_RECIPE


def run_cli(*args):
    # the default export allocates under a budget (input statistics, layer sensitivities): allow a loaded machine
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *args], capture_output=True, text=True, timeout=1800)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_export_minilm_rtn_writes_validated_artifacts(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("export", "--method", "rtn", "--out", str(out), "--fp-onnx", "--no-progress")
    assert code == 0, stderr
    assert (out / "model.onnx").is_file() and (out / "model_fp.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "rtn" and report["recipe"]["recipe"] == DEFAULT_RECIPE
    assert report["summary"]["quantized_layers"] == 36 and report["summary"]["skipped_layers"] == 1
    skipped = [l for l in report["layers"] if not l["quantized"]]
    assert skipped[0]["name"] == "pooler.dense" and skipped[0]["reason"]
    assert report["validation"]["passed"] and report["validation"]["worst_layer"]["rel_l2"] < 1e-4
    # int4 codes + fp32 scales and zero points per group, groups allocated under the default budget
    assert report["allocation"]["budget"] == DEFAULT_BUDGET
    assert 4.0 < report["sizes"]["quantized_bits_per_weight"] <= DEFAULT_BUDGET
    z = report["sizes"]  # the quantized layers shrink ~7x; embeddings stay fp32 in both files
    assert z["model_fp.onnx_bytes"] - z["model.onnx_bytes"] > 0.7 * z["quantized_layers_bytes_fp32"]
    q = report["quality"]
    assert q["sentences"] == 50 and 0.9 < q["torch"]["mean"] <= 1.0 and abs(q["onnx"]["mean"] - q["torch"]["mean"]) < 1e-3
    for key in ("load", "fit", "export", "validate", "total"):
        assert key in report["timings_s"]
    assert "ONNX Runtime vs torch" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("args,needle", [
    (["export", "--recipe", "w4a4-g65"], "group size"),
    (["export", "--recipe", "w4a4"], "bad recipe"),
    (["export", "--recipe", "w4a16-g64-r32-nope"], "branch format"),
    (["export", "--method", "magic"], "unknown method"),
    (["export", "no-such-model-anywhere"], "not found"),
    (["export", "--recipe", "missing.yaml"], "does not exist"),
    (["export", "--recipe", "w4a16-g64", "--method", "loraq"], "has none"),
    (["export", "--recipe", "w4a16-g64-r999-w8a8"], "rank 999 is larger"),
    (["export", "--bogus-flag"], "unrecognized arguments"),
    (["export", "--num-layers", "2"], "presets only"),
])
def test_bad_input_one_line_nonzero_no_output(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    code = main([*args, "--out", str(out)] if args[-1] != "--bogus-flag" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("loraq: error:") and needle in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", ["w4a16-g64-asym", "w8a16-gch-asym", "w4a8-g64-ag32-had64", "w4a4-g128"])
def test_the_branch_a_branchless_recipe_is_told_to_add_parses(recipe):
    from loraq_export.fit.plan import recipe_with_branch
    from loraq_export.fit.recipes import parse_layer_recipe
    lr, plain = parse_layer_recipe(recipe_with_branch(recipe)), parse_layer_recipe(recipe)
    assert lr.rank == 16 and lr.main == plain.main and lr.rotation == plain.rotation


def test_existing_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--out", str(out), "--method", "rtn"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_export_targets_and_check(tmp_path, capsys):
    """--target tensorrt legalizes (static INT8 scales from a data-free calibration) and `check`
    passes it; `check` fails the ort-legal unfused graph for tensorrt; --no-fuse keeps the branch apart."""
    trt, unfused = tmp_path / "trt", tmp_path / "unfused"
    assert main(["export", "--recipe", "w4a16-g64-r8-w8a8", "--method", "lqer", "--target", "tensorrt",
                 "--out", str(trt), "--no-progress", "--no-quality"]) == 0
    rep = json.loads((trt / "report.json").read_text())
    cal = rep["graph"]["tensorrt"]["calibration"]
    assert cal["batches"] >= 2 and cal["scales"] and "no dataset" in cal["source"]
    assert rep["graph"]["tensorrt"]["violations"] == []
    assert main(["check", str(trt / "model.onnx"), "--target", "tensorrt"]) == 0
    assert main(["export", "--recipe", "w4a16-g64-r8-w8a8", "--method", "lqer", "--no-fuse",
                 "--out", str(unfused), "--no-progress", "--no-quality"]) == 0
    assert json.loads((unfused / "report.json").read_text())["graph"]["passes"] == ["cleanup"]
    capsys.readouterr()
    assert main(["check", str(unfused / "model.onnx"), "--target", "tensorrt"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "trt-" in out  # each violation names its rule and node


def test_tensorrt_refuses_4bit_activations_before_fitting(tmp_path, capsys):
    code = main(["export", "--recipe", "w4a4-g64-r32-w8a8", "--target", "tensorrt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "w4a16-g64-r32-w8a8" in err and "--convert" in err


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", None])
def test_check_bad_files(tmp_path, capsys, content):
    p = tmp_path / "m.onnx"
    if content is not None:
        p.write_bytes(content)
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loraq: error:")


@pytest.mark.slow
def test_readme_first_command_through_the_console_script(tmp_path):
    """README's first command as a user types it: `loraq export` in an empty folder, no flags."""
    exe = shutil.which("loraq")
    assert exe, "the 'loraq' console script is not on PATH: pip install -e . installs it"
    p = subprocess.run([exe, "export"], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                       env={k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"})  # the CLI sets it itself
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "loraq-out"
    assert sorted(f.name for f in out.iterdir()) == ["allocation.yaml", "model.onnx", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["recipe"] == DEFAULT_RECIPE and rep["method"] == "loraq"
    assert rep["allocation"]["budget"] == DEFAULT_BUDGET and rep["sizes"]["quantized_bits_per_weight"] <= DEFAULT_BUDGET
    assert rep["summary"]["quantized_layers"] == 36 and rep["validation"]["passed"]
    assert rep["graph"]["target"] == "ort" and rep["graph"]["ort"]["violations"] == []
    assert rep["quality"]["torch"]["mean"] > 0.98 and abs(rep["quality"]["onnx"]["mean"] - rep["quality"]["torch"]["mean"]) < 1e-3
    first = p.stdout.splitlines()[0]
    assert first == f"loraq: all-MiniLM-L6-v2 | recipe {DEFAULT_RECIPE} | method loraq", p.stdout
    assert main(["check", str(out / "model.onnx")]) == 0


@pytest.mark.slow
def test_export_of_a_checkpoint_equals_a_direct_export(tmp_path, capsys):
    """`loraq quantize` then `loraq export CKPT` gives the very model.onnx that `loraq export` gives
    with the same recipe, method and seed, and compares against the FP original it reloads."""
    common = ["pixart-sigma", "--num-layers", "1", "--recipe", "w4a8-g32-r8-w8a8", "--method", "lqer",
              "--workers", "1", "--no-progress"]
    ck, from_ck, direct = tmp_path / "ck", tmp_path / "from_ck", tmp_path / "direct"
    assert main(["quantize", *common, "--out", str(ck)]) == 0
    assert main(["export", str(ck), "--out", str(from_ck), "--no-progress"]) == 0
    assert main(["export", *common, "--out", str(direct)]) == 0
    assert (from_ck / "model.onnx").read_bytes() == (direct / "model.onnx").read_bytes()
    rep = json.loads((from_ck / "report.json").read_text())
    assert rep["validation"]["passed"] and rep["summary"]["quantized_layers"] == 10
    assert set(rep["sampling"]["vs_fp"]) == {"torch_quantized", "onnx_quantized"}  # the FP original was reloaded
    assert rep["sampling"] == json.loads((direct / "report.json").read_text())["sampling"]
    capsys.readouterr()
    assert main(["export", str(ck), "--recipe", "w4a16-g64", "--out", str(tmp_path / "x")]) == 2
    assert "carries its own recipe" in capsys.readouterr().err


def test_a_checkpoint_for_onnx_runtime_is_refused_for_tensorrt(tmp_path, capsys):
    """quantize --target ort (the default) fits signed scales, which TensorRT cannot take."""
    ck = tmp_path / "ck"
    assert main(["quantize", "pixart-sigma", "--num-layers", "1", "--recipe", "w4a16-g64", "--method", "rtn",
                 "--workers", "1", "--no-progress", "--out", str(ck)]) == 0
    capsys.readouterr()
    assert main(["export", str(ck), "--target", "tensorrt", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target tensorrt" in err and "signed scales" in err
    assert not (tmp_path / "x").exists()
