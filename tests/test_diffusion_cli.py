"""A diffusers folder that loraq never saw: one command quantizes, exports and validates it.
Bad folders exit non-zero with one clear line."""
import json
import subprocess
import sys

import pytest
import torch

from diffusion_fixtures import tiny_config
from loraq_export.models.diffusion import build_from_config


def run_cli(*args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def sana_pipeline_folder(tmp_path_factory):
    """A whole-pipeline folder (model_index.json + transformer/) saved with save_pretrained, in bf16."""
    root = tmp_path_factory.mktemp("sana_pipe")
    cls, cfg = tiny_config("sana-600m")
    cfg = {**cfg, "num_layers": 2}
    model = build_from_config(cls, cfg, seed=3).to(torch.bfloat16)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline",
                                                       "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    return root


@pytest.mark.slow
def test_one_command_on_an_unseen_diffusers_folder(sana_pipeline_folder, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("export", str(sana_pipeline_folder), "--out", str(out), "--no-progress",
                                   "--recipe", "w4a8-g32-r8-w8a8")
    assert code == 0, stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["class"] == "SanaTransformer2DModel" and rep["model"]["dtype"] == "bfloat16"
    assert rep["validation"]["passed"] and rep["validation"]["worst_layer"]["rel_l2"] < 1e-3
    assert rep["onnx"]["inputs"] == ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert rep["onnx"]["outputs"] == ["sample"]
    layers = {l["name"]: l for l in rep["layers"]}
    assert all(l["quantized"] == l["name"].startswith("transformer_blocks.") for l in layers.values())
    assert all(l["reason"] for l in layers.values())
    s = rep["sampling"]
    assert s["steps"] == 20 and s["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert s["onnx_vs_torch_quantized"]["psnr_db"] > 40  # the ONNX model samples like the torch reference
    assert set(s["vs_fp"]) == {"torch_quantized", "onnx_quantized"}
    for m in s["vs_fp"].values():
        assert 10 < m["psnr_db"] < 200 and m["cosine"] > 0.9
    import onnx
    g = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in g.graph.input] == rep["onnx"]["inputs"]


@pytest.mark.slow
def test_bad_folders_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    corrupt = tmp_path / "corrupt"
    cls, cfg = tiny_config("pixart-sigma")
    build_from_config(cls, cfg).save_pretrained(corrupt)
    st = next(corrupt.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    for folder, needle in ((empty, "has neither model_index.json nor config.json"),
                           (pipe, "has no 'transformer' entry or transformer/ subfolder"),
                           (unsupported, "unsupported diffusers class 'FluxTransformer2DModel'"),
                           (corrupt, "corrupted or truncated weights file")):
        code, _, err = run_cli("export", str(folder), "--out", str(tmp_path / "o"))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("loraq: error:") and needle in lines[0], err
        assert not (tmp_path / "o").exists()
