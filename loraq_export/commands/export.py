"""``loraq export``: fit (or load a checkpoint), export ONNX, run the graph passes, legalize,
validate, measure quality, report. Each stage is timed; the report records everything a reader
needs. ``loraq quantize`` is in quantize.py."""
from __future__ import annotations

import torch

from loraq_export.commands.lora import check_lora_options, checkpoint_adapters, join_adapters, read_user_adapters
from loraq_export.commands.source import load_source
from loraq_export.fit.lora import merged_in_float
from loraq_export.errors import UserError
from loraq_export.evaluate.quality import embedding_quality, fp_embeddings
from loraq_export.export.deploy import build_deployable_onnx, release_freed_memory, validation_batches
from loraq_export.export.onnx_export import export_graph, save_onnx
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.swap import quantized
from loraq_export.options import Options, graph_dtype
from loraq_export.fit.allocation import write_allocation
from loraq_export.report import ALLOCATION_FILE, build_report, format_summary
from loraq_export.store.outputs import staged_dir, write_json_atomic
from loraq_export.timing import Timer


def run_export(opts: Options, echo=print) -> dict:
    timer = Timer()
    graph_dtype(opts)  # an unknown dtype is refused before loading or fitting
    check_lora_options(opts)
    src = load_source(opts, timer)
    loaded, fp, records = src.loaded, src.fp, src.records
    adapters = read_user_adapters(opts, loaded)
    # the FP reference carries every adapter merged in float: the checkpoint's own, then --lora's
    ckpt_adapters = checkpoint_adapters(src.qconfig, fp)
    fp_adapters = ckpt_adapters + (adapters if fp is loaded else [] if fp is None else read_user_adapters(opts, fp))
    with staged_dir(opts.out, opts.overwrite) as stage:
        batches = validation_batches(loaded, opts.seed)
        fp_outputs = fp_quality = fp_latents = None
        diffusion = opts.quality and loaded.kind in ("pixart", "sana")
        with merged_in_float(None if fp is None else fp.module, fp_adapters):
            if fp is not None:
                with torch.no_grad():
                    fp_outputs = [fp.wrapper(*b).float().numpy() for b in batches]
                fp_quality = fp_embeddings(fp) if opts.quality else None
                if diffusion:
                    from loraq_export.evaluate.sampling import sample_latents, torch_denoiser
                    with timer("quality"):
                        fp_latents = sample_latents(fp, torch_denoiser(fp.wrapper), opts.seed)
            if opts.fp_onnx:
                if fp is None:
                    raise UserError("--fp-onnx needs the FP original, which this checkpoint's source no longer provides")
                with timer("export_fp"):
                    save_onnx(export_graph(fp, fp.make_inputs(seed=opts.seed, batch=2))[0], stage / "model_fp.onnx")
        if fp is not loaded:  # a checkpoint's FP original (9.5 GB for T5-XXL): what it was needed for is taken
            src.fp = fp = None
            release_freed_memory()
        if records is None:
            with timer("fit"):
                records = fit_layers(loaded.module, src.plans, src.recipe.method, seed=opts.seed,
                                     workers=opts.workers, progress=opts.progress)
        records, lora_report = join_adapters(opts, loaded, records, adapters)
        if src.qconfig and src.qconfig.get("lora"):
            lora_report["checkpoint"] = {**src.qconfig["lora"], "in_fp_reference": bool(ckpt_adapters)}
        sampling = None
        with quantized(loaded.module, records):
            validation, graph_report, session = build_deployable_onnx(loaded, stage, opts, timer, (batches, fp_outputs))
            with timer("quality"):
                quality = embedding_quality(loaded, fp_quality, session) if opts.quality else None
                if diffusion:
                    from loraq_export.evaluate.sampling import (onnx_denoiser, sample_latents, sampling_report,
                                                                torch_denoiser)
                    q_torch = sample_latents(loaded, torch_denoiser(loaded.wrapper), opts.seed)
                    q_onnx = sample_latents(loaded, onnx_denoiser(session, loaded.input_names), opts.seed)
                    sampling = sampling_report(fp_latents, q_torch, q_onnx, loaded.kind)
        report = build_report(loaded, src.recipe, src.plans, records, timer.times, opts.seed, stage, validation,
                              quality, sampling, src.allocation)
        if src.allocation is not None:
            write_allocation(stage / ALLOCATION_FILE, src.recipe, src.allocation)
        report["graph"] = graph_report
        if lora_report:
            report["lora"] = lora_report
        write_json_atomic(stage / "report.json", report)
    echo(format_summary(report, opts.out))
    return report
