"""From a model with its quantized layers swapped in to a deployable, validated model.onnx.

Validation is strict, layer by layer, on the graph as written (every layer's QDQ subgraph is
still intact and named there). The graph passes and the ONNX Runtime legalizer are exact up to
float summation order (each is tested on its own); the final graph is compared with the
validated one end to end, bounded like the end-to-end check. A TensorRT graph replaces dynamic
activation scales by static ones from a data-free calibration, which changes the numerics by
design: that difference is measured and reported, not bounded. A float16 graph (--dtype fp16, the
default for TensorRT) is the final float32 graph converted (graphs.float16) after all of that,
checked again against the target's rules, and run end to end against the torch reference within
validate.fp16_bound; the float32 path does not touch it.
"""
from __future__ import annotations

from pathlib import Path

from graphs.constants import CALIBRATION_BATCHES
from graphs.runtime import ort_session
from loraq_export.errors import UserError
from loraq_export.export.onnx_export import export_graph, save_onnx
from loraq_export.export.validate import ValidationError, agreement, validate_fp16, validate_onnx
from loraq_export.fit.recipes import Recipe
from loraq_export.fit.swap import LoraqLinear
from loraq_export.models import LoadedModel
from loraq_export.options import Options, graph_dtype
from loraq_export.timing import Timer


def validation_batches(loaded: LoadedModel, seed: int) -> list[tuple]:
    # different batch sizes and lengths than the export example: dynamic axes are exercised
    return [loaded.make_inputs(seed=seed + 101, batch=3), loaded.make_inputs(seed=seed + 202, batch=1)]


def calibration_feeds(loaded: LoadedModel, seed: int) -> list[dict]:
    """TensorRT's static activation scales come from the model's own example inputs: no dataset."""
    return [dict(zip(loaded.input_names, (t.numpy() for t in loaded.make_inputs(seed=seed + 500 + i, batch=2))))
            for i in range(CALIBRATION_BATCHES)]


def refuse_undeployable(recipe: Recipe, opts: Options) -> None:
    """Before minutes of fitting, what TensorRT cannot run: INT4 weights blocked other than by 64
    or 128 (no exact conversion for a main weight; docs/deployment.md, "TensorRT"), and, unless
    --convert, 4-bit activations (INT4 is weight-only)."""
    if opts.target != "tensorrt":
        return
    from graphs.constants import TRT_INT4_BLOCK_SIZES
    from graphs.targets import ALTERNATIVES
    layers = [recipe.layer] + [lr for _, lr in recipe.overrides]
    for lr in layers:
        group = lr.main.weight.group_size
        if group is not None and group not in TRT_INT4_BLOCK_SIZES:
            legal = lr.name.replace(f"-g{group}", f"-g{TRT_INT4_BLOCK_SIZES[-1]}", 1)
            raise UserError(f"recipe {lr.name} blocks INT4 weights by {group}; TensorRT takes INT4 blocks of "
                            f"{' or '.join(map(str, sorted(TRT_INT4_BLOCK_SIZES)))} only: use {legal}")
    if opts.convert:
        return
    if any(lr.main.act.bits == 4 or (lr.branch is not None and lr.branch.act.bits == 4) for lr in layers):
        raise UserError(f"recipe {recipe.name} has 4-bit activations, which TensorRT cannot run; {ALTERNATIVES['tensorrt']}")


def legalize_for_target(fused, loaded: LoadedModel, opts: Options) -> tuple:
    """(final model, the legalizer's report) for ``opts.target``."""
    from graphs.targets import TargetError, legalize
    if opts.target == "ort":
        report: dict = {}
        return legalize(fused, "ort", report=report), report
    report = {}
    try:
        final = legalize(fused, "tensorrt", allow_conversion=opts.convert, report=report,
                         calibration=calibration_feeds(loaded, opts.seed))
    except TargetError as e:
        raise UserError(str(e)) from None
    if report.get("calibration"):
        report["calibration"]["source"] = "the model's own example inputs (make_inputs), no dataset"
    return final, report


def quantizes_activations(model) -> bool:
    inits = {i.name for i in model.graph.initializer}
    return any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") and n.input and n.input[0] not in inits
               for n in model.graph.node)


