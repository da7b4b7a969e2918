"""What the report says and how the terminal summary reads."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from graphs.constants import OPSET
from loraq_export import __version__
from loraq_export.fit.plan import LayerPlan
from loraq_export.fit.recipes import Recipe
from loraq_export.models import LoadedModel


def layer_table(plans: list[LayerPlan], records: dict) -> list[dict]:
    rows = []
    for p in plans:
        row = p.to_dict()
        rec = records.get(p.name)
        if rec is not None:
            row.update(method=rec.method, rel_error=round(rec.stats["rel_error"], 6),
                       seconds=round(rec.stats["seconds"], 3) if "seconds" in rec.stats else None,
                       bits_per_weight=round(rec.bits_per_weight(), 4),
                       group=rec.weight.fmt.group_size,
                       branch=None if rec.branch is None else f"r{rec.branch.rank} {rec.branch.fmt.name}",
                       bias_shift=rec.bias_shift is not None,
                       rotation=rotation_status(rec),
                       rotation_block=None if rec.rotation is None else rec.rotation.block)
        rows.append(row)
    return rows


def rotation_status(rec) -> str:
    """'off', 'online (block B)', or 'folded into <producer> (block B)': how the layer's input
    rotation runs in the exported graph."""
    r = rec.rotation
    if r is None:
        return "off"
    perm = ", permuted" if r.perm is not None else ""
    return f"folded into {r.folded} (block {r.block}{perm})" if r.folded else f"online (block {r.block}{perm})"


def size_summary(loaded: LoadedModel, records: dict) -> dict:
    """Bits per weight counting every stored bit of the quantized layers (codes, scales, zero
    points, branch factors and their scales; biases excluded, kept in fp32)."""
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


ALLOCATION_FILE = "allocation.yaml"


def build_report(loaded, recipe: Recipe, plans, records, times: dict, seed: int, stage: Path,
                 validation=None, quality=None, sampling=None, allocation=None) -> dict:
    sizes = size_summary(loaded, records)
    for f in ("model.onnx", "model_fp.onnx", "model.safetensors"):
        p = stage / f
        if p.exists():
            data = p.with_name(p.name + ".data")
            sizes[f"{f}_bytes"] = p.stat().st_size + (data.stat().st_size if data.exists() else 0)
    source = {k: v for k, v in loaded.source.items() if isinstance(v, (str, int, float, bool, type(None)))}
    report = {"loraq_version": __version__, "model": {"name": loaded.name, "kind": loaded.kind, **source},
              "recipe": recipe.to_dict(), "method": recipe.method, "seed": seed,
              "summary": {"quantized_layers": sum(p.quantize for p in plans),
                          "skipped_layers": sum(not p.quantize for p in plans), **summarize_errors(records)},
              "sizes": sizes, "timings_s": {**times, "total": round(sum(times.values()), 3)},
              "validation": validation, "quality": quality, "sampling": sampling,
              "layers": layer_table(plans, records)}
    if allocation is not None:
        report["allocation"] = {**allocation, "file": ALLOCATION_FILE}
    if validation is not None:
        report["onnx"] = {"opset": OPSET, "inputs": loaded.input_names, "outputs": loaded.output_names,
                          "ort_accuracy_level_for_validation": 0}
    return report


def format_summary(report: dict, out: Path) -> str:
    s, z, v, t = report["summary"], report["sizes"], report["validation"], report["timings_s"]
    lines = [
        f"loraq: {report['model']['name']} | recipe {report['recipe']['recipe']} | method {report['method']}",
        f"  layers: {s['quantized_layers']} quantized, {s['skipped_layers']} kept in high precision (see report.json)",
        f"  weight error (relative): mean {s.get('mean_rel_error', float('nan')):.4f}, max {s.get('max_rel_error', float('nan')):.4f}",
        f"  size: {z['quantized_bits_per_weight']:.3f} bits/weight in quantized layers, "
        f"{z['quantized_layers_bytes'] / 2**20:.2f} MiB vs {z['quantized_layers_bytes_fp32'] / 2**20:.2f} MiB fp32",
    ]
    a = report.get("allocation")
    if a:
        counts = Counter(a["layers"].values())
        common = ", ".join(f"{n} x {r}" for r, n in counts.most_common(3))
        lines.append(f"  allocation: --budget {a['budget']:g} -> {a['bits_per_weight']:.4f} bits/weight, "
                     f"{len(counts)} distinct layer recipes ({common}{', ...' if len(counts) > 3 else ''}); "
                     f"{a['file']}")
    rot = [l for l in report["layers"] if l.get("rotation", "off") != "off"]
    if rot:
        folded = sum(l["rotation"].startswith("folded") for l in rot)
        # a -had<B> block is lowered on layers whose width B does not divide: say on how many
        blocks = Counter(l.get("rotation_block") for l in rot)
        by_block = ", ".join(f"{n} x {b}" for b, n in sorted(blocks.items(), key=lambda x: -(x[0] or 0)))
        lines.append(f"  rotation: {len(rot) - folded} layer(s) rotated online, {folded} folded into their producer "
                     f"(blocks: {by_block})")
    if v is not None:
        lines.append(f"  ONNX Runtime vs torch: layers agree to {v['worst_layer']['rel_l2']:.1e} (rel L2; "
                     f"{v['worst_layer']['disagreeing']:.2%} of elements off), "
                     f"output to {v['end_to_end']['rel_l2']:.1e} (cosine {v['end_to_end']['cosine']:.6f})")
    g = report.get("graph")
    if g:
        fv = g["final_vs_validated_graph"]
        line = (f"  graph: {'fused' if len(g['passes']) > 1 else 'unfused'}, legalized for {g['target']}; "
                f"final vs validated graph rel L2 {fv['rel_l2']:.1e}")
        cal = (g.get("tensorrt") or {}).get("calibration")
        if cal:
            line += f" (static INT8 activation scales from {cal['batches']} synthetic calibration batches)"
        lines.append(line)
    h = (v or {}).get("fp16")
    if h:
        lines.append(f"  float16 graph vs torch (float32): rel L2 {h['rel_l2']:.1e} (bound {h['bound']:.1e}), "
                     f"cosine {h['cosine']:.6f}")
    f32 = (g or {}).get("float32_regions") or {}
    if f32.get("model"):
        lines.append(f"  float16 graph keeps {sum(f32['ops'].values())} nodes in float32: " + "; ".join(f32["model"].values()))
    q = report.get("quality")
    if q and "torch" in q:
        lines.append(f"  quality: {q['metric']}: torch {q['torch']['mean']:.4f}"
                     + (f", ONNX {q['onnx']['mean']:.4f}" if "onnx" in q else "") + f" over {q['sentences']} sentences")
    sm = report.get("sampling")
    if sm:
        pairs = dict(sm["vs_fp"]) or {"ONNX vs torch (quantized)": sm["onnx_vs_torch_quantized"]}
        lines.append(f"  {sm['steps']}-step {sm['scheduler']} sampling, latents vs FP: " + "; ".join(
            f"{k} PSNR {m['psnr_db']:.1f} dB, cosine {m['cosine']:.4f}" for k, m in pairs.items()))
    lines += lora_lines(report)
    lines.append(f"  time: {t['total']:.1f} s (fit {t.get('fit', 0):.1f} s) -> {out}")
    return "\n".join(lines)


def lora_lines(report: dict) -> list[str]:
    lo = report.get("lora")
    if not lo:
        return []
    lines = []
    if "slot" in lo:
        s = lo["slot"]
        lines.append(f"  LoRA slots: rank {s['rank']} fp16 beside {s['layers']} quantized layers (fill with loraq lora set)")
    ck = lo.get("checkpoint")
    if ck:
        lines.append(f"  LoRA from the checkpoint: {_adapter_names(ck['adapters'])}"
                     + ("" if ck["in_fp_reference"] else " (files gone: the FP reference lacks them)"))
    if lo.get("adapters"):
        lines.append(f"  LoRA: {_adapter_names(lo['adapters'])}; {len(lo['quantized_layers'])} quantized layers gain a "
                     f"{lo['storage_format']} adapter term ({lo['adapter_bytes'] / 2**10:.1f} KiB), "
                     f"{len(lo['merged_in_float'])} merged in float")
    return lines


def _adapter_names(adapters: list) -> str:
    return ", ".join(f"{Path(a['file']).name} x{a['scale']:g} (r{'/'.join(map(str, a['ranks']))})" for a in adapters)
