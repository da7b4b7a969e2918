"""The flow behind ``loraq export``: fit (or load a checkpoint), export ONNX, run the graph
passes, legalize, validate, report. Each stage is timed; the report records everything a
reader needs. ``loraq quantize`` is in quantize.py."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraq_export.fitting import fit_layers, plan_layers
from loraq_export.report import build_report, format_summary
from loraq_export.models import LoadedModel, load_model
from loraq_export.onnx_export import export_graph, save_onnx
from loraq_export.errors import UserError
from loraq_export.outputs import check_output_dir, staged_dir, write_json_atomic
from loraq_export.recipes import Recipe, load_recipe
from loraq_export.swap import QuantLinear, quantized
from loraq_export.validate import ort_session, validate_onnx


@dataclass
class Options:
    model: Optional[str] = None
    recipe: Optional[str] = None
    method: Optional[str] = None
    out: Path = Path("loraq-out")
    overwrite: bool = False
    fp_onnx: bool = False
    num_layers: Optional[int] = None
    seed: int = 0
    workers: Optional[int] = None
    progress: bool = True
    quality: bool = True
    target: str = "ort"
    fuse: bool = True
    convert: bool = False  # let the target legalizer convert what it cannot express (tensorrt: 4-bit activations)


@dataclass
class Timer:
    """``with timer("stage"):`` adds the block's seconds to ``times[stage]``."""

    times: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = round(self.times.get(stage, 0.0) + time.perf_counter() - t, 3)


def validation_batches(loaded: LoadedModel, seed: int) -> list[tuple]:
    # different batch sizes and lengths than the export example: dynamic axes are exercised
    return [loaded.make_inputs(seed=seed + 101, batch=3), loaded.make_inputs(seed=seed + 202, batch=1)]


CALIBRATION_BATCHES = 4


def export_quantized(loaded: LoadedModel, records: dict, stage: Path, opts: Options, timer: Timer,
                     fp_inputs_outputs) -> tuple[dict, dict, object]:
    """Swap-in state: export, validate, run the graph passes, legalize for the target, write
    model.onnx into ``stage``. Returns (validation, graph report, ORT session of model.onnx).

    Validation is strict, layer by layer, on the graph as written (every layer's QDQ subgraph
    is still intact and named there). The passes and the ONNX Runtime legalizer are exact up to
    float summation order (each is tested on its own); the final graph is compared with the
    validated one end to end, bounded like the end-to-end check. A TensorRT graph replaces
    dynamic activation scales by static ones from a data-free calibration, which changes the
    numerics by design: that difference is measured and reported, not bounded.
    """
    from graphs.passes import DEFAULT_PASSES, NO_FUSE_PASSES, apply_passes
    from graphs.targets import TargetError, legalize
    from loraq_export.validate import ValidationError, agreement
    batches, fp_outputs = fp_inputs_outputs
    example = loaded.make_inputs(seed=opts.seed, batch=2)
    passes = DEFAULT_PASSES if opts.fuse else NO_FUSE_PASSES
    graph_report = {"target": opts.target, "passes": list(passes)}
    with timer("export"):
        written, io = export_graph(loaded, example)
    with timer("validate"):
        fns = {m.layer_name: m.reference for m in loaded.module.modules() if isinstance(m, QuantLinear)}
        validation = validate_onnx(written, io, fns, loaded.wrapper, loaded.input_names, batches, fp_outputs)
    with timer("passes"):
        fused = apply_passes(written, passes)
        if opts.target == "ort":
            ort_report: dict = {}
            final = legalize(fused, "ort", report=ort_report)
            graph_report["ort"] = ort_report
        else:
            feeds = [dict(zip(loaded.input_names, (t.numpy() for t in loaded.make_inputs(seed=opts.seed + 500 + i, batch=2))))
                     for i in range(CALIBRATION_BATCHES)]
            trt_report: dict = {}
            try:
                final = legalize(fused, "tensorrt", allow_conversion=opts.convert, report=trt_report, calibration=feeds)
            except TargetError as e:
                raise UserError(str(e)) from None
            if trt_report.get("calibration"):
                trt_report["calibration"]["source"] = "the model's own example inputs (make_inputs), no dataset"
            graph_report["tensorrt"] = trt_report
    with timer("validate"):
        ref_s, fin_s = ort_session(written), ort_session(final)
        diffs = [agreement(ref_s.run(None, f)[0], fin_s.run(None, f)[0])
                 for f in ({n: t.numpy() for n, t in zip(loaded.input_names, b)} for b in batches)]
        worst = max(diffs, key=lambda a: a["rel_l2"])
        bound = validation["end_to_end"]["bound"]
        graph_report["final_vs_validated_graph"] = {**worst, "bound": None if opts.target == "tensorrt" else bound}
        if opts.target != "tensorrt" and bound is not None and not worst["rel_l2"] <= bound:
            raise ValidationError(f"the fused graph disagrees with the validated one: relative L2 {worst['rel_l2']:.3g} > "
                                  f"{bound:.3g}; re-run with --no-fuse and please report it")
    with timer("export"):
        save_onnx(final, stage / "model.onnx")
    session = ort_session(str(stage / "model.onnx"))
    return validation, graph_report, session


