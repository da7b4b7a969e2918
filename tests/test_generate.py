"""``loraq generate`` end to end on whole tiny pipeline folders (PixArt-Sigma, SANA): the FP images
are diffusers' own, the quantized ones come from the graph, bad input is one line and no OUT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loraq_export.cli import main
from loraq_export.evaluate.images import psnr, ssim
from loraq_export.export.onnx_export import export_graph, save_onnx
from loraq_export.models import load_model
from loraq_export.models.diffusion import build_from_config, make_diffusion_model
from loraq_export.models.pipeline_folders import write_pipeline_folder

pytestmark = pytest.mark.filterwarnings("ignore")
KINDS = {"pixart-sigma": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
PROMPTS = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse in the desert"]
STEPS = "3"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """kind -> (pipeline folder, FP ONNX of its transformer, ONNX of a transformer with other weights)."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for kind in KINDS:
        folder = write_pipeline_folder(root / kind, kind, seed=0)
        lm = load_model(str(folder))
        fp_onnx = root / f"{kind}-fp.onnx"
        save_onnx(export_graph(lm, lm.make_inputs(batch=2))[0], fp_onnx)
        other = make_diffusion_model(build_from_config(type(lm.module).__name__, dict(lm.module.config), seed=5), kind)
        other_onnx = root / f"{kind}-other.onnx"
        save_onnx(export_graph(other, other.make_inputs(batch=2))[0], other_onnx)
        out[kind] = folder, fp_onnx, other_onnx
    return out


