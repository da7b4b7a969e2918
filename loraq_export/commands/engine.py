"""``loraq engine build | compare | bench``: a TensorRT engine from an exported model.onnx, checked
against ONNX Runtime and timed, plus an ONNX Runtime latency bench that needs no GPU.

    loraq engine build model.onnx [--out model.plan] [--shapes DIM=MIN:OPT:MAX ...] [--dry-run]
    loraq engine compare model.onnx [model.plan] [--bound REL_L2]
    loraq engine bench model.onnx|model.plan [--baseline model_fp.onnx] [--backend ort|tensorrt]
    loraq engine build model.onnx --refittable; loraq engine refit model.plan lora.safetensors [--scale S]

Shapes and the trtexec lines: loraq_export/engine/shapes.py; TensorRT: loraq_export/engine/trt.py
(imported lazily: without TensorRT, build / compare / bench --backend tensorrt exit 2 with one
line and write nothing; build --dry-run and bench --backend ort need none).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from loraq_export.engine.shapes import Profile, derive_profile, feeds_at, parse_shapes, trtexec_build_command, \
    trtexec_timing_command
from loraq_export.errors import UserError

# TensorRT (fp16 math) against ONNX Runtime (the graph's own type, fp32 on CPU) must agree at
# least as well as ONNX Runtime agreed with the torch reference at export time (the report's
# validation.end_to_end.rel_l2), and never needs to beat fp16 itself: unit roundoff 2^-11 ~ 4.9e-4
# per operation, a few 1e-3 relative after a transformer's dozens of accumulated GEMMs.
FP16_REL_L2 = 5e-3


def add_engine_parser(sub) -> None:
    """Register ``engine`` and its subcommands on the CLI's subparsers object."""
    eng = sub.add_parser("engine", help="TensorRT engine: build, compare with ONNX Runtime, bench (ORT bench: no GPU)")
    es = eng.add_subparsers(dest="engine_command", required=True, parser_class=type(eng))
    shapes = dict(nargs="+", default=None, metavar="DIM=MIN:OPT:MAX",
                  help="profile range of a dynamic dim (or DIM=N), overriding the model's default")
    b = es.add_parser("build", help="build a strongly typed TensorRT engine (Polygraphy) and print the trtexec line")
    b.add_argument("onnx_file", type=Path)
    b.add_argument("--out", type=Path, default=None, help="engine file (default: MODEL.plan beside the ONNX)")
    b.add_argument("--shapes", **shapes)
    b.add_argument("--timing-cache", type=Path, default=None, help="default: timing.cache beside the engine")
    b.add_argument("--overwrite", action="store_true", help="replace an existing engine file")
    b.add_argument("--dry-run", action="store_true", help="print the profile and trtexec line only (no TensorRT)")
    b.add_argument("--refittable", action="store_true",
                   help="build with REFIT, so that loraq engine refit can write LoRA adapters into its slots")
    b.set_defaults(func=cmd_build)
    r = es.add_parser("refit", help="write LoRA adapters into a refittable engine's slots (export --lora-slot RANK)")
    r.add_argument("engine", type=Path, help="an engine built with loraq engine build --refittable")
    r.add_argument("lora_files", type=Path, nargs="+", metavar="FILE", help="LoRA adapter file(s)")
    r.add_argument("--scale", type=float, action="append", default=None, metavar="S",
                   help="scale of each FILE, in order (default 1)")
    r.add_argument("--onnx", type=Path, default=None, help="the slot graph it was built from (default: ENGINE.onnx)")
    r.add_argument("--out", type=Path, default=None, help="the refitted engine (default: replace ENGINE)")
    r.set_defaults(func=cmd_refit)
    c = es.add_parser("compare", help="TensorRT vs ONNX Runtime on the same inputs; exit 0 pass, 1 fail")
    c.add_argument("onnx_file", type=Path)
    c.add_argument("engine", type=Path, nargs="?", default=None, help="a built engine (default: build one in memory)")
    c.add_argument("--shapes", **shapes)
    c.add_argument("--bound", type=float, default=None,
                   help="largest relative L2 error per output (default: from report.json beside the ONNX)")
    c.set_defaults(func=cmd_compare)
    n = es.add_parser("bench", help="latency median and percentiles, interleaved with a baseline, as a ratio")
    n.add_argument("model", type=Path, help="an ONNX file, or a TensorRT engine (.plan) with --backend tensorrt")
    n.add_argument("--baseline", type=Path, default=None, help="timed in the same run, e.g. model_fp.onnx")
    n.add_argument("--backend", choices=["ort", "tensorrt"], default="ort",
                   help="ort: ONNX Runtime on the CPU (default); tensorrt: GPU compute time by CUDA events")
    n.add_argument("--shapes", **shapes)
    n.add_argument("--rounds", type=int, default=50, help="timed rounds (default 50)")
    n.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    n.set_defaults(func=cmd_bench)


