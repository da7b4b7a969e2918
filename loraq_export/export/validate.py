"""ONNX Runtime validation against the torch reference. A mismatch is an error.

Two checks. Layer-wise (strict): every quantized layer's QDQ subgraph, fed the very input
that ONNX Runtime computed for it, must reproduce the torch reference of that layer. End to
end (informative, loosely bounded): in a network with quantized activations, a last-bit
difference in float summation order upstream can move a value across a rounding boundary,
and the changed code propagates (measured on MiniLM at W4A4: layers agree to 3e-7, outputs
differ by 0.4 relative L2, while the quantized model is 0.7 away from FP); so the end-to-end
disagreement is only required to stay below twice the quantization error (END_TO_END_FRACTION).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
import torch

from graphs.runtime import ort_session
from loraq_export.errors import UserError

# A layer passes when its output agrees to LAYER_TOLERANCE relative L2 (float summation order:
# typically 1e-7..1e-5), or when the disagreement is confined to a few elements, each off by
# more than ELEMENT_TOLERANCE of the output's RMS: float order can move an in-layer activation
# (the branch's x A) across a rounding boundary, and that element is then one quantization step
# off (seen on MiniLM: one element, 4e-4 relative L2 for the layer). A wrong scale, layout or
# format corrupts most of a layer's outputs and fails both.
LAYER_TOLERANCE = 1e-3
ELEMENT_TOLERANCE = 1e-4
MAX_DISAGREEING_FRACTION = 1e-3
FLIP_TOLERANCE = 1e-2  # relative L2 allowed when the disagreement is confined to a few elements
# End to end: where a last-bit difference flips quantized activations, ONNX Runtime and torch are two
# equally valid quantized computations, each about q (torch's distance from FP) away from the FP
# model in its own direction; by the triangle inequality they may be up to 2q apart. (Chaotic
# recipes reach that: W4A4 per token on MiniLM, q = 0.65, a fused graph 0.654 from the validated
# one.) Correctness is what the strict layer-by-layer check proves.
END_TO_END_FRACTION = 2.0
# A float16 graph (export --dtype fp16) against the float32 torch reference. float16 has an
# 11-bit significand: each rounding of a value (the inputs, every weight and activation scale,
# every op's output) is off by at most the unit roundoff u = 2^-11 = 4.9e-4 relative, about
# u / sqrt(3) = 2.8e-4 RMS. A quantized layer's output carries the roundings of its scales, its
# input and its output (a few u); the residual stream adds each layer's independent error, so
# after n layers the RMS grows about like sqrt(n) u, and normalizations and softmax amplify it by
# a modest factor. FP16_LAYER_FACTOR = 8 covers a few roundings per layer times that
# amplification (float16 graph vs float32 graph, measured: MiniLM, 36 layers, w4a16-g64-r32-w4a16,
# 1.5e-3 = 0.5 sqrt(n) u; PixArt-Sigma preset, one block, 10 layers, w4a16-g64-r32-w8a8, 1.6e-3 =
# 1.0 sqrt(n) u; the report gives the figure). Bound: the float32 graph's own distance from torch (static
# activation scales for TensorRT, float summation order) plus FP16_LAYER_FACTOR sqrt(n) u; with
# quantized activations, float16 rounding moves values across rounding boundaries as float
# order does, and the end-to-end bound above (twice the quantization error) applies instead
# when it is larger. A wrong type, a clamped or flushed scale corrupts far more than that.
FP16_UNIT_ROUNDOFF = 2.0 ** -11
FP16_LAYER_FACTOR = 8.0


class ValidationError(UserError):
    pass


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref = np.asarray(reference, np.float64).ravel()
    cand = np.asarray(candidate, np.float64).ravel()
    diff = cand - ref
    return {"max_abs": float(np.abs(diff).max(initial=0.0)),
            "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
            "cosine": float(ref @ cand / max(np.linalg.norm(ref) * np.linalg.norm(cand), 1e-30))}


def validate_onnx(model: onnx.ModelProto, layer_io: dict, layer_fns: dict, wrapper: torch.nn.Module,
                  input_names: Sequence[str], batches: Sequence[tuple], fp_outputs: Sequence[np.ndarray] = None,
                  layer_tolerance: float = LAYER_TOLERANCE, keep_outputs: Optional[list] = None) -> dict:
    """Compare ONNX Runtime with torch; raise ValidationError on a mismatch.

    ``layer_io``: layer -> (input name, output name) in the graph; ``layer_fns``: layer -> the
    torch reference of that layer; ``fp_outputs``: the FP model's outputs on ``batches``
    (bounds the end-to-end check; without them the end-to-end figure is reported, not bounded).
    ``keep_outputs``: a list the graph's outputs on ``batches`` are appended to, so a later graph
    can be compared with this one without a second session of it.
    """
    names = [t for io in layer_io.values() for t in io]
    session = ort_session(model, extra_outputs=names)
    out_names = [o.name for o in session.get_outputs()]
    per_layer = []
    e2e = []
    for i, inputs in enumerate(batches):
        results = dict(zip(out_names, session.run(None, {n: t.numpy() for n, t in zip(input_names, inputs)})))
        for layer, (x_name, y_name) in layer_io.items():
            with torch.no_grad():
                ref = layer_fns[layer](torch.from_numpy(results[x_name])).numpy()
            a = agreement(ref, results[y_name])
            rms = float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))) if ref.size else 0.0
            a["disagreeing"] = float(np.mean(np.abs(results[y_name] - ref) > ELEMENT_TOLERANCE * rms + 1e-7)) if ref.size else 0.0
            a["passed"] = bool(a["rel_l2"] <= layer_tolerance or
                               (a["rel_l2"] <= FLIP_TOLERANCE and a["disagreeing"] <= MAX_DISAGREEING_FRACTION))
            per_layer.append({"layer": layer, **{k: a[k] for k in ("rel_l2", "max_abs", "disagreeing", "passed")}})
        with torch.no_grad():
            ref = wrapper(*inputs).float().numpy()
        out = results[out_names[0]]
        if keep_outputs is not None:
            keep_outputs.append(out)
        if out.shape != ref.shape:
            raise ValidationError(f"ONNX Runtime output shape {out.shape} differs from torch {ref.shape}")
        a = agreement(ref, out)
        a["quant_rel_l2"] = agreement(fp_outputs[i], ref)["rel_l2"] if fp_outputs is not None else None
        e2e.append(a)
    failing = [a for a in per_layer if not a["passed"]]
    worst_layer = max(failing or per_layer, key=lambda a: a["rel_l2"] if np.isfinite(a["rel_l2"]) else np.inf)
    if not worst_layer["passed"]:
        raise ValidationError(f"ONNX Runtime disagrees with torch on layer {worst_layer['layer']}: "
                              f"{worst_layer['disagreeing']:.2%} of outputs differ, relative L2 {worst_layer['rel_l2']:.3g}; "
                              "the exported graph is wrong, "
                              "please report it with the recipe used")
    worst = max(e2e, key=lambda a: a["rel_l2"])
    q = worst["quant_rel_l2"]
    # without the FP outputs there is no scale for the end-to-end figure: it is reported only
    bound = None if q is None else max(1e-3, END_TO_END_FRACTION * min(a["quant_rel_l2"] for a in e2e))
    if bound is not None and not worst["rel_l2"] <= bound:
        raise ValidationError(f"ONNX Runtime output disagrees with torch end to end: relative L2 {worst['rel_l2']:.3g} "
                              f"> {bound:.3g} (layers agree to {worst_layer['rel_l2']:.2g}); please report it with the recipe used")
    return {"layers": len(layer_io), "worst_layer": worst_layer, "layer_tolerance": layer_tolerance,
            "element_tolerance": ELEMENT_TOLERANCE, "max_disagreeing_fraction": MAX_DISAGREEING_FRACTION,
            "flip_tolerance": FLIP_TOLERANCE,
            "end_to_end": {"rel_l2": worst["rel_l2"], "max_abs": worst["max_abs"], "cosine": worst["cosine"],
                           "bound": bound, "quant_rel_l2_vs_fp": q},
            "batches": len(batches), "passed": True}


def fp16_bound(layers: int, fp32_rel_l2: float, end_to_end_bound=None, quantized_activations: bool = False) -> float:
    """The relative L2 a float16 graph may be from the float32 torch reference (see FP16_LAYER_FACTOR)."""
    bound = fp32_rel_l2 + FP16_LAYER_FACTOR * np.sqrt(max(layers, 1)) * FP16_UNIT_ROUNDOFF
    if quantized_activations and end_to_end_bound is not None:
        bound = max(bound, end_to_end_bound)
    return float(bound)


def validate_fp16(model: onnx.ModelProto, input_names: Sequence[str], batches: Sequence[tuple],
                  torch_outputs: Sequence[np.ndarray], fp32_outputs: Sequence[np.ndarray], layers: int,
                  end_to_end_bound=None, quantized_activations: bool = False) -> dict:
    """ONNX Runtime on the float16 graph ``model`` against the float32 torch reference
    ``torch_outputs`` on ``batches`` (float inputs rounded to the graph's input types);
    ``fp32_outputs``: the float32 graph's outputs on the same batches (its own distance from
    torch enters the bound). Raises ValidationError beyond the bound."""
    from graphs.runtime import input_specs
    types = {name: dt for name, dt, _ in input_specs(model)}
    try:
        session = ort_session(model)
    except Exception as e:  # onnxruntime's own exception types
        raise ValidationError(f"ONNX Runtime cannot load the float16 graph ({str(e).splitlines()[0][:300]}); "
                              "export with --dtype fp32 and please report it") from None
    worst = None
    for inputs, ref, fp32 in zip(batches, torch_outputs, fp32_outputs):
        out = session.run(None, {n: t.numpy().astype(types.get(n, t.numpy().dtype), copy=False)
                                 for n, t in zip(input_names, inputs)})[0]
        if out.shape != ref.shape:
            raise ValidationError(f"float16 graph output shape {out.shape} differs from torch {ref.shape}")
        a = agreement(ref, out)
        a["output_dtype"] = str(out.dtype)
        a["vs_fp32_graph_rel_l2"] = agreement(fp32, out)["rel_l2"]
        a["fp32_graph_rel_l2"] = agreement(ref, fp32)["rel_l2"]
        if worst is None or not a["rel_l2"] <= worst["rel_l2"]:
            worst = a
    bound = fp16_bound(layers, max(agreement(r, f)["rel_l2"] for r, f in zip(torch_outputs, fp32_outputs)),
                       end_to_end_bound, quantized_activations)
    if not worst["rel_l2"] <= bound:
        raise ValidationError(f"the float16 graph disagrees with torch: relative L2 {worst['rel_l2']:.3g} > {bound:.3g} "
                              f"(the float32 graph: {worst['fp32_graph_rel_l2']:.3g}); export with --dtype fp32 "
                              "and please report it with the recipe used")
    return {**worst, "bound": bound, "reference": "the quantized torch model in float32",
            "unit_roundoff": FP16_UNIT_ROUNDOFF, "layer_factor": FP16_LAYER_FACTOR, "layers": layers,
            "batches": len(batches), "passed": True}
