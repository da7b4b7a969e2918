"""What ``loraq bench`` writes: results.json, results.md (a table sorted by bits per weight) and
quality_vs_bits.png (end-to-end error against bits, one marker per method, the Pareto front),
plus the number this project lives by: LoRaQ's end-to-end error divided by the best peer's at
equal or fewer bits per weight."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from loraq_export.store.bench_pairs import RESULTS
from loraq_export.store.outputs import write_bytes_atomic, write_json_atomic

PEERS = ("hqq", "ort-rtn")  # what a user would otherwise pick: the ratio's denominator
HEADLINE_METHOD = "loraq"
OUR_METHODS = ("loraq", "gptq")  # the numerators of the ratio: this project's own data-free methods
BITS_SLACK = 1e-6  # "equal bits" survives float rounding of the stored figure


def sort_rows(rows: list[dict]) -> list[dict]:
    inf = float("inf")
    return sorted(rows, key=lambda r: (r["bits_per_weight"], r["e2e_error"] if r["e2e_error"] is not None else inf,
                                       r["method"], r["recipe"]))


def peer_ratios(rows: list[dict]) -> list[dict]:
    """For each row of our methods (loraq, gptq): its 1 - cosine over the best peer's with bits <= its bits."""
    out = []
    for r in rows:
        if r["method"] not in OUR_METHODS or r["e2e_error"] is None:
            continue
        # a peer as a user would run it: a peer row allocated by loraq's own --budget is loraq's work
        peers = [p for p in rows if p["method"] in PEERS and p["e2e_error"] is not None and "@" not in p["recipe"]
                 and p["bits_per_weight"] <= r["bits_per_weight"] + BITS_SLACK]
        best = min(peers, key=lambda p: p["e2e_error"], default=None)
        out.append({"method": r["method"], "recipe": r["recipe"], "bits_per_weight": r["bits_per_weight"], "e2e_error": r["e2e_error"],
                    "best_peer": None if best is None else {k: best[k] for k in ("method", "recipe", "bits_per_weight",
                                                                                 "e2e_error")},
                    "ratio": None if best is None or best["e2e_error"] <= 0 else r["e2e_error"] / best["e2e_error"]})
    return out


def ratio_lines(ratios: list[dict]) -> list[str]:
    lines = []
    for q in ratios:
        head = f"{q.get('method', HEADLINE_METHOD)} {q['recipe']} ({q['bits_per_weight']:.3f} b/w): 1-cos {q['e2e_error']:.4g}"
        b = q["best_peer"]
        if b is None:
            lines.append(f"{head}; no peer ({', '.join(PEERS)}) at <= {q['bits_per_weight']:.3f} b/w in this grid")
        else:
            lines.append(f"{head} vs best peer {b['method']} {b['recipe']} ({b['bits_per_weight']:.3f} b/w) "
                         f"{b['e2e_error']:.4g}: ratio {q['ratio']:.3f}")
    return lines


