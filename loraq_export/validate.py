"""ONNX Runtime validation against the torch reference. A mismatch is an error.

Two checks. Layer-wise (strict): every quantized layer's QDQ subgraph, fed the very input
that ONNX Runtime computed for it, must reproduce the torch reference of that layer. End to
end (informative, loosely bounded): in a network with quantized activations, a last-bit
difference in float summation order upstream can move a value across a rounding boundary,
and the changed code propagates (measured on MiniLM at W4A4: layers agree to 3e-7, outputs
differ by 0.4 relative L2, while the quantized model is 0.7 away from FP); so the end-to-end
disagreement is only required to stay below the quantization error itself.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import onnx
import torch

from loraq_export.errors import UserError

LAYER_TOLERANCE = 1e-3  # relative L2, per layer
# End to end: ONNX Runtime may be no further from torch than torch is from the FP model.
END_TO_END_FRACTION = 1.0


class ValidationError(UserError):
    pass


def ort_session(model: Union[str, onnx.ModelProto], accuracy_level: int = 0, threads: Optional[int] = None):
    """A CPU session. accuracy_level 0 makes MatMulNBits compute in float (the reference);
    ONNX Runtime's default, 4, quantizes activations to int8 inside the kernel (faster)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref = np.asarray(reference, np.float64).ravel()
    cand = np.asarray(candidate, np.float64).ravel()
    diff = cand - ref
    return {"max_abs": float(np.abs(diff).max(initial=0.0)),
            "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
            "cosine": float(ref @ cand / max(np.linalg.norm(ref) * np.linalg.norm(cand), 1e-30))}


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return out


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
    worst_layer = {"layer": None, "rel_l2": 0.0, "max_abs": 0.0}
    e2e = []
    for i, inputs in enumerate(batches):
        results = dict(zip(out_names, session.run(None, {n: t.numpy() for n, t in zip(input_names, inputs)})))
        for layer, (x_name, y_name) in layer_io.items():
            with torch.no_grad():
                ref = layer_fns[layer](torch.from_numpy(results[x_name])).numpy()
            a = agreement(ref, results[y_name])
            if not np.isfinite(a["rel_l2"]) or a["rel_l2"] > worst_layer["rel_l2"]:
                worst_layer = {"layer": layer, "rel_l2": a["rel_l2"], "max_abs": a["max_abs"]}
        with torch.no_grad():
            ref = wrapper(*inputs).float().numpy()
        out = results[out_names[0]]
        if out.shape != ref.shape:
            raise ValidationError(f"ONNX Runtime output shape {out.shape} differs from torch {ref.shape}")
        a = agreement(ref, out)
        a["quant_rel_l2"] = agreement(fp_outputs[i], ref)["rel_l2"] if fp_outputs is not None else None
        e2e.append(a)
    if not worst_layer["rel_l2"] <= layer_tolerance:
        raise ValidationError(f"ONNX Runtime disagrees with torch on layer {worst_layer['layer']}: relative L2 "
                              f"{worst_layer['rel_l2']:.3g} > {layer_tolerance:g}; the exported graph is wrong, "
                              "please report it with the recipe used")
    worst = max(e2e, key=lambda a: a["rel_l2"])
    q = worst["quant_rel_l2"]
    # without the FP outputs there is no scale for the end-to-end figure: it is reported only
    bound = None if q is None else max(LAYER_TOLERANCE, END_TO_END_FRACTION * min(a["quant_rel_l2"] for a in e2e))
    if bound is not None and not worst["rel_l2"] <= bound:
        raise ValidationError(f"ONNX Runtime output disagrees with torch end to end: relative L2 {worst['rel_l2']:.3g} "
                              f"> {bound:.3g} (layers agree to {worst_layer['rel_l2']:.2g}); please report it with the recipe used")
    return {"layers": len(layer_io), "worst_layer": worst_layer, "layer_tolerance": layer_tolerance,
            "end_to_end": {"rel_l2": worst["rel_l2"], "max_abs": worst["max_abs"], "cosine": worst["cosine"],
                           "bound": bound, "quant_rel_l2_vs_fp": q},
            "batches": len(batches), "passed": True}
