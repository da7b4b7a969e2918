"""One row of ``loraq bench``: fit one (method, recipe) pair, export it, validate it, measure it.

A calibless method goes the way ``loraq export`` goes (fit, swap, placeholder export, layer-wise
validation in ONNX Runtime, graph passes, ort legalizer: export/deploy.py); a peer that works on
ONNX (``ort-rtn``, peers.py) quantizes the FP ONNX graph and is validated against its torch twin
(the model with its dequantized weights). Both rows then carry the same measurements: weight
error, bits per weight counting every stored bit, end-to-end quality of the ONNX model (and of
the torch model), fit time, and with ``latency`` ONNX Runtime latency against FP.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from calibless.formats import WeightFormat
from graphs.runtime import ort_session
from loraq_export.evaluate.end_to_end import Reference, headline_error, quality_vs_fp
from loraq_export.evaluate.latency import compare_latency, with_accuracy_level
from loraq_export.evaluate.peers import matmul_layers, ort_quantize, ort_rtn_layers, replaced_weights
from loraq_export.export.deploy import build_deployable_onnx, validation_batches
from loraq_export.export.validate import ValidationError, agreement
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.plan import LayerPlan
from loraq_export.fit.swap import quantized
from loraq_export.models.base import LoadedModel
from loraq_export.options import Options
from loraq_export.report import size_summary, summarize_errors
from loraq_export.timing import Timer


@dataclass
class BenchContext:
    """Everything shared by the rows of one run, computed once."""

    loaded: LoadedModel
    reference: Optional[Reference]
    batches: list  # validation inputs
    fp_outputs: list  # the FP model's outputs on them
    fp_onnx: Optional[Path]  # the FP graph (ort-rtn quantizes it; latency compares against it)
    seed: int
    workers: Optional[int]
    latency: bool


def make_context(loaded: LoadedModel, reference: Optional[Reference], seed: int, workers: Optional[int],
                 latency: bool, fp_onnx: Optional[Path]) -> BenchContext:
    batches = validation_batches(loaded, seed)
    with torch.no_grad():
        fp_outputs = [loaded.wrapper(*b).float().numpy() for b in batches]
    return BenchContext(loaded, reference, batches, fp_outputs, fp_onnx, seed, workers, latency)


def _feed(ctx: BenchContext) -> dict:
    inputs = ctx.loaded.make_inputs(seed=ctx.seed + 303, batch=4 if ctx.loaded.kind == "bert" else 1)
    return {n: t.numpy() for n, t in zip(ctx.loaded.input_names, inputs)}


def _row(method: str, recipe: str, bits: float, weights: int, layers: int, errors: dict, quality: dict,
         times: dict, check: dict, latency: Optional[dict]) -> dict:
    return {"method": method, "recipe": recipe, "bits_per_weight": round(bits, 4), "quantized_weights": weights,
            "quantized_layers": layers, "weight_error": errors, "quality": quality,
            "e2e_error": headline_error(quality), "timings_s": {k: round(v, 3) for k, v in times.items()},
            "onnx_check": check, "latency": latency}


def measure_method(ctx: BenchContext, method: str, recipe: str, plans: list[LayerPlan]) -> dict:
    """A calibless method: fitted, exported and validated as ``loraq export --target ort`` does."""
    loaded, timer = ctx.loaded, Timer()
    with timer("fit_wall"):  # includes starting the worker processes
        records = fit_layers(loaded.module, plans, method, seed=ctx.seed, workers=ctx.workers, progress=False)
    # what fitting itself costs, comparable across models and with ort-rtn: single-threaded seconds summed over layers
    timer.times["fit"] = sum(r.stats["seconds"] for r in records.values())
    latency = None
    with quantized(loaded.module, records), tempfile.TemporaryDirectory(prefix="loraq-bench-") as stage:
        opts = Options(seed=ctx.seed, target="ort")
        validation, graph, session = build_deployable_onnx(loaded, Path(stage), opts, timer, (ctx.batches, ctx.fp_outputs))
        with timer("quality"):
            quality = quality_vs_fp(loaded, ctx.reference, session, ctx.seed)
        if ctx.latency:
            with timer("latency"):
                latency = compare_latency(str(ctx.fp_onnx), str(Path(stage) / "model.onnx"), _feed(ctx))
    sizes = size_summary(loaded, records)
    errors = summarize_errors(records)
    check = {"validated": "layer-wise in ONNX Runtime against the torch reference (as loraq export)",
             "worst_layer_rel_l2": validation["worst_layer"]["rel_l2"],
             "final_vs_validated_graph_rel_l2": graph["final_vs_validated_graph"]["rel_l2"]}
    bits = sum(r.stored_bits() for r in records.values()) / max(sizes["quantized_weights"], 1)
    return _row(method, recipe, bits, sizes["quantized_weights"], len(records),
                {"mean": errors.get("mean_rel_error"), "max": errors.get("max_rel_error")},
                quality, timer.times, check, latency)


def measure_ort_rtn(ctx: BenchContext, recipe: str, fmt: WeightFormat, plans: list[LayerPlan]) -> dict:
    """ONNX Runtime's own quantizer on the FP ONNX graph, restricted to the layers loraq selects."""
    loaded, timer = ctx.loaded, Timer()
    mods = dict(loaded.module.named_modules())
    weights = {p.name: mods[p.name].weight.detach().float().T.contiguous().numpy() for p in plans if p.quantize}
    fp_model = onnx.load(str(ctx.fp_onnx))
    nodes = matmul_layers(fp_model, weights)
    model, fit_s = ort_quantize(fp_model, nodes, fmt)
    timer.times["fit"] = fit_s
    with timer("validate"):
        layers = ort_rtn_layers(model, nodes, weights)
        session = ort_session(model)
        twin = {name: v["weight_kn"] for name, v in layers.items()}
        with torch.no_grad(), replaced_weights(loaded.module, twin):
            worst = max((agreement(loaded.wrapper(*b).float().numpy(),
                                   session.run(None, {n: t.numpy() for n, t in zip(loaded.input_names, b)})[0])
                         for b in ctx.batches), key=lambda a: a["rel_l2"])
        if not worst["rel_l2"] <= 1e-3:  # float summation order only: the twin computes the same weights
            raise ValidationError(f"ort-rtn: ONNX Runtime's quantized model disagrees with its dequantized weights "
                                  f"(relative L2 {worst['rel_l2']:.3g}); please report this with your onnxruntime version")
    with timer("quality"), replaced_weights(loaded.module, twin):
        quality = quality_vs_fp(loaded, ctx.reference, session, ctx.seed)
    latency = None
    if ctx.latency:
        with timer("latency"):
            latency = compare_latency(str(ctx.fp_onnx), with_accuracy_level(model), _feed(ctx))
    errs = [v["rel_error"] for v in layers.values()]
    total_w = sum(v["weights"] for v in layers.values())
    check = {"validated": "end to end in ONNX Runtime against torch with its dequantized MatMulNBits weights",
             "end_to_end_rel_l2": worst["rel_l2"]}
    return _row("ort-rtn", recipe, sum(v["bits"] for v in layers.values()) / total_w, total_w, len(layers),
                {"mean": round(float(np.mean(errs)), 6), "max": round(float(np.max(errs)), 6),
                 "how": "its MatMulNBits weights dequantized back, against the FP weights"},
                quality, timer.times, check, latency)