def _f(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _one_minus(v):
    return None if v is None else 1.0 - v


def _quality_columns(kind: Optional[str]) -> list[tuple[str, callable]]:
    if kind == "embeddings":
        return [("1 - cos (ORT)", lambda q: _f(_one_minus(q.get("onnx", {}).get("cos_mean")), ".4g")),
                ("cos mean / min (ORT)", lambda q: f"{_f(q.get('onnx', {}).get('cos_mean'), '.4f')} / "
                                                   f"{_f(q.get('onnx', {}).get('cos_min'), '.4f')}"),
                ("NN agree (ORT)", lambda q: _f(q.get("onnx", {}).get("nn_agreement"), ".0%")),
                ("cos mean (torch)", lambda q: _f(q.get("torch", {}).get("cos_mean"), ".4f"))]
    if kind == "latents":
        return [("1 - cos (ORT)", lambda q: _f(_one_minus(q.get("onnx", {}).get("cosine")), ".4g")),
                ("PSNR dB (ORT)", lambda q: _f(q.get("onnx", {}).get("psnr_db"), ".2f")),
                ("PSNR dB (torch)", lambda q: _f(q.get("torch", {}).get("psnr_db"), ".2f"))]
    return []


def markdown(results: dict) -> str:
    rows, kind = results["rows"], results.get("metric_kind")
    qcols = _quality_columns(kind)
    latency = any(r.get("latency") for r in rows)
    head = ["method", "recipe", "bits/weight", "weight err mean / max"] + [c for c, _ in qcols] + ["fit s (1 thread)"]
    head += ["ORT latency vs FP"] if latency else []
    lines = [f"# loraq bench: {results['model']['name']}", "",
             f"Command: `{results['command']}`", "",
             f"End-to-end metric: {results.get('metric') or 'none for this model kind'}. Bits per weight count every "
             "stored bit of the quantized layers (codes, fp32 scales, zero points, branch factors with their scales).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["weight_error"] or {}
        cells = [r["method"], r["recipe"], f"{r['bits_per_weight']:.3f}", f"{_f(e.get('mean'), '.4f')} / {_f(e.get('max'), '.4f')}"]
        cells += [fn(r["quality"] or {}) for _, fn in qcols]
        cells.append(f"{r['timings_s'].get('fit', 0):.2f}")
        if latency:
            lat = r.get("latency")
            cells.append(f"{lat['ratio']:.2f}x ({lat['quantized_ms']:.3g} vs {lat['fp_ms']:.3g} ms)" if lat else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Fit s: seconds of fitting, single-threaded, summed over the layers (ort-rtn: ONNX Runtime's quantizer "
              "on the whole graph). ort-rtn's weight error: its MatMulNBits weights dequantized back and compared "
              "with the FP weights.",
              "", f"## {' and '.join(OUR_METHODS)} / best peer ({', '.join(PEERS)}) at equal or fewer bits per weight (1 - cos, lower is better)", ""]
    lines += [f"- {s}" for s in ratio_lines(results["ratios"])] or [f"- no {' or '.join(OUR_METHODS)} row in this grid"]
    v, m = results["versions"], results["machine"]
    lines += ["", f"Versions: loraq {v['loraq']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}. "
                  f"Machine: {m['cpu']}, {m['cores']} cores.", ""]
    return "\n".join(lines)


MARKERS = "osD^vP*Xh<>p"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits (fewer or equal) and error (lower)."""
    front, best = [], float("inf")
    for b, e in sorted(points):
        if e < best:
            front.append((b, e))
            best = e
    return front


def plot_png(results: dict) -> Optional[bytes]:
    """quality_vs_bits.png as bytes (None when no row has an end-to-end error)."""
    rows = [r for r in results["rows"] if r["e2e_error"] is not None and r["e2e_error"] > 0]
    if not rows:
        return None
    import logging
    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache notice is not the user's business
    import matplotlib.pyplot as plt
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != HEADLINE_METHOD, m not in PEERS, m))
    fig, ax = plt.subplots(figsize=(9.0, 5.0), dpi=110)
    front = pareto([(r["bits_per_weight"], r["e2e_error"]) for r in rows])
    fb, fe = zip(*front)
    ax.step(fb + (max(r["bits_per_weight"] for r in rows),), fe + (fe[-1],), where="post", color="0.6", lw=1.2,
            ls="--", zorder=1, label="Pareto front")
    for i, m in enumerate(methods):
        pts = [(r["bits_per_weight"], r["e2e_error"]) for r in rows if r["method"] == m]
        ax.scatter(*zip(*pts), marker=MARKERS[i % len(MARKERS)], s=70 if m == HEADLINE_METHOD else 45,
                   zorder=4 if m == HEADLINE_METHOD else 3,
                   edgecolors="black" if m == HEADLINE_METHOD else "none", linewidths=0.8, label=m)
    for i, (b, e) in enumerate(front):  # the recipes worth knowing by name, above and below the front in turn
        r = next(r for r in rows if r["bits_per_weight"] == b and r["e2e_error"] == e)
        ax.annotate(f"{r['method']} {r['recipe']}", (b, e), xytext=(-6, -12) if i % 2 else (6, 5),
                    textcoords="offset points", fontsize=6.5, color="0.2", ha="right" if i % 2 else "left")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (every stored bit of the quantized layers)")
    ax.set_ylabel("1 - cosine vs FP (ONNX Runtime; lower is better)")
    ax.set_title(f"{results['model']['name']}: {results.get('metric') or ''}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: no point hidden
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def metric_name(name, opts):
    """The metric's description, naming the user's sentence file when one replaced the bundled ones."""
    sentences = getattr(opts, "sentences", None)
    if name is None or sentences is None:
        return name
    return name.replace("bundled sentences", f"the sentences of {Path(sentences).name}")


def write_results(opts, loaded, rows: list[dict], echo=print) -> dict:
    """results.json, results.md and quality_vs_bits.png, each written atomically, from ``rows``."""
    from loraq_export.commands.bench import versions_and_machine
    from loraq_export.evaluate.end_to_end import METRIC_NAMES, build_reference_kind
    versions, machine = versions_and_machine()
    kind = build_reference_kind(loaded)
    rows = sort_rows(rows)
    results = {"command": opts.command, "model": {"name": loaded.name, "kind": loaded.kind, "argument": opts.model or "minilm",
                                                  "num_layers": opts.num_layers},
               "seed": opts.seed, "metric_kind": kind, "metric": metric_name(METRIC_NAMES.get(kind), opts),
               "versions": versions,
               "machine": machine, "rows": rows, "ratios": peer_ratios(rows)}
    out = Path(opts.out)
    json_name, md_name, png_name = RESULTS
    write_json_atomic(out / json_name, results)
    write_bytes_atomic(out / md_name, markdown(results).encode())
    png = plot_png(results)
    if png is not None:
        write_bytes_atomic(out / png_name, png)
    echo(markdown(results))
    echo(f"loraq bench: {len(rows)} pairs -> {out / json_name}, {out / md_name}" + (f", {out / png_name}" if png else ""))
    return results