def _onnx(path: Path, what: str = "ONNX file") -> onnx.ModelProto:
    from loraq_export.inputs import readable
    path = readable(path, what, "pass the model.onnx written by loraq export")
    if path.is_dir() or path.suffix == ".plan":
        raise UserError(f"{path} is not an ONNX file; pass a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)  # the graph is all the shapes need
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); pass a .onnx file") from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes); pass a .onnx file")
    return model


def _profile(path: Path, args) -> tuple[onnx.ModelProto, Profile]:
    model = _onnx(path)
    return model, derive_profile(model, parse_shapes(args.shapes))


def cmd_build(args) -> int:
    from loraq_export.store.outputs import write_bytes_atomic
    _, profile = _profile(args.onnx_file, args)
    out = args.out or args.onnx_file.with_suffix(".plan")
    cache = args.timing_cache or out.parent / "timing.cache"
    if not args.dry_run:
        from loraq_export.engine.trt import require_tensorrt
        require_tensorrt()  # before any output: without TensorRT, one line and nothing written
    for name, (lo, opt, hi) in profile.shapes.items():
        print(f"profile {name}: min {list(lo)} opt {list(opt)} max {list(hi)}")
    print(f"equivalent: {trtexec_build_command(args.onnx_file, out, profile, cache)}")
    if args.dry_run:
        return 0
    from loraq_export.engine.trt import build_engine_bytes
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or --out to write elsewhere")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist; create it or pass another --out")
    write_bytes_atomic(out, build_engine_bytes(args.onnx_file, profile, cache, refittable=args.refittable))
    print(f"engine: {out} (timing cache {cache}); time it with: {trtexec_timing_command(out, profile)}")
    return 0


def cmd_refit(args) -> int:
    """LoRA slot values (loraq_export/runtime/lora_session.py) into a refittable engine, atomically."""
    import time
    from loraq_export.engine.trt import refit_engine_bytes, require_tensorrt
    from loraq_export.inputs import readable
    from loraq_export.runtime.lora_session import graph_slots, slot_values
    from loraq_export.store.outputs import write_bytes_atomic
    require_tensorrt()  # before any output: without TensorRT, one line and nothing written
    t0 = time.perf_counter()
    plan = readable(args.engine, "engine", "pass the .plan written by loraq engine build --refittable")
    src = args.onnx or plan.with_suffix(".onnx")
    model = _onnx(src, "slot graph")
    values, adapters = slot_values(graph_slots(model, src), args.lora_files, args.scale, str(src))
    out = args.out or plan
    write_bytes_atomic(out, refit_engine_bytes(plan.read_bytes(), values, str(plan)))
    print(f"engine: {out} refitted with {', '.join(Path(a.path).name for a in adapters)} "
          f"in {time.perf_counter() - t0:.2f} s")
    return 0


def export_bound(onnx_path: Path) -> float:
    """The compare bound from the export's report.json beside ``onnx_path`` (see FP16_REL_L2)."""
    rep = onnx_path.parent / "report.json"
    try:
        e2e = json.loads(rep.read_text())["validation"]["end_to_end"]
        return max(float(e2e["rel_l2"]), FP16_REL_L2)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"no export report with a validation figure at {rep}; pass --bound REL_L2") from None


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return {"rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
            "max_abs": float(np.abs(got - ref).max(initial=0.0))}