def _generate(capsys, *args):
    code = main(["generate", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _diffusers_image(folder, kind, prompt, size):
    import diffusers

    pipe = getattr(diffusers, KINDS[kind]).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=int(STEPS), generator=torch.Generator().manual_seed(0),
                height=size[0], width=size[1], use_resolution_binning=False).images[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_compare_fp_is_diffusers_own_and_quantized_is_the_graph(pipes, kind, tmp_path, capsys):
    folder, fp_onnx, _ = pipes[kind]
    out = tmp_path / "out"
    args = [folder, "--onnx", fp_onnx, "--steps", STEPS, "--compare", "--out", out]
    code, stdout, err = _generate(capsys, *args, *sum((["--prompt", p] for p in PROMPTS), []))
    assert code == 0, err
    rep = json.loads((out / "generate.json").read_text())
    assert rep["pipeline_class"] == KINDS[kind] and rep["backend"] == "onnxruntime-cpu"
    assert set(rep["seconds_per_step"]) == {"onnxruntime-cpu", "torch-fp"}
    assert all(v > 0 for v in rep["seconds_per_step"].values())
    assert rep["versions"]["diffusers"] and rep["versions"]["onnxruntime"]
    size = (rep["height"], rep["width"])
    assert size == ((64, 64) if kind == "pixart-sigma" else (32, 32))  # the ONNX's latent size x VAE scale
    for i, prompt in enumerate(PROMPTS):
        fp = Image.open(out / "fp" / f"{i}.png")
        q = Image.open(out / "quantized" / f"{i}.png")
        assert fp.size == q.size == size[::-1]
        assert psnr(_diffusers_image(folder, kind, prompt, size), fp) >= 40  # diffusers' own FP image
        # The FP transformer's ONNX: the same pipeline up to float summation order.
        assert rep["images"][i]["psnr_db"] >= 40 and rep["images"][i]["ssim"] > 0.99
        assert rep["images"][i]["psnr_db"] == pytest.approx(psnr(fp, q), abs=1e-3)
    assert np.abs(np.asarray(Image.open(out / "fp/0.png"), float) - np.asarray(Image.open(out / "fp/1.png"), float)).max() > 10
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 192 and grid.size[1] > 2 * 192  # FP | quantized, one row per prompt
    assert "PSNR" in stdout


def test_quantized_images_come_from_the_onnx(pipes, tmp_path, capsys):
    """Other weights in the ONNX: the quantized images change, the FP images do not."""
    folder, fp_onnx, other_onnx = pipes["pixart-sigma"]
    runs = {}
    for name, onnx_path in (("same", fp_onnx), ("other", other_onnx)):
        out = tmp_path / name
        code, _, err = _generate(capsys, folder, "--onnx", onnx_path, "--prompt", PROMPTS[0], "--steps", STEPS,
                                 "--compare", "--out", out)
        assert code == 0, err
        runs[name] = out
    assert psnr(Image.open(runs["same"] / "fp/0.png"), Image.open(runs["other"] / "fp/0.png")) == float("inf")
    assert json.loads((runs["other"] / "generate.json").read_text())["images"][0]["psnr_db"] < 30
    assert psnr(Image.open(runs["same"] / "quantized/0.png"), Image.open(runs["other"] / "quantized/0.png")) < 30


def test_without_compare_writes_quantized_only(pipes, tmp_path, capsys):
    folder, fp_onnx, _ = pipes["sana"]
    out = tmp_path / "q"
    code, _, err = _generate(capsys, folder, "--onnx", fp_onnx, "--prompt", PROMPTS[0], "--steps", "2",
                             "--height", "64", "--width", "96", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "grid.png", "quantized"]
    assert Image.open(out / "quantized/0.png").size == (96, 64)  # SANA's graph takes any latent size
    rep = json.loads((out / "generate.json").read_text())
    assert list(rep["seconds_per_step"]) == ["onnxruntime-cpu"] and "psnr_db" not in rep["images"][0]


def _bad(capsys, tmp_path, *args, match):
    out = tmp_path / "bad-out"
    code, _, err = _generate(capsys, *args, "--out", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraq: error: ") and match in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".bad-out*"))  # no partial OUT, no staging left


def test_bad_input_one_line_no_out(pipes, tmp_path, capsys):
    import shutil

    folder, fp_onnx, _ = pipes["pixart-sigma"]
    sana_folder, sana_onnx, _ = pipes["sana"]
    p = ["--prompt", "a cat"]
    _bad(capsys, tmp_path, folder / "transformer", "--onnx", fp_onnx, *p, match="bare transformer folder")
    _bad(capsys, tmp_path, tmp_path / "nowhere", "--onnx", fp_onnx, *p, match="does not exist")
    no_vae = tmp_path / "no-vae"
    shutil.copytree(folder, no_vae, ignore=shutil.ignore_patterns("vae"))
    _bad(capsys, tmp_path, no_vae, "--onnx", fp_onnx, *p, match="missing vae")
    _bad(capsys, tmp_path, folder, "--onnx", sana_onnx, *p, match="does not fit the pipeline's transformer")
    _bad(capsys, tmp_path, sana_folder, "--onnx", fp_onnx, *p, match="does not fit the pipeline's transformer")
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, *p, "--height", "128", match="exported for 8x8 latents")
    _bad(capsys, tmp_path, folder, "--onnx", tmp_path / "missing.onnx", *p, match="does not exist")
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, "--engine", tmp_path / "missing.plan", *p,
         match="engine file")
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, "--prompt", " ", match="non-empty --prompt")
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, match="--prompt")  # no prompt at all
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, *p, "--steps", "0", match="--steps")
    _bad(capsys, tmp_path, sana_folder, "--onnx", sana_onnx, *p, "--height", "48", match="multiple of 32")


def test_engine_without_tensorrt_is_one_line(pipes, tmp_path, capsys):
    folder, fp_onnx, _ = pipes["pixart-sigma"]
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    try:
        import tensorrt  # noqa: F401
        match = "cannot load the engine"  # TensorRT present: a file that is no engine is refused
    except Exception:  # noqa: BLE001
        match = "TensorRT is missing"
    _bad(capsys, tmp_path, folder, "--onnx", fp_onnx, "--engine", plan, "--prompt", "a cat", match=match)


