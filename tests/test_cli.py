"""The command line: a real export on the bundled MiniLM, and bad input."""
import json
import subprocess
import sys

import pytest

from loraq_export.cli import main


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *args], capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_export_minilm_rtn_writes_validated_artifacts(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("export", "--method", "rtn", "--out", str(out), "--fp-onnx", "--no-progress")
    assert code == 0, stderr
    assert (out / "model.onnx").is_file() and (out / "model_fp.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "rtn" and report["recipe"]["recipe"] == "w4a16-g64-r32-w8a8"
    assert report["summary"]["quantized_layers"] == 36 and report["summary"]["skipped_layers"] == 1
    skipped = [l for l in report["layers"] if not l["quantized"]]
    assert skipped[0]["name"] == "pooler.dense" and skipped[0]["reason"]
    assert report["validation"]["passed"] and report["validation"]["worst_layer"]["rel_l2"] < 1e-4
    assert 4.0 < report["sizes"]["quantized_bits_per_weight"] < 5.0  # int4 codes + fp32 scales per 64
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


def test_existing_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--out", str(out), "--method", "rtn"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
