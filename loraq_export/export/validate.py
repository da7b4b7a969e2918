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

from typing import Sequence

import numpy as np
import onnx
import torch

from graphs.runtime import ort_session, with_outputs
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
                  layer_tolerance: float = LAYER_TOLERANCE) -> dict:
    """Compare ONNX Runtime with torch; raise ValidationError on a mismatch.

    ``layer_io``: layer -> (input name, output name) in the graph; ``layer_fns``: layer -> the
    torch reference of that layer; ``fp_outputs``: the FP model's outputs on ``batches``
    (bounds the end-to-end check; without them the end-to-end figure is reported, not bounded).
    """
    names = [t for io in layer_io.values() for t in io]
    session = ort_session(with_outputs(model, names))
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
