"""``loraq generate``: images from a local diffusers pipeline folder with the exported quantized
transformer and / or text encoder in place of its own, optionally beside the FP pipeline's images
from the same seed.

    loraq generate PIPELINE_FOLDER --onnx DIR/model.onnx|DIR [--engine PLAN] [--text-encoder-onnx FILE]
        [--text-encoder-engine PLAN] --prompt P [--prompt P2 ...] [--steps N] [--seed S] [--guidance G]
        [--height H --width W] [--compare] --out OUT

``--onnx DIR`` takes the --out folder of ``loraq export --component all`` (transformer/ and, when
present, text_encoder/; generate_graphs.py). Writes OUT/quantized/<i>.png; with --compare also
OUT/fp/<i>.png (diffusers' own images for the same arguments), OUT/grid.png (FP | quantized per
prompt) and PSNR / SSIM per image in OUT/generate.json, which always holds the components that ran
quantized, the seconds per denoising step and per text encoder call of each backend, and the
versions. OUT is assembled in a staging folder and renamed into place: no partial OUT.
"""
from __future__ import annotations

import statistics
from contextlib import ExitStack
from pathlib import Path

from loraq_export.errors import UserError

DEFAULT_OUT = "loraq-generate"


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="images from a diffusers pipeline folder with the exported quantized "
                                        "transformer and text encoder (ONNX Runtime or TensorRT engines), beside FP "
                                        "with --compare")
    g.add_argument("pipeline", type=Path, help="local diffusers pipeline folder (model_index.json, text_encoder/, "
                                               "tokenizer/, vae/, scheduler/, transformer/): PixArtSigmaPipeline, "
                                               "PixArtAlphaPipeline or SanaPipeline")
    g.add_argument("--onnx", type=Path, default=None,
                   help="the transformer's model.onnx written by loraq export, or the --out folder of loraq export "
                        "--component all (transformer/model.onnx, and text_encoder/model.onnx, used too when present)")
    g.add_argument("--engine", type=Path, default=None,
                   help="run this TensorRT engine (loraq engine build of the transformer's ONNX) instead of ONNX Runtime")
    g.add_argument("--text-encoder-onnx", type=Path, default=None,
                   help="the text encoder's model.onnx (loraq export --component text_encoder); overrides the one "
                        "in an --onnx folder; alone, only the text encoder runs quantized")
    g.add_argument("--text-encoder-engine", type=Path, default=None,
                   help="run this TensorRT engine (built from the text encoder's ONNX) instead of ONNX Runtime")
    g.add_argument("--prompt", action="append", default=None, required=True,
                   help="a prompt; repeat for several (one image each)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--seed", type=int, default=0,
                   help="each image's generator is torch.Generator().manual_seed(SEED) (default 0)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's, 4.5 for PixArt-Sigma and SANA)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the size the ONNX was exported "
                                                            "for, else the transformer's sample_size)")
    g.add_argument("--width", type=int, default=None, help="image width (default: as --height)")
    g.add_argument("--compare", action="store_true",
                   help="also run the FP pipeline: OUT/fp/<i>.png, OUT/grid.png, PSNR and SSIM in OUT/generate.json")
    g.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    run_generate(args)
    return 0


def _check_args(args) -> list[str]:
    prompts = [p for p in (args.prompt or [])]
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("give at least one non-empty --prompt")
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be a positive number of pixels, got {v}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    return prompts


