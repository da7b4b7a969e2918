"""End-to-end sampling harness on tiny PixArt / SANA transformers: torch vs ONNX Runtime."""
from __future__ import annotations

import math

import pytest
import torch

from loraq_export.errors import UserError
from diffusion_fixtures import tiny_config
from loraq_export.models.diffusion import build_from_config, make_diffusion_model
from loraq_export.evaluate.sampling import (
    latent_metrics,
    onnx_denoiser,
    run_sampling_loop,
    scheduler_for,
    torch_denoiser,
)

from graphs.runtime import ort_session  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
CASES = [("pixart-sigma", "pixart"), ("sana-600m", "sana")]


def _session(path):
    return ort_session(str(path), threads=1)  # one thread: tiny models on a shared 2-core box


def _tiny(name, seed=0):
    return make_diffusion_model(build_from_config(*tiny_config(name), seed=seed), name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (LoadedModel, onnxruntime session of its FP export)."""
    out = {}
    for name in ("pixart-sigma", "sana-600m"):
        lm = _tiny(name)
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        torch.onnx.export(
            lm.wrapper, lm.make_inputs(), str(path), dynamo=False, opset_version=21,
            input_names=lm.input_names, output_names=lm.output_names, dynamic_axes=lm.dynamic_axes,
        )
        out[name] = lm, _session(path)
    return out


def test_scheduler_for():
    assert type(scheduler_for("pixart")).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler_for("pixart-sigma").config.prediction_type == "epsilon"
    flow = scheduler_for("sana")
    assert type(flow).__name__ == "FlowMatchEulerDiscreteScheduler" and flow.config.shift == 3.0
    with pytest.raises(UserError, match="no scheduler"):
        scheduler_for("unet")


def test_latent_metrics():
    ref = torch.linspace(-1, 1, 1000)
    same = latent_metrics(ref, ref.clone())
    assert same["psnr_db"] == math.inf and same["cosine"] == pytest.approx(1.0)
    noisy = latent_metrics(ref, ref + 0.02)  # mse 4e-4, range 2 -> 10*log10(4/4e-4) = 40 dB
    assert noisy["psnr_db"] == pytest.approx(40.0, abs=1e-4)
    assert latent_metrics(ref, -ref)["cosine"] == pytest.approx(-1.0)
    with pytest.raises(UserError):
        latent_metrics(ref, ref[:10])


@pytest.mark.parametrize("name,kind", CASES)
def test_loop_deterministic_and_onnx_matches(exported, name, kind):
    lm, sess = exported[name]
    x = lm.make_inputs(seed=1)
    noise, cond = x[0], x[2:]
    ref = run_sampling_loop(torch_denoiser(lm.wrapper), scheduler_for(kind), noise, cond, steps=20)
    again = run_sampling_loop(torch_denoiser(lm.wrapper), scheduler_for(kind), noise, cond, steps=20)
    assert torch.equal(ref, again) and ref.shape == noise.shape and torch.isfinite(ref).all()
    assert not torch.allclose(ref, noise)
    sched = scheduler_for(kind)  # one scheduler reused: set_timesteps resets its state
    assert torch.equal(run_sampling_loop(torch_denoiser(lm.wrapper), sched, noise, cond), ref)
    assert torch.equal(run_sampling_loop(torch_denoiser(lm.wrapper), sched, noise, cond), ref)

    onnx = run_sampling_loop(onnx_denoiser(sess, lm.input_names), scheduler_for(kind), noise, cond, steps=20)
    m = latent_metrics(ref, onnx)
    assert m["psnr_db"] > 60 and m["cosine"] > 0.9999, m

    # A perturbed model (10% relative weight noise in the blocks) must score finite and clearly lower.
    bad = _tiny(name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in bad.module.named_parameters():
            if pname.startswith("transformer_blocks.") and p.dim() >= 2:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))
    worse = latent_metrics(ref, run_sampling_loop(torch_denoiser(bad.wrapper), scheduler_for(kind), noise, cond))
    assert math.isfinite(worse["psnr_db"]) and worse["psnr_db"] < min(m["psnr_db"], 60) - 5, (m, worse)


def test_batch_of_two_and_shape_check(exported):
    lm, sess = exported["sana-600m"]
    x = lm.make_inputs(seed=2, batch=2, text_len=5)
    ref = run_sampling_loop(torch_denoiser(lm.wrapper), scheduler_for("sana"), x[0], x[2:], steps=4)
    onnx = run_sampling_loop(onnx_denoiser(sess, lm.input_names), scheduler_for("sana"), x[0], x[2:], steps=4)
    assert ref.shape == x[0].shape and latent_metrics(ref, onnx)["psnr_db"] > 60

    def wrong(latents, t, cond):
        return latents[:, :3]

    with pytest.raises(UserError, match="denoiser returned shape"):
        run_sampling_loop(wrong, scheduler_for("sana"), x[0], x[2:], steps=2)
    with pytest.raises(UserError, match="steps"):
        run_sampling_loop(wrong, scheduler_for("sana"), x[0], x[2:], steps=0)
