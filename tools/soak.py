"""Soak: quantize and export a preset repeatedly, with different recipes, in ONE process, and
check that memory stays flat (nothing a run allocates outlives it).

    python tools/soak.py                          # pixart-sigma --num-layers 2, 4 rounds
    python tools/soak.py --rounds 8 --no-quality  # quicker rounds

Each round runs ``loraq quantize`` (``run_quantize``) and then ``loraq export`` of the written
checkpoint (``run_export``, which also rebuilds the FP original to compare against), through the
same pipeline functions as the CLI. Printed per round: seconds, the process's peak RSS so far
(``ru_maxrss``, monotone), and the current RSS after ``gc.collect()`` and after ``malloc_trim``
(what the process still holds). Verdict: flat when the retained RSS of every round after the
first stays within ``--tolerance-mb`` of the first round's.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ["w4a16-g64-r32-w8a8", "w4a8-g128-r16-w6a6", "w4a4-g64-r32-w4a8", "w4a16-g64-r64-fp16"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def retained_mb() -> tuple[float, float]:
    """(RSS after gc, RSS after gc + malloc_trim): the second drops freed heap glibc kept."""
    gc.collect()
    after_gc = rss_mb()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return after_gc, rss_mb()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pixart-sigma")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="cycled over the rounds")
    ap.add_argument("--method", default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-quality", action="store_true", help="skip the end-to-end quality (sampling) stage")
    ap.add_argument("--tolerance-mb", type=float, default=100.0)
    args = ap.parse_args(argv)

    from loraq_export.commands.export import run_export
    from loraq_export.options import Options
    from loraq_export.commands.quantize import run_quantize

    rows = []
    base = retained_mb()
    print(f"soak: {args.model} --num-layers {args.num_layers}, {args.rounds} rounds, "
          f"RSS before: {base[0]:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory(prefix="loraq-soak-") as tmp:
        for i in range(args.rounds):
            recipe = args.recipes[i % len(args.recipes)]
            ckpt, out = Path(tmp) / f"ckpt{i}", Path(tmp) / f"out{i}"
            t = time.perf_counter()
            run_quantize(Options(model=args.model, num_layers=args.num_layers, recipe=recipe, method=args.method,
                                 out=ckpt, workers=args.workers, progress=False), echo=lambda s: None)
            report = run_export(Options(model=str(ckpt), out=out, workers=args.workers, progress=False,
                                        quality=not args.no_quality), echo=lambda s: None)
            seconds = time.perf_counter() - t
            assert report["validation"]["passed"]
            shutil.rmtree(ckpt)
            shutil.rmtree(out)
            del report
            after_gc, after_trim = retained_mb()
            rows.append((i + 1, recipe, seconds, peak_mb(), after_gc, after_trim))
            print(f"  round {i + 1} done: {seconds:.1f} s, peak {rows[-1][3]:.0f} MB, "
                  f"retained {after_gc:.0f} / {after_trim:.0f} MB", flush=True)

    print()
    print("| round | recipe | seconds | peak RSS MB (ru_maxrss) | RSS after gc MB | RSS after gc+malloc_trim MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0f} |")
    first = rows[0][5]
    growth = max(r[5] for r in rows[1:]) - first if len(rows) > 1 else 0.0
    flat = growth <= args.tolerance_mb
    peak_growth = rows[-1][3] - rows[0][3]
    print(f"\nverdict: {'FLAT' if flat else 'GROWING'}: retained RSS after round 1 {first:.0f} MB, "
          f"largest later {first + growth:.0f} MB ({growth:+.0f} MB, tolerance {args.tolerance_mb:.0f} MB); "
          f"peak RSS grew {peak_growth:+.0f} MB from round 1 to round {len(rows)}")
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
