"""Held-out quality and ONNX Runtime latency of finished MiniLM exports, side by side with FP32.

    python tools/bench_exports.py DIR [DIR ...] --sentences FILE [--batch 8] [--seq 128]
                                  [--rounds 15] [--ort-int8]

Each DIR is a ``loraq export`` output (model.onnx, report.json). For each it gives the bits per
weight from its report, the end-to-end error 1 - cosine of mean-pooled embeddings against the
FP torch model on FILE (one sentence per line) with MatMulNBits at accuracy level 0 (float
accumulation, what the export validates) and at level 4 (ONNX Runtime's default: activations
quantized to int8 per block inside the kernel), and the latency ratio to the FP32 ONNX model at
both levels. Latency: one feed of ``batch`` sentences padded to ``seq`` tokens; every model,
FP32 included, runs once per round, the order reversed every other round; the ratio is the median
over rounds of (model / FP32 in the same round), so load from other processes cancels.
``--ort-rtn`` adds ONNX Runtime's own 4-bit quantizer (``MatMulNBitsQuantizer``, group 64,
asymmetric: 4.5625 bits) on the same FP32 graph and layers (its MatMulNBits nodes carry the
accuracy level as an attribute, set to each level in turn). ``--ort-int8`` adds ONNX Runtime's dynamic INT8 quantizer (``quantize_dynamic``: MatMulInteger
with DynamicQuantizeLinear, 8-bit weights per tensor) on the same FP32 graph, as a reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]

from graphs.runtime import ort_session  # noqa: E402
from loraq_export.commands.bench import read_sentences  # noqa: E402
from loraq_export.evaluate.end_to_end import embedding_metrics  # noqa: E402
from loraq_export.evaluate.latency import interleaved, run_seconds  # noqa: E402
from loraq_export.evaluate.quality import embeddings, onnx_runner, sentence_batches  # noqa: E402
from loraq_export.export.onnx_export import export_graph, save_onnx  # noqa: E402
from loraq_export.fit.parallel import default_workers  # noqa: E402
from loraq_export.models import load_model  # noqa: E402

LEVELS = (0, 4)


def latency_feed(loaded, texts: list[str], batch: int, seq: int) -> dict:
    enc = loaded.source["tokenizer"](texts[:batch], padding="max_length", truncation=True, max_length=seq,
                                     return_tensors="np")
    return {n: enc[n] for n in loaded.input_names}


def ort_int8(fp_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp_path), str(out), weight_type=QuantType.QInt8)
    return out


def ort_rtn(loaded, fp_path: Path, tmp: Path) -> dict:
    """{level: path} of ONNX Runtime's 4-bit quantizer (g64, asymmetric) on the layers loraq selects."""
    import onnx
    from calibless.formats import WeightFormat
    from loraq_export.evaluate.latency import with_accuracy_level
    from loraq_export.evaluate.peers import matmul_layers, ort_quantize
    from loraq_export.fit.plan import plan_layers
    from loraq_export.fit.recipes import load_recipe
    mods = dict(loaded.module.named_modules())
    plans = plan_layers(loaded.module, load_recipe("w4a16-g64-asym", "rtn"), loaded.select, loaded.name)
    weights = {p.name: mods[p.name].weight.detach().float().T.contiguous().numpy() for p in plans if p.quantize}
    fp = onnx.load(str(fp_path))
    model, _ = ort_quantize(fp, matmul_layers(fp, weights), WeightFormat(4, False, 64))
    out = {}
    for level in LEVELS:
        out[level] = tmp / f"ort_rtn_{level}.onnx"
        onnx.save(with_accuracy_level(model, level), str(out[level]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="loraq export output directories")
    ap.add_argument("--sentences", type=Path, required=True, help="held-out sentences, one per line")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ort-int8", action="store_true", help="add ONNX Runtime's dynamic INT8 quantizer")
    ap.add_argument("--ort-rtn", action="store_true", help="add ONNX Runtime's 4-bit quantizer (g64, asymmetric)")
    args = ap.parse_args(argv)
    texts = read_sentences(args.sentences)
    loaded = load_model("minilm", None, 0)
    batches = sentence_batches(loaded, texts=texts)
    fp_emb = embeddings(loaded.wrapper, batches)
    threads = default_workers()
    with tempfile.TemporaryDirectory(prefix="bench-exports-") as tmp:
        fp_path = Path(tmp) / "model_fp.onnx"
        save_onnx(export_graph(loaded, loaded.make_inputs(seed=0, batch=2))[0], fp_path)
        models = []  # (label, path or {level: path}, bits)
        for d in args.dirs:
            rep = json.loads((d / "report.json").read_text())
            label = f"{rep['method']} {rep['recipe']['recipe']}"
            if rep.get("allocation"):
                label += f" --budget {rep['allocation']['budget']:g}"
            models.append((label, d / "model.onnx", rep["sizes"]["quantized_bits_per_weight"]))
        labels = [m[0] for m in models]  # two exports of one recipe (before / after a change): name each by its folder
        models = [(f"{lb} ({p.parent})" if labels.count(lb) > 1 else lb, p, b) for (lb, p, b) in models]
        if args.ort_rtn:
            models.append(("ort-rtn w4a16-g64-asym (MatMulNBitsQuantizer)", ort_rtn(loaded, fp_path, Path(tmp)), 4.5625))
        if args.ort_int8:
            models.append(("ort quantize_dynamic int8", ort_int8(fp_path, Path(tmp) / "int8.onnx"), 8.0))
        feed = latency_feed(loaded, texts, args.batch, args.seq)
        sessions = {("fp32", 0): ort_session(str(fp_path), accuracy_level=0, threads=threads, spinning=False)}
        quality = {}
        for label, path, _ in models:
            for level in LEVELS:
                s = ort_session(str(path[level] if isinstance(path, dict) else path), accuracy_level=level,
                                threads=threads, spinning=False)
                sessions[(label, level)] = s
                m = embedding_metrics(fp_emb, embeddings(onnx_runner(s, loaded.input_names), batches))
                quality[(label, level)] = 1.0 - m["cos_mean"]
                print(f"{label} level {level}: 1-cos {quality[(label, level)]:.5f}", flush=True)
        keys = list(sessions)
        times = interleaved([lambda s=sessions[k]: run_seconds(s, feed) for k in keys], args.rounds)
        fp_t = times[0]
        med = {k: 1e3 * statistics.median(t) for k, t in zip(keys, times)}
        ratio = {k: statistics.median(a / b for a, b in zip(t, fp_t)) for k, t in zip(keys, times)}
    print(f"\nMiniLM, {len(texts)} sentences from {args.sentences.name}; latency: batch {args.batch} x {args.seq} "
          f"tokens, {threads} threads, {args.rounds} interleaved rounds, FP32 median {med[('fp32', 0)]:.1f} ms; "
          "ratio = median over rounds of (model / FP32 in the same round)\n")
    print("| model | bits/weight | 1 - cos, level 0 | 1 - cos, level 4 | latency / FP32, level 0 | latency / FP32, level 4 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, _, bits in models:
        print(f"| {label} | {bits:.3f} | {quality[(label, 0)]:.4f} | {quality[(label, 4)]:.4f} | "
              f"{ratio[(label, 0)]:.2f} | {ratio[(label, 4)]:.2f} |")


if __name__ == "__main__":
    main()
