"""``loraq generate``: images from a local diffusers pipeline folder with the exported quantized
transformer in place of its own, optionally beside the FP pipeline's images from the same seed.

    loraq generate PIPELINE_FOLDER --onnx DIR/model.onnx [--engine PLAN] --prompt P [--prompt P2 ...]
        [--steps N] [--seed S] [--guidance G] [--height H --width W] [--compare] --out OUT

Writes OUT/quantized/<i>.png; with --compare also OUT/fp/<i>.png (diffusers' own images for the
same arguments), OUT/grid.png (FP | quantized per prompt) and PSNR / SSIM per image in
OUT/generate.json, which always holds the seconds per denoising step of each backend and the
versions. OUT is assembled in a staging folder and renamed into place: no partial OUT.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from loraq_export.errors import UserError

DEFAULT_OUT = "loraq-generate"


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="images from a diffusers pipeline folder with the exported quantized "
                                        "transformer (ONNX Runtime or a TensorRT engine), beside FP with --compare")
    g.add_argument("pipeline", type=Path, help="local diffusers pipeline folder (model_index.json, text_encoder/, "
                                               "tokenizer/, vae/, scheduler/, transformer/): PixArtSigmaPipeline, "
                                               "PixArtAlphaPipeline or SanaPipeline")
    g.add_argument("--onnx", type=Path, required=True, help="the transformer's model.onnx written by loraq export")
    g.add_argument("--engine", type=Path, default=None,
                   help="run this TensorRT engine (loraq engine build of the --onnx file) instead of ONNX Runtime")
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

    fixed = fixed_latent_hw(runner)
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
    from loraq_export.evaluate.images import labelled_grid, psnr, ssim
    from loraq_export.runtime import GraphTransformer, check_fits, open_engine, open_onnx
    from loraq_export.runtime.pipeline import SIZE_MULTIPLE, generate, load_pipeline, read_pipeline_folder, \
        step_seconds, with_transformer
    from loraq_export.store.outputs import check_output_dir, staged_dir, write_json_atomic

    prompts = _check_args(args)
    check_output_dir(args.out, args.overwrite)
    folder = read_pipeline_folder(args.pipeline)
    runner = open_engine(args.engine, args.onnx) if args.engine is not None else open_onnx(args.onnx)
    source = f"{args.engine} (built from {args.onnx})" if args.engine is not None else str(args.onnx)
    check_fits(runner, folder.transformer_config, source=source)  # channels and text width, before loading
    graph = GraphTransformer(runner, folder.transformer_config)
    fp_pipe = load_pipeline(folder) if args.compare else None
    q_pipe = with_transformer(fp_pipe, graph) if fp_pipe is not None else load_pipeline(folder, transformer=graph)
    scale = int(q_pipe.vae_scale_factor)
    height, width = _image_size(args, runner, folder.transformer_config, scale, SIZE_MULTIPLE[folder.class_name])
    check_fits(runner, folder.transformer_config, (height // scale, width // scale), source)

    backend = runner.backend
    times = {backend: []}
    if fp_pipe is not None:
        times["torch-fp"] = []
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
                with step_seconds(fp_pipe.transformer, times["torch-fp"]):
                    fp_img = generate(fp_pipe, prompt, desc=f"image {i + 1}/{len(prompts)} FP (torch)", **common)
                fp_img.save(stage / "fp" / f"{i}.png")
                entry["fp"] = f"fp/{i}.png"
                row.append(fp_img)
            calls = graph.calls
            with step_seconds(graph, times[backend]):
                q_img = generate(q_pipe, prompt, desc=f"image {i + 1}/{len(prompts)} quantized ({backend})", **common)
            if graph.calls - calls != args.steps:  # every denoising step ran the graph, none ran torch
                raise RuntimeError(f"the graph ran {graph.calls - calls} times for {args.steps} steps")
            q_img.save(stage / "quantized" / f"{i}.png")
            row.append(q_img)
            if fp_pipe is not None:
                entry.update(psnr_db=round(psnr(fp_img, q_img), 3), ssim=round(ssim(fp_img, q_img), 5))
            images.append(entry)
            rows.append((f"{i}: {prompt}", row))
        headers = (["FP (torch)"] if fp_pipe is not None else []) + [f"quantized ({backend})"]
        labelled_grid(rows, headers).save(stage / "grid.png")
        result = {
            "pipeline": str(folder.root.resolve()), "pipeline_class": folder.class_name,
            "onnx": str(Path(args.onnx).resolve()),
            "engine": str(Path(args.engine).resolve()) if args.engine is not None else None,
            "backend": backend, "steps": args.steps, "seed": args.seed,
            "generator": f"torch.Generator().manual_seed({args.seed}) per image",
            "guidance": args.guidance if args.guidance is not None else _default_guidance(q_pipe),
            "height": height, "width": width, "images": images,
            "seconds_per_step": {k: round(statistics.median(v), 6) for k, v in times.items() if v},
            "seconds_per_step_note": "median wall time of one transformer call (one denoising step, both "
                                     "classifier-free-guidance halves in one batch), over all images",
            "versions": _versions(args.engine is not None),
        }
        write_json_atomic(stage / "generate.json", result)
    _summary(result, args.out, echo)
    return result


def _default_guidance(pipe):
    import inspect

    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return None if p is None else p.default


def _summary(result: dict, out: Path, echo) -> None:
    steps = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["seconds_per_step"].items())
    echo(f"{len(result['images'])} image(s) {result['height']}x{result['width']}, {result['steps']} steps, "
         f"seed {result['seed']}; per denoising step: {steps}")
    for i, im in enumerate(result["images"]):
        if "psnr_db" in im:
            echo(f"  {i}: PSNR {im['psnr_db']:.2f} dB, SSIM {im['ssim']:.4f} vs FP  ({im['prompt']})")
    echo(f"wrote {out}/ (quantized/, {'fp/, ' if result['images'] and 'fp' in result['images'][0] else ''}"
         "grid.png, generate.json)")
