"""The flows behind the commands: quantize (fit + checkpoint) and export (fit or load, ONNX,
validate, report). Each stage is timed; the report records everything a reader needs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from loraq_export import __version__
from loraq_export.fitting import LayerPlan, fit_layers, plan_layers
from loraq_export.models import LoadedModel, load_model
from loraq_export.onnx_export import export_graph, save_onnx
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


@dataclass
class Timer:
    times: dict = field(default_factory=dict)

    def __call__(self, stage: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[stage] = round(timer.times.get(stage, 0.0) + time.perf_counter() - self.t, 3)
        return _T()


def layer_table(plans: list[LayerPlan], records: dict) -> list[dict]:
    rows = []
    for p in plans:
        row = p.to_dict()
        rec = records.get(p.name)
        if rec is not None:
            row.update(method=rec.method, rel_error=round(rec.stats["rel_error"], 6),
                       seconds=round(rec.stats["seconds"], 3), bits_per_weight=round(rec.bits_per_weight(), 4),
                       branch=None if rec.branch is None else f"r{rec.branch.rank} {rec.branch.fmt.name}")
        rows.append(row)
    return rows


def size_summary(loaded: LoadedModel, records: dict) -> dict:
    """Bits per weight counting every stored bit of the quantized layers (codes, scales, zero
    points, branch factors and their scales, smoothing vectors; biases excluded, kept in fp32)."""
    q_params = sum(r.in_features * r.out_features for r in records.values())
    q_bits = sum(r.stored_bits() for r in records.values())
    all_params = sum(p.numel() for p in loaded.module.parameters())
    rest = all_params - q_params  # everything kept in float32 (embeddings, norms, skipped layers, biases)
    return {"quantized_weights": q_params, "quantized_bits_per_weight": round(q_bits / max(q_params, 1), 4),
            "quantized_layers_bytes_fp32": q_params * 4, "quantized_layers_bytes": q_bits // 8,
            "model_params": all_params, "model_bits_per_param": round((q_bits + rest * 32) / all_params, 4)}


def summarize_errors(records: dict) -> dict:
    errs = [r.stats["rel_error"] for r in records.values()]
    return {"mean_rel_error": round(sum(errs) / len(errs), 6), "max_rel_error": round(max(errs), 6)} if errs else {}


def validation_batches(loaded: LoadedModel, seed: int) -> list[tuple]:
    # different batch sizes and lengths than the export example: dynamic axes are exercised
    return [loaded.make_inputs(seed=seed + 101, batch=3), loaded.make_inputs(seed=seed + 202, batch=1)]


def export_quantized(loaded: LoadedModel, records: dict, stage: Path, opts: Options, timer: Timer,
                     fp_inputs_outputs) -> tuple[dict, object]:
    """Swap in the records, write model.onnx into ``stage``, validate it; returns (validation, session)."""
    batches, fp_outputs = fp_inputs_outputs
    example = loaded.make_inputs(seed=opts.seed, batch=2)
    with timer("export"):
        graph, io = export_graph(loaded, example)
        save_onnx(graph, stage / "model.onnx")
    with timer("validate"):
        fns = {m.layer_name: m.reference for m in loaded.module.modules() if isinstance(m, QuantLinear)}
        validation = validate_onnx(graph, io, fns, loaded.wrapper, loaded.input_names, batches, fp_outputs)
        session = ort_session(str(stage / "model.onnx"))
    return validation, session


def run_export(opts: Options, echo=print) -> dict:
    timer = Timer()
    recipe = load_recipe(opts.recipe, opts.method)  # cheap checks first: refuse before loading
    check_output_dir(opts.out, opts.overwrite)
    with timer("load"):
        loaded = load_model(opts.model, opts.num_layers, opts.seed)
        plans = plan_layers(loaded, recipe)
    with staged_dir(opts.out, opts.overwrite) as stage:
        batches = validation_batches(loaded, opts.seed)
        with torch.no_grad():
            fp_outputs = [loaded.wrapper(*b).float().numpy() for b in batches]
        fp_quality = _fp_quality(loaded) if opts.quality else None
        if opts.fp_onnx:
            with timer("export_fp"):
                save_onnx(export_graph(loaded, loaded.make_inputs(seed=opts.seed, batch=2))[0], stage / "model_fp.onnx")
        with timer("fit"):
            records = fit_layers(loaded, plans, recipe.method, seed=opts.seed, workers=opts.workers,
                                 progress=opts.progress)
        with quantized(loaded.module, records):
            validation, session = export_quantized(loaded, records, stage, opts, timer, (batches, fp_outputs))
            with timer("quality"):
                quality = _quality(loaded, fp_quality, session) if opts.quality else None
        report = build_report(loaded, recipe, plans, records, timer, validation, quality, stage, opts)
        write_json_atomic(stage / "report.json", report)
    echo(format_summary(report, opts.out))
    return report


def _fp_quality(loaded: LoadedModel):
    if loaded.kind == "bert":
        from loraq_export.quality import embeddings, sentence_batches
        return embeddings(loaded.wrapper, sentence_batches(loaded))
    return None


def _quality(loaded: LoadedModel, fp_quality, session) -> Optional[dict]:
    if loaded.kind == "bert":
        from loraq_export.quality import bert_embedding_quality
        return bert_embedding_quality(loaded, fp_quality, session)
    return None


def build_report(loaded, recipe: Recipe, plans, records, timer: Timer, validation, quality, stage: Path, opts: Options) -> dict:
    sizes = size_summary(loaded, records)
    for f in ("model.onnx", "model_fp.onnx"):
        p = stage / f
        if p.exists():
            data = p.with_name(p.name + ".data")
            sizes[f"{f}_bytes"] = p.stat().st_size + (data.stat().st_size if data.exists() else 0)
    source = {k: v for k, v in loaded.source.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"loraq_version": __version__, "model": {"name": loaded.name, "kind": loaded.kind, **source},
            "recipe": recipe.to_dict(), "method": recipe.method, "seed": opts.seed,
            "summary": {"quantized_layers": sum(p.quantize for p in plans),
                        "skipped_layers": sum(not p.quantize for p in plans), **summarize_errors(records)},
            "sizes": sizes, "timings_s": {**timer.times, "total": round(sum(timer.times.values()), 3)},
            "validation": validation, "quality": quality, "layers": layer_table(plans, records),
            "onnx": {"opset": 21, "inputs": loaded.input_names, "outputs": loaded.output_names,
                     "ort_accuracy_level_for_validation": 0}}


def format_summary(report: dict, out: Path) -> str:
    s, z, v, t = report["summary"], report["sizes"], report["validation"], report["timings_s"]
    lines = [
        f"loraq: {report['model']['name']} | recipe {report['recipe']['recipe']} | method {report['method']}",
        f"  layers: {s['quantized_layers']} quantized, {s['skipped_layers']} kept in high precision (see report.json)",
        f"  weight error (relative): mean {s.get('mean_rel_error', float('nan')):.4f}, max {s.get('max_rel_error', float('nan')):.4f}",
        f"  size: {z['quantized_bits_per_weight']:.3f} bits/weight in quantized layers, "
        f"{z['quantized_layers_bytes'] / 2**20:.2f} MiB vs {z['quantized_layers_bytes_fp32'] / 2**20:.2f} MiB fp32",
        f"  ONNX Runtime vs torch: layers agree to {v['worst_layer']['rel_l2']:.1e} (rel L2), "
        f"output to {v['end_to_end']['rel_l2']:.1e} (cosine {v['end_to_end']['cosine']:.6f})",
    ]
    q = report.get("quality")
    if q and "torch" in q:
        lines.append(f"  quality: {q['metric']}: torch {q['torch']['mean']:.4f}"
                     + (f", ONNX {q['onnx']['mean']:.4f}" if "onnx" in q else "") + f" over {q['sentences']} sentences")
    lines.append(f"  time: {t['total']:.1f} s (fit {t.get('fit', 0):.1f} s) -> {out}/model.onnx, {out}/report.json")
    return "\n".join(lines)