def refuse_undeployable(recipe: Recipe, opts: Options) -> None:
    """Before minutes of fitting: TensorRT has no 4-bit activations (INT4 is weight-only)."""
    if opts.target != "tensorrt" or opts.convert:
        return
    from graphs.targets import ALTERNATIVES
    layers = [recipe.layer] + [lr for _, lr in recipe.overrides]
    if any(lr.main.act.bits == 4 or (lr.branch is not None and lr.branch.act.bits == 4) for lr in layers):
        raise UserError(f"recipe {recipe.name} has 4-bit activations, which TensorRT cannot run; {ALTERNATIVES['tensorrt']}")


def _load_source(opts: Options, timer: Timer):
    """(loaded, recipe, plans, records or None): a checkpoint brings its fitted records."""
    from loraq_export.checkpoint import is_checkpoint, load_checkpoint
    from loraq_export.fitting import LayerPlan
    from loraq_export.recipes import recipe_from_json
    if opts.model is not None and is_checkpoint(Path(opts.model)):
        if opts.recipe is not None or opts.method is not None:
            raise UserError("a checkpoint carries its own recipe and method; drop --recipe/--method")
        check_output_dir(opts.out, opts.overwrite)
        with timer("load"):
            loaded, records, q = load_checkpoint(Path(opts.model))
        recipe = recipe_from_json(q["recipe"])
        refuse_undeployable(recipe, opts)
        fp = _fp_original(q, opts.seed if "seed" not in q else q["seed"])
        plans = [LayerPlan(n, r.in_features, r.out_features, True, "quantized in the checkpoint") for n, r in records.items()]
        plans += [LayerPlan(n, m.in_features, m.out_features, False, (q.get("skipped") or {}).get(n, "not quantized in the checkpoint"))
                  for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear) and n not in records]
        return loaded, recipe, plans, records, fp
    recipe = load_recipe(opts.recipe, opts.method)  # cheap checks first: refuse before loading
    refuse_undeployable(recipe, opts)
    check_output_dir(opts.out, opts.overwrite)
    with timer("load"):
        loaded = load_model(opts.model, opts.num_layers, opts.seed)
        plans = plan_layers(loaded, recipe)
    return loaded, recipe, plans, None, loaded


def _fp_original(q: dict, seed: int):
    """The FP model a checkpoint was made from, when it can still be loaded (else None)."""
    src = q.get("source") or {}
    try:
        return load_model(src.get("model"), src.get("num_layers"), seed) if "model" in src else None
    except UserError:
        return None