def float16_graph(final, loaded: LoadedModel, opts: Options, batches, final_outputs, layers: int,
                  end_to_end_bound) -> tuple:
    """(the legal float32 graph ``final`` in float16, its check against torch) for --dtype fp16:
    still legal for the target, and agreeing with the quantized torch model within fp16_bound."""
    import torch
    from graphs.check import check_model
    from graphs.float16 import to_float16
    half = to_float16(final, keep=tuple(loaded.float32_regions))
    violations = check_model(half, opts.target)
    if violations:
        v = violations[0]
        raise UserError(f"the float16 graph breaks a {opts.target} rule at {v.node}: [{v.rule}] {v.message}; "
                        "export with --dtype fp32")
    with torch.no_grad():
        refs = [loaded.wrapper(*b).float().numpy() for b in batches]
    return half, validate_fp16(half, loaded.input_names, batches, refs, final_outputs, layers, end_to_end_bound,
                               quantizes_activations(final))


def build_deployable_onnx(loaded: LoadedModel, stage: Path, opts: Options, timer: Timer,
                          fp_inputs_outputs) -> tuple[dict, dict, object]:
    """Swap-in state: export, validate, run the graph passes, legalize for the target, write
    model.onnx into ``stage``. Returns (validation, graph report, ORT session of model.onnx)."""
    from graphs.passes import DEFAULT_PASSES, NO_FUSE_PASSES, apply_passes
    batches, fp_outputs = fp_inputs_outputs
    example = loaded.make_inputs(seed=opts.seed, batch=2)
    passes = DEFAULT_PASSES if opts.fuse else NO_FUSE_PASSES
    graph_report = {"target": opts.target, "passes": list(passes)}
    with timer("export"):
        written, io = export_graph(loaded, example)
        release_freed_memory()
    with timer("validate"):
        fns = {m.layer_name: m.reference for m in loaded.module.modules() if isinstance(m, LoraqLinear)}
        validated_outputs: list = []
        validation = validate_onnx(written, io, fns, loaded.wrapper, loaded.input_names, batches, fp_outputs,
                                   keep_outputs=validated_outputs)
        release_freed_memory()
    with timer("passes"):
        # one graph at a time: each copy of a 4-bit T5-XXL is ~3 GB
        fused = apply_passes(written, passes)
        del written
        release_freed_memory()
        final, graph_report[opts.target] = legalize_for_target(fused, loaded, opts)
        del fused
        release_freed_memory()
    with timer("validate"):
        session = ort_session(final)
        feeds = [{n: t.numpy() for n, t in zip(loaded.input_names, b)} for b in batches]
        final_outputs = [session.run(None, f)[0] for f in feeds]
        diffs = [agreement(ref, out) for ref, out in zip(validated_outputs, final_outputs)]
        worst = max(diffs, key=lambda a: a["rel_l2"])
        bound = validation["end_to_end"]["bound"]
        graph_report["final_vs_validated_graph"] = {**worst, "bound": None if opts.target == "tensorrt" else bound}
        if opts.target != "tensorrt" and bound is not None and not worst["rel_l2"] <= bound:
            raise ValidationError(f"the fused graph disagrees with the validated one: relative L2 {worst['rel_l2']:.3g} > "
                                  f"{bound:.3g}; re-run with --no-fuse and please report it")
    graph_report["dtype"] = graph_dtype(opts)
    if graph_report["dtype"] == "fp16":
        with timer("validate"):
            final, validation["fp16"] = float16_graph(final, loaded, opts, batches, final_outputs,
                                                      validation["layers"], validation["end_to_end"]["bound"])
            from graphs.float16 import float32_nodes
            graph_report["float32_regions"] = {"model": dict(loaded.float32_regions), "ops": float32_nodes(final)}
            session = None  # the float32 one; the float16 graph gets its own below
    release_freed_memory()
    with timer("export"):
        save_onnx(final, stage / "model.onnx")
    if session is None:
        del final
        release_freed_memory()
        session = ort_session(str(stage / "model.onnx"))
    return validation, graph_report, session


def release_freed_memory() -> None:
    """Collect, then hand the C heap's free pages back to the system (glibc keeps freed memory of
    the many protobuf and ONNX Runtime allocations otherwise: a 2-layer T5-XXL export peaked at
    13.7 GiB peak resident without this and 9.1 GiB with it). A no-op where malloc_trim does not exist."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (macOS, musl, Windows)
        pass
