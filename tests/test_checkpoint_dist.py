"""Checkpoints: reload equals in-memory exactly; distributed equals single-process byte for byte;
an interrupted run resumes without refitting finished layers."""
import json
import os
import subprocess
import sys


import pytest
import torch

from loraq_export.store.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.prepare import prepare_fit
from loraq_export.models import load_model
from loraq_export.options import Options
from loraq_export.commands.quantize import run_quantize
from loraq_export.fit.recipes import load_recipe
from loraq_export.fit.swap import quantized

PRESET = ["pixart-sigma", "--num-layers", "1"]


def quantize(tmp_path, name, *extra, method="lqer", recipe="w4a8-g64-r16-w6a6"):
    out = tmp_path / name
    code = subprocess.run([sys.executable, "-m", "loraq_export.cli", "quantize", *PRESET, "--method", method,
                           "--recipe", recipe, "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr
    return out


@pytest.mark.parametrize("recipe,method", [
    ("w4a16-g64-asym", "rtn"), ("w4a16-g64-r16-fp16", "lqer"), ("w8a16-gch-asym", "gptq"),
    pytest.param("w4a8-g64-r16-w6a6", "lqer", marks=pytest.mark.slow),
    pytest.param("w4a4-g128-r8-w4a8", "svdquant", marks=pytest.mark.slow),
    pytest.param("w4a16-g64-r16-w4a16", "loraq", marks=pytest.mark.slow)])
def test_reload_equals_in_memory_exactly(tmp_path, recipe, method):
    loaded = load_model("pixart-sigma", num_layers=1)
    r = load_recipe(recipe, method).for_target("ort")  # what quantize does by default
    _, plans, _ = prepare_fit(loaded, r, seed=0)  # with the input statistics loraq reads
    records = fit_layers(loaded.module, plans, method, workers=1, progress=False)
    out = tmp_path / "ckpt"
    run_quantize(Options(model="pixart-sigma", num_layers=1, recipe=recipe, method=method, out=out, workers=1,
                         progress=False), echo=lambda s: None)
    reloaded, rec2, q = load_checkpoint(out)
    assert q["quant_method"] == "loraq" and q["recipe"]["recipe"] == r.name
    assert set(rec2) == set(records)
    inputs = loaded.make_inputs(seed=5, batch=2)
    with torch.no_grad(), quantized(loaded.module, records):
        a = loaded.wrapper(*inputs)
    with torch.no_grad(), quantized(reloaded.module, rec2):
        b = reloaded.wrapper(*inputs)
    assert torch.equal(a, b)
    from loraq_export import load_quantized_model
    module = load_quantized_model(out)  # the public loader a user calls
    from loraq_export.models.diffusion import make_diffusion_model
    with torch.no_grad():
        c = make_diffusion_model(module, "x").wrapper(*inputs)
    assert torch.equal(a, c)


@pytest.mark.slow
def test_checkpoint_layout(tmp_path):
    out = quantize(tmp_path, "ck")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "PixArtTransformer2DModel"
    q = cfg["quantization_config"]
    assert q["quant_method"] == "loraq" and q["version"] == CHECKPOINT_VERSION and q["recipe"]["recipe"] == "w4a8-g64-r16-w6a6"
    assert "adaln_single.linear" in q["skipped"] and "proj_out" in q["skipped"]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["quantization_config"]) == q
        qw = f.get_tensor("transformer_blocks.0.attn1.to_q.qweight")
    assert qw.dtype == torch.uint8 and qw.numel() == 1152 * 1152 // 2  # INT4 packed two per byte
    assert "transformer_blocks.0.attn1.to_q.weight" not in keys
    assert {"transformer_blocks.0.attn1.to_q.wscales", "transformer_blocks.0.attn1.to_q.proj_down.qweight",
            "transformer_blocks.0.attn1.to_q.proj_up.qweight", "transformer_blocks.0.attn1.to_q.bias"} <= keys


@pytest.mark.slow
def test_distributed_two_gloo_ranks_is_byte_identical(tmp_path):
    single = quantize(tmp_path, "single", "--workers", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29613",
                        "-m", "loraq_export.cli", "quantize", *PRESET, "--method", "lqer", "--recipe", "w4a8-g64-r16-w6a6",
                        "--out", str(tmp_path / "dist"), "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert rep["distributed"]["world_size"] == 2
    for f in ("model.safetensors", "config.json"):
        assert (single / f).read_bytes() == (tmp_path / "dist" / f).read_bytes()


@pytest.mark.slow
def test_parallel_workers_are_byte_identical(tmp_path):
    one = quantize(tmp_path, "one", "--workers", "1", method="loraq", recipe="w4a16-g64-r8-w8a8")
    two = quantize(tmp_path, "two", "--workers", "2", method="loraq", recipe="w4a16-g64-r8-w8a8")
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def test_resume_skips_finished_layers(tmp_path, monkeypatch):
    import loraq_export.fit.parallel as fitting
    out = tmp_path / "ck"
    opts = Options(model="pixart-sigma", num_layers=1, recipe="w4a16-g64-r8-w8a8", method="lqer", out=out,
                   workers=1, progress=False)
    real = fitting._fit_one
    calls = []

    def dying(name, *a):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user's Ctrl-C after four layers
        calls.append(name)
        return real(name, *a)

    monkeypatch.setattr(fitting, "_fit_one", dying)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(opts, echo=lambda s: None)
    assert not out.exists()  # no half-written checkpoint
    partial = tmp_path / ".ck.partial" / "layers"
    assert len(list(partial.glob("*.safetensors"))) == 4
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(fitting, "_fit_one", lambda name, *a: (calls.append(name), real(name, *a))[1])
    run_quantize(opts, echo=lambda s: None)
    assert len(calls) == 6 and not set(calls) & set(first)  # 10 layers: only the 6 unfinished ones
    assert not (tmp_path / ".ck.partial").exists()
    fresh = tmp_path / "fresh"
    run_quantize(Options(**{**opts.__dict__, "out": fresh}), echo=lambda s: None)
    assert (fresh / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_resume_refuses_a_different_command(tmp_path):
    from loraq_export.errors import UserError
    (tmp_path / ".ck.partial").mkdir()
    (tmp_path / ".ck.partial" / "run.json").write_text(json.dumps({"model": "other"}))
    with pytest.raises(UserError, match="partial run of a different command"):
        run_quantize(Options(model="pixart-sigma", num_layers=1, recipe="w4a16-g64", method="rtn",
                             out=tmp_path / "ck", workers=1, progress=False), echo=lambda s: None)


def test_layer_records_of_loraq_0_1_still_load():
    """Checkpoints written before the codebase pass carry two always-empty keys; they still load,
    and a record that really used them (no command could write one) is refused, not misread."""
    from calibless.formats import FitSpec, branch_format, main_format
    from calibless.methods import fit_layer
    from loraq_export.store.layer_tensors import record_from, record_meta, record_tensors
    rec = fit_layer(torch.randn(64, 32), FitSpec(main_format("w4a16", 32), 4, branch_format("w8a8", 32)), "lqer")
    meta = {**record_meta(rec), "smooth": False, "act_scales": {}}
    back = record_from("l", record_tensors("l", rec), meta)
    assert torch.equal(back.effective_weight(), rec.effective_weight())
    with pytest.raises(ValueError, match="not supported"):
        record_from("l", record_tensors("l", rec), {**meta, "smooth": True})