def _image_size(args, runner, config, scale: int, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels: the arguments, else the ONNX's fixed latent size, else sample_size;
    each a multiple of the VAE scale x patch size and of what the pipeline requires."""
    import math

    from loraq_export.runtime import fixed_latent_hw

    fixed = fixed_latent_hw(runner) if runner is not None else None
    default = [d * scale for d in fixed] if fixed else [int(config.get("sample_size", 32)) * scale] * 2
    h = args.height if args.height is not None else (args.width if args.width is not None and not fixed else default[0])
    w = args.width if args.width is not None else (args.height if args.height is not None and not fixed else default[1])
    step = math.lcm(scale * int(config.get("patch_size") or 1), multiple)
    for name, v in (("height", h), ("width", w)):
        if v % step:
            raise UserError(f"--{name} {v} is not a multiple of {step} (VAE downsampling {scale} x patch size "
                            f"{config.get('patch_size') or 1}, and the pipeline's own multiple {multiple}); "
                            f"choose a multiple of {step}")
    return h, w


def _versions(engine: bool) -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("loraq", "torch", "diffusers", "transformers", "onnxruntime") + (("tensorrt",) if engine else ()):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_generate(args, echo=print) -> dict:
    from loraq_export.commands.generate_graphs import open_graphs
    from loraq_export.evaluate.images import labelled_grid, psnr, ssim
    from loraq_export.runtime import check_fits
    from loraq_export.runtime.pipeline import SIZE_MULTIPLE, generate, load_pipeline, read_pipeline_folder, \
        with_components
    from loraq_export.store.outputs import check_output_dir, staged_dir, write_json_atomic

    prompts = _check_args(args)
    check_output_dir(args.out, args.overwrite)
    folder = read_pipeline_folder(args.pipeline)
    graphs = open_graphs(args, folder)  # opened and checked against the folder's configs, before loading
    fp_pipe = load_pipeline(folder) if args.compare else None
    parts = graphs.modules()
    q_pipe = with_components(fp_pipe, **parts) if fp_pipe is not None else load_pipeline(folder, **parts)
    scale = int(q_pipe.vae_scale_factor)
    runner = parts["transformer"].runner if "transformer" in parts else None
    height, width = _image_size(args, runner, folder.transformer_config, scale, SIZE_MULTIPLE[folder.class_name])
    if runner is not None:
        check_fits(runner, folder.transformer_config, (height // scale, width // scale), graphs.parts["transformer"].source)

    backend, te_backend = graphs.backend("transformer"), graphs.backend("text_encoder")
    label = ", ".join(dict.fromkeys(graphs.backend(c) for c in graphs.components))
    times, te_times = {}, {}
    images = []
    progress = not args.no_progress
    with staged_dir(args.out, args.overwrite) as stage:
        (stage / "quantized").mkdir()
        if fp_pipe is not None:
            (stage / "fp").mkdir()
        rows = []
        for i, prompt in enumerate(prompts):
            common = dict(seed=args.seed, steps=args.steps, height=height, width=width, guidance=args.guidance,
                          progress=progress)
            entry = {"prompt": prompt, "quantized": f"quantized/{i}.png"}
            row = []
            if fp_pipe is not None:
                with _timed(fp_pipe, times, "torch-fp", te_times, "torch-fp"):
                    fp_img = generate(fp_pipe, prompt, desc=f"image {i + 1}/{len(prompts)} FP (torch)", **common)
                fp_img.save(stage / "fp" / f"{i}.png")
                entry["fp"] = f"fp/{i}.png"
                row.append(fp_img)
            calls = {c: m.calls for c, m in parts.items()}
            with _timed(q_pipe, times, backend, te_times, te_backend):
                q_img = generate(q_pipe, prompt, desc=f"image {i + 1}/{len(prompts)} quantized ({label})", **common)
            _check_calls(parts, calls, args.steps)
            q_img.save(stage / "quantized" / f"{i}.png")
            row.append(q_img)
            if fp_pipe is not None:
                entry.update(psnr_db=round(psnr(fp_img, q_img), 3), ssim=round(ssim(fp_img, q_img), 5))
            images.append(entry)
            rows.append((f"{i}: {prompt}", row))
        headers = (["FP (torch)"] if fp_pipe is not None else []) + [f"quantized ({label})"]
        labelled_grid(rows, headers).save(stage / "grid.png")
        result = {
            "pipeline": str(folder.root.resolve()), "pipeline_class": folder.class_name, **graphs.record(),
            "backend": backend, "text_encoder_backend": te_backend, "steps": args.steps, "seed": args.seed,
            "generator": f"torch.Generator().manual_seed({args.seed}) per image",
            "guidance": args.guidance if args.guidance is not None else _default_guidance(q_pipe),
            "height": height, "width": width, "images": images,
            "seconds_per_step": _medians(times),
            "seconds_per_step_note": "median wall time of one transformer call (one denoising step, both "
                                     "classifier-free-guidance halves in one batch), over all images",
            "text_encoder_seconds_per_call": _medians(te_times),
            "text_encoder_seconds_per_call_note": "median wall time of one text encoder call (the prompt, then the "
                                                  "negative prompt with guidance), over all images",
            "versions": _versions(any(g.engine is not None for g in graphs.parts.values())),
        }
        write_json_atomic(stage / "generate.json", result)
    _summary(result, args.out, echo)
    return result


def _timed(pipe, times: dict, backend: str, te_times: dict, te_backend: str):
    """Time each transformer call of ``pipe`` into times[backend] and each text encoder call into
    te_times[te_backend]."""
    from loraq_export.runtime.pipeline import step_seconds

    stack = ExitStack()
    stack.enter_context(step_seconds(pipe.transformer, times.setdefault(backend, [])))
    stack.enter_context(step_seconds(pipe.text_encoder, te_times.setdefault(te_backend, [])))
    return stack


def _check_calls(parts: dict, before: dict, steps: int) -> None:
    """Every denoising step ran the transformer graph (none ran torch); the text encoder graph ran."""
    ran = {c: m.calls - before[c] for c, m in parts.items()}
    if ran.get("transformer", steps) != steps:
        raise RuntimeError(f"the transformer graph ran {ran['transformer']} times for {steps} steps")
    if ran.get("text_encoder", 1) < 1:
        raise RuntimeError("the text encoder graph did not run")


def _medians(times: dict) -> dict:
    return {k: round(statistics.median(v), 6) for k, v in times.items() if v}


def _default_guidance(pipe):
    import inspect

    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return None if p is None else p.default


def _summary(result: dict, out: Path, echo) -> None:
    steps = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["seconds_per_step"].items())
    te = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["text_encoder_seconds_per_call"].items())
    echo(f"{len(result['images'])} image(s) {result['height']}x{result['width']}, {result['steps']} steps, "
         f"seed {result['seed']}, quantized: {' + '.join(result['components'])}; per denoising step: {steps}; "
         f"per text encoder call: {te}")
    for i, im in enumerate(result["images"]):
        if "psnr_db" in im:
            echo(f"  {i}: PSNR {im['psnr_db']:.2f} dB, SSIM {im['ssim']:.4f} vs FP  ({im['prompt']})")
    echo(f"wrote {out}/ (quantized/, {'fp/, ' if result['images'] and 'fp' in result['images'][0] else ''}"
         "grid.png, generate.json)")
