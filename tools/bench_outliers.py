"""What activation groups (-ag) and online rotation (-had) cost in ONNX Runtime, side by side.

    python tools/bench_outliers.py [--main 4] [--tokens 1024] [--layers 3] [--rounds 15] [--write-docs]

A stack of PixArt-Sigma-shaped layers (hidden 1152, MLP 4608; attention 1152->1152, fc1
1152->4608, fc2 4608->1152, chained), random INT4 codes written by graphs.qdq as the export path
writes them, fused by the default passes and legalized for ONNX Runtime: the recipe
w4a<main>-g64-r32-w8a8, the same with -ag64, and with -ag64 -had64 (and -had64 alone).
Configs run interleaved, each round every config once; the table gives medians and the median of
the paired per-round ratios to the plain recipe (drifts in machine load cancel). ONNX Runtime
CPU, accuracy level 4 (its default).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

from docs_section import publish  # noqa: E402
from graphs.passes import DEFAULT_PASSES, apply_passes  # noqa: E402
from graphs.runtime import ort_session  # noqa: E402
from graphs.synthetic import chain_model, layer_spec  # noqa: E402
from graphs.targets import legalize  # noqa: E402

PIXART = [(1152, 1152), (1152, 4608), (4608, 1152)]


def build(args) -> dict:
    shapes = [PIXART[i % 3] for i in range(args.layers)]

    def model(act_group=None, rotation=None):
        specs = [layer_spec(k, n, 32, main_act=args.main, branch="w8a8", act_group=act_group, rotation=rotation, seed=i)
                 for i, (k, n) in enumerate(shapes)]
        return legalize(apply_passes(chain_model(specs), DEFAULT_PASSES), "ort")

    base = f"w4a{args.main}-g64-r32-w8a8"
    return {base: model(), f"{base} -ag64": model(64), f"{base} -had64": model(None, 64),
            f"{base} -ag64 -had64": model(64, 64)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--main", type=int, default=4, choices=[4, 8], help="main-path activation bits")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true", help="also write the result into docs/benchmarks.md")
    args = p.parse_args(argv)
    import onnxruntime as ort
    models = build(args)
    sessions = {k: ort_session(m, accuracy_level=4, threads=args.threads, spinning=False) for k, m in models.items()}
    x = np.random.default_rng(0).standard_normal((1, args.tokens, PIXART[0][0])).astype(np.float32)
    for s in sessions.values():
        s.run(None, {"x": x})
    keys, times = list(sessions), {k: [] for k in sessions}
    t0 = time.time()
    for rnd in range(args.rounds):
        for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            t = time.perf_counter()
            sessions[k].run(None, {"x": x})
            times[k].append(time.perf_counter() - t)
    base = np.asarray(times[keys[0]])
    rows = [f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, accuracy_level 4; {args.layers} PixArt-shaped "
            f"layers, {args.tokens} tokens; median of {args.rounds} interleaved rounds; {time.time() - t0:.0f} s", "",
            "| recipe | median ms | vs the plain recipe |", "|---|---:|---:|"]
    for k, v in times.items():
        v = np.asarray(v)
        rows.append(f"| {k} | {np.median(v) * 1e3:.1f} | {np.median(v / base):.3f} |")
    publish("\n".join(rows), f"bench_outliers-w4a{args.main}" if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