def cmd_compare(args) -> int:
    from loraq_export.engine.trt import require_tensorrt, run_both
    require_tensorrt()
    model, profile = _profile(args.onnx_file, args)
    bound = args.bound if args.bound is not None else export_bound(args.onnx_file)
    feeds = [feeds_at(model, profile.at(1), seed=0), feeds_at(model, profile.at(0), seed=1)]
    engine = args.engine if args.engine is not None else args.onnx_file
    trt_out, ort_out = run_both(args.onnx_file, engine, profile, feeds, Path(args.onnx_file).parent / "timing.cache")
    worst = 0.0
    for name, refs in ort_out.items():
        a = max((agreement(r, g) for r, g in zip(refs, trt_out[name])), key=lambda d: d["rel_l2"])
        worst = max(worst, a["rel_l2"])
        print(f"{name}: rel L2 {a['rel_l2']:.3e}, max abs {a['max_abs']:.3e} (bound {bound:.3e})")
    passed = worst <= bound
    print(f"{'PASSED' if passed else 'FAILED'}: TensorRT vs ONNX Runtime, worst rel L2 {worst:.3e} vs bound {bound:.3e}")
    return 0 if passed else 1


def _ort_timer(path: Path, args):
    from graphs.runtime import ort_session
    from loraq_export.evaluate.latency import ACCURACY_LEVEL, run_seconds
    from loraq_export.fit.parallel import default_workers
    model, profile = _profile(path, args)
    feed = feeds_at(model, profile.at(1))
    sess = ort_session(str(path), accuracy_level=ACCURACY_LEVEL, threads=default_workers(), spinning=False)
    return lambda: 1e3 * run_seconds(sess, feed)


def _trt_timer(path: Path, args):
    """(activate, time_once, deactivate) for an ONNX file (built in memory) or an engine, whose
    input shapes come from the ONNX of the same name beside it (as `engine build` writes it)."""
    from loraq_export.engine.trt import gpu_timer
    src = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    if not src.is_file():
        raise UserError(f"{path}: its input shapes come from its ONNX, and {src} does not exist; "
                        "keep the engine beside the ONNX it was built from")
    model, profile = _profile(src, args)
    return gpu_timer(path, profile, feeds_at(model, profile.at(1)), path.parent / "timing.cache")


def _time_tensorrt(paths: list, args) -> list:
    from loraq_export.engine.trt import require_tensorrt
    from loraq_export.evaluate.latency import interleaved
    require_tensorrt()
    parts = [_trt_timer(p, args) for p in paths]
    try:
        for activate, _, _ in parts:
            activate()
        return interleaved([t for _, t, _ in parts], args.rounds, args.warmup)
    finally:
        for _, _, deactivate in parts:
            deactivate()


def cmd_bench(args) -> int:
    from loraq_export.evaluate.latency import interleaved, percentiles
    if args.rounds < 1 or args.warmup < 0:
        raise UserError("--rounds must be at least 1 and --warmup at least 0")
    paths = [args.model] + ([args.baseline] if args.baseline is not None else [])
    if args.backend == "ort":
        times = interleaved([_ort_timer(p, args) for p in paths], args.rounds, args.warmup)
        note = "ONNX Runtime CPU, wall time per run (MatMulNBits accuracy level 4)"
    else:
        times = _time_tensorrt(paths, args)
        note = "TensorRT GPU compute time (CUDA events around execute_async_v3, no copies)"
    stats = [percentiles(t) for t in times]
    print(f"{note}; {args.rounds} interleaved rounds after {args.warmup} warm-up")
    for p, s in zip(paths, stats):
        print(f"{p}: median {s['median_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms")
    if len(stats) == 2:
        print(f"ratio {args.model.name} / {args.baseline.name}: {stats[0]['median_ms'] / stats[1]['median_ms']:.3f} "
              "(median over median)")
    return 0