def run_export(opts: Options, echo=print) -> dict:
    timer = Timer()
    loaded, recipe, plans, records, fp = _load_source(opts, timer)
    with staged_dir(opts.out, opts.overwrite) as stage:
        batches = validation_batches(loaded, opts.seed)
        fp_outputs = fp_quality = fp_latents = None
        diffusion = opts.quality and loaded.kind in ("pixart", "sana")
        if fp is not None:  # the FP reference: the model itself before the swap, or a checkpoint's original
            with torch.no_grad():
                fp_outputs = [fp.wrapper(*b).float().numpy() for b in batches]
            fp_quality = _fp_quality(fp) if opts.quality else None
            if diffusion:
                from loraq_export.sampling import torch_denoiser
                with timer("quality"):
                    fp_latents = sample_latents(fp, torch_denoiser(fp.wrapper), opts.seed)
        if opts.fp_onnx:
            if fp is None:
                raise UserError("--fp-onnx needs the FP original, which this checkpoint's source no longer provides")
            with timer("export_fp"):
                save_onnx(export_graph(fp, fp.make_inputs(seed=opts.seed, batch=2))[0], stage / "model_fp.onnx")
        if records is None:
            with timer("fit"):
                records = fit_layers(loaded, plans, recipe.method, seed=opts.seed, workers=opts.workers,
                                     progress=opts.progress)
        sampling = None
        with quantized(loaded.module, records):
            validation, graph_report, session = export_quantized(loaded, records, stage, opts, timer, (batches, fp_outputs))
            with timer("quality"):
                quality = _quality(loaded, fp_quality, session) if opts.quality else None
                if diffusion:
                    from loraq_export.sampling import onnx_denoiser, torch_denoiser
                    q_torch = sample_latents(loaded, torch_denoiser(loaded.wrapper), opts.seed)
                    q_onnx = sample_latents(loaded, onnx_denoiser(session, loaded.input_names), opts.seed)
                    sampling = sampling_report(fp_latents, q_torch, q_onnx, loaded.kind)
        report = build_report(loaded, recipe, plans, records, timer.times, opts.seed, stage, validation, quality, sampling)
        report["graph"] = graph_report
        write_json_atomic(stage / "report.json", report)
    echo(format_summary(report, opts.out))
    return report


SAMPLING_STEPS = 20


def sample_latents(loaded: LoadedModel, denoise, seed: int, steps: int = SAMPLING_STEPS):
    """The pipeline's own scheduler class, ``steps`` steps from noise and conditioning fixed by ``seed``."""
    from loraq_export.sampling import run_sampling_loop, scheduler_for
    inputs = loaded.make_inputs(seed=seed + 7, batch=1)
    return run_sampling_loop(denoise, scheduler_for(loaded.kind), inputs[0], inputs[2:], steps)


def sampling_report(fp_latents, q_torch, q_onnx, kind: str) -> dict:
    from loraq_export.sampling import latent_metrics, scheduler_for
    out = {"steps": SAMPLING_STEPS, "scheduler": type(scheduler_for(kind)).__name__,
           "onnx_vs_torch_quantized": latent_metrics(q_torch, q_onnx), "vs_fp": {}}
    if fp_latents is not None:  # a checkpoint has no FP weights to compare with
        out["vs_fp"] = {"torch_quantized": latent_metrics(fp_latents, q_torch),
                        "onnx_quantized": latent_metrics(fp_latents, q_onnx)}
    return out


def _fp_quality(loaded: LoadedModel):
    if loaded.kind == "bert":
        from loraq_export.quality import embeddings, sentence_batches
        return embeddings(loaded.wrapper, sentence_batches(loaded))
    return None


def _quality(loaded: LoadedModel, fp_quality, session) -> Optional[dict]:
    if loaded.kind == "bert" and fp_quality is not None:
        from loraq_export.quality import bert_embedding_quality
        return bert_embedding_quality(loaded, fp_quality, session)
    return None