def test_export_sampling_check_runs_the_graph_transformer(pipes, monkeypatch):
    """The export report's sampling check (and the bench's) feeds the ONNX through GraphTransformer."""
    from graphs.runtime import ort_session
    from loraq_export.evaluate.sampling import onnx_denoiser, sample_latents, torch_denoiser
    from loraq_export.runtime import GraphTransformer

    folder, fp_onnx, _ = pipes["sana"]
    lm = load_model(str(folder))
    calls = []
    forward = GraphTransformer.forward
    monkeypatch.setattr(GraphTransformer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    onnx_latents = sample_latents(lm, onnx_denoiser(ort_session(str(fp_onnx), threads=1), lm.input_names), 0, steps=4)
    assert len(calls) == 4
    ref = sample_latents(lm, torch_denoiser(lm.wrapper), 0, steps=4)
    assert float((onnx_latents - ref).norm() / ref.norm()) < 1e-4


def test_image_metrics():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))

    def reference_ssim(x, y):  # scikit-image's Gaussian SSIM (Wang et al. 2004), written out with scipy
        vals = []
        for c in range(3):
            f = lambda t: scipy_ndimage.gaussian_filter(t, 1.5, truncate=3.5)  # noqa: E731 - 11-tap window
            X, Y = x[..., c].astype(float), y[..., c].astype(float)
            ux, uy = f(X), f(Y)
            vx, vy, vxy = f(X * X) - ux**2, f(Y * Y) - uy**2, f(X * Y) - ux * uy
            c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
            s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
            vals.append(s[5:-5, 5:-5].mean())
        return float(np.mean(vals))

    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-9)
    unrelated = rng.integers(0, 256, a.shape).astype(np.uint8)
    assert abs(ssim(a, unrelated)) < 0.05 < 0.9 < ssim(a, b) < 1.0


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_pipeline_matches_the_torch_quantized_pipeline(pipes, kind, tmp_path, capsys):
    """quantize -> export -> generate: the ONNX-run pipeline agrees with the pipeline running the
    checkpoint's torch quantized model within the export's end-to-end validation bound."""
    from loraq_export.runtime import GraphTransformer, open_onnx
    from loraq_export.runtime.pipeline import generate, load_pipeline, read_pipeline_folder, with_components
    from loraq_export.store.checkpoint import load_quantized_model

    folder = pipes[kind][0]
    ckpt, exp, out = tmp_path / "ckpt", tmp_path / "exp", tmp_path / "gen"
    assert main(["quantize", str(folder), "--recipe", "w4a8-g32-r8-w8a8", "--method", "rtn", "--out", str(ckpt),
                 "--workers", "1", "--no-progress"]) == 0
    assert main(["export", str(ckpt), "--out", str(exp), "--no-quality", "--no-progress"]) == 0
    bound = json.loads((exp / "report.json").read_text())["validation"]["end_to_end"]["bound"]
    code, _, err = _generate(capsys, folder, "--onnx", exp / "model.onnx", "--prompt", PROMPTS[0], "--steps", STEPS,
                             "--compare", "--out", out)
    assert code == 0, err
    rep = json.loads((out / "generate.json").read_text())
    assert 20 < rep["images"][0]["psnr_db"] < 80  # quantized: close to FP, not identical

    pf = read_pipeline_folder(folder)
    fp_pipe = load_pipeline(pf)
    graph = GraphTransformer(open_onnx(exp / "model.onnx"), pf.transformer_config)
    args = dict(seed=0, steps=int(STEPS), height=rep["height"], width=rep["width"], progress=False)
    torch_q = with_components(fp_pipe, transformer=load_quantized_model(ckpt))
    onnx_q = with_components(fp_pipe, transformer=graph)
    lat_t = generate(torch_q, PROMPTS[0], output_type="latent", **args)
    lat_o = generate(onnx_q, PROMPTS[0], output_type="latent", **args)
    lat_fp = generate(fp_pipe, PROMPTS[0], output_type="latent", **args)
    rel = float((lat_o - lat_t).norm() / lat_t.norm())
    print(f"{kind}: ONNX vs torch-quantized latents rel L2 {rel:.3g} (bound {bound:.3g}), "
          f"FP vs torch-quantized {float((lat_fp - lat_t).norm() / lat_t.norm()):.3g}, image PSNR vs FP {rep['images'][0]['psnr_db']}")
    assert rel <= bound, (rel, bound)
    assert rel < float((lat_fp - lat_t).norm() / lat_t.norm())  # closer to torch-quantized than FP is
    # The command's quantized image is this ONNX pipeline's image.
    img = generate(onnx_q, PROMPTS[0], **args)
    assert psnr(img, Image.open(out / "quantized/0.png")) == float("inf")
