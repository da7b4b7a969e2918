"""Benchmark the branch fusion passes in ONNX Runtime (CPU) on a stack of PixArt-Sigma-shaped layers.

    python tools/bench_fusion.py [--tokens 1024] [--layers 3] [--repeats 20] [--branch w4a16]

Layers cycle through PixArt-Sigma's Linear shapes (hidden 1152, MLP 4608): 1152->1152 (attention),
1152->4608 (fc1), 4608->1152 (fc2), chained so one feeds the next; random INT4 codes (W4 main
path, A16 activations, groups of --group along the input dim), written by graphs.qdq exactly as
the export path writes them. Configs: FP32 (MatMul + Add), W4 main only, and per rank W4 + branch
unfused (graphs.passes.NO_FUSE_PASSES) and fused (DEFAULT_PASSES); every quantized graph then goes
through the 'ort' legalizer, as `loraq export --target ort` does (which also runs branch factors
of rank <= 64 as fp32 GEMMs: see graphs/targets/ort.py). ONNX Runtime CPU, --threads
intra-op threads, MatMulNBits accuracy_level 4 (int8 compute inside the kernel: ORT's default,
for speed). Configs run interleaved (each round runs every config once, the order rotating) and
the table gives medians over rounds; a ratio is the median over rounds of the two configs' times
in the same round (paired: drifts in machine load cancel), all from this one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

import onnx_graphsurgeon as gs  # noqa: E402

from docs_section import publish  # noqa: E402
from graphs.nodes import quiet  # noqa: E402
from graphs.passes import DEFAULT_PASSES, NO_FUSE_PASSES, apply_passes, run_passes, to_model  # noqa: E402
from graphs.passes.fold_up import fold_up  # noqa: E402
from graphs.lora_slots import overridable  # noqa: E402
from graphs.runtime import ort_session  # noqa: E402
from graphs.synthetic import chain_model, fp32_chain, layer_spec  # noqa: E402
from graphs.targets import legalize  # noqa: E402

PIXART = [(1152, 1152), (1152, 4608), (4608, 1152)]
FORMS = {"fuse_down only": ["share_act_quant", "fuse_down", "cleanup"],
         "bias_first only": ["share_act_quant", "bias_first", "cleanup"]}


def session(model, threads: int, accuracy_level: int = 4, spin: bool = False):
    return ort_session(model, accuracy_level=accuracy_level, threads=threads, spinning=spin)


def fold_up_everywhere(model):
    """fold_up on every layer it can take, K > N included (the default leaves those to fuse_down)."""
    with quiet():
        graph = run_passes(gs.import_onnx(model), ["share_act_quant"])
        fold_up(graph, max_k_over_n=None)
        graph = run_passes(graph, ["cleanup"])
    return to_model(graph, model)


def build(args) -> dict:
    shapes = [PIXART[i % 3] for i in range(args.layers)]
    widths = [shapes[0][0]] + [n for _, n in shapes]

    def chain(rank, slot=0):
        specs = [layer_spec(k, n, rank, branch=args.branch, block=args.group, seed=i) for i, (k, n) in enumerate(shapes)]
        for s in specs if slot else []:  # an empty LoRA slot, as export --lora-slot writes it
            s.adapter_down = np.zeros((s.weight.k, slot), np.float16)
            s.adapter_up = np.zeros((slot, s.weight.n), np.float16)
        return chain_model(specs)

    models = {"FP32": fp32_chain(widths), "W4 main only": legalize(chain(0), "ort")}
    for r in args.ranks:
        plain = chain(r)
        models[f"W4 + r{r} branch, unfused"] = legalize(apply_passes(plain, NO_FUSE_PASSES), "ort")
        models[f"W4 + r{r} branch, fused"] = legalize(apply_passes(plain, DEFAULT_PASSES), "ort")
        for slot in args.lora_slot or []:
            with_slot = legalize(apply_passes(chain(r, slot), DEFAULT_PASSES), "ort")
            models[f"W4 + r{r} branch, fused, + r{slot} LoRA slot"] = with_slot
            models[f"W4 + r{r} branch, fused, + r{slot} LoRA slot, overridable (LoraSession)"] = overridable(with_slot)
        if args.forms:
            models[f"W4 + r{r} branch, fold_up on all layers"] = legalize(fold_up_everywhere(plain), "ort")
            for form, passes in FORMS.items():
                models[f"W4 + r{r} branch, {form}"] = legalize(apply_passes(plain, passes), "ort")
    return models


def cpu_busy(dt: float = 0.25) -> float:
    """Fraction of the machine's CPU time that was busy over ``dt`` seconds (Linux /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        time.sleep(dt)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit: float = 0.15, max_wait: float = 10.0) -> bool:
    """Wait (at most ``max_wait`` s) until other processes leave the CPUs idle; True if they did."""
    t = time.time()
    while time.time() - t < max_wait:
        if cpu_busy() < limit:
            return True
    return False


def measure(models: dict, args) -> tuple:
    x = np.random.default_rng(0).standard_normal((1, args.tokens, PIXART[0][0])).astype(np.float32)
    sessions = {k: session(m, args.threads, spin=args.spin) for k, m in models.items()}
    outs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}  # warm-up, and outputs to compare
    times = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    keys = list(sessions)
    busy = 0
    for rnd in range(args.repeats):
        busy += not wait_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else 0
        for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            t0, c0 = time.perf_counter(), time.process_time()
            sessions[k].run(None, {"x": x})
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    args.busy_rounds = busy
    return times, cpu, outs


def table(times: dict, cpu: dict) -> str:
    """Medians; each ratio is the median over rounds of the two configs' times in the same round
    (paired, so drifts in machine load cancel). CPU ms: process CPU time per run (all threads)."""
    w4, fp = np.asarray(times["W4 main only"]), np.asarray(times["FP32"])
    cw4 = np.asarray(cpu["W4 main only"])
    rows = ["| config | median ms | min ms | vs W4 only | vs FP32 | CPU ms | CPU vs W4 only |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in times.items():
        v, c = np.asarray(v), np.asarray(cpu[k])
        rows.append(f"| {k} | {np.median(v) * 1e3:.1f} | {v.min() * 1e3:.1f} | {np.median(v / w4):.3f} | "
                    f"{np.median(v / fp):.3f} | {np.median(c) * 1e3:.1f} | {np.median(c / cw4):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3, help="Linear layers, cycling attention, fc1, fc2")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds (each runs every config once)")
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--branch", default="w4a16", choices=["w4a16", "w4a8", "w4a4", "w8a8", "w6a6", "fp16"],
                   help="branch format: w4a16 = INT4 factors, unquantized activations (fusable with a W4A16 main)")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forms", action="store_true", help="also time each fusion pass alone")
    p.add_argument("--lora-slot", type=int, nargs="+", default=None, metavar="RANK",
                   help="also time the fused graph with an empty LoRA slot of each rank (export --lora-slot), as a "
                        "file and as a LoraSession graph (slots overridable, so ONNX Runtime does not fold them)")
    p.add_argument("--quiet-wait", type=float, default=2.0, help="before each round wait up to this many "
                   "seconds for the other processes on the machine to go idle (0: never wait)")
    p.add_argument("--spin", action="store_true", help="let ORT's intra-op threads spin (default off: on a "
                   "shared machine spinning threads fight other processes and the timings scatter)")
    p.add_argument("--write-docs", action="store_true", help="also write the result into docs/benchmarks.md")
    args = p.parse_args(argv)
    import onnxruntime as ort
    load0 = os.getloadavg()[0]
    t0 = time.time()
    models = build(args)
    times, cpu, outs = measure(models, args)
    lines = [f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads (spinning {'on' if args.spin else 'off'}), "
             f"MatMulNBits accuracy_level 4 (int8 compute in the kernel, for speed); {args.layers} PixArt-Sigma-shaped "
             f"layers, {args.tokens} tokens, W4A16 main g{args.group}, {args.branch} branch; median of {args.repeats} "
             f"interleaved rounds, paired ratios; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}, "
             f"{args.busy_rounds} round(s) started with other processes busy; {time.time() - t0:.0f} s", "",
             table(times, cpu), ""]
    x = np.random.default_rng(0).standard_normal((1, args.tokens, PIXART[0][0])).astype(np.float32)
    for r in args.ranks:
        for slot in args.lora_slot or []:
            fused_t = np.asarray(times[f"W4 + r{r} branch, fused"])
            for k in (f"W4 + r{r} branch, fused, + r{slot} LoRA slot",
                      f"W4 + r{r} branch, fused, + r{slot} LoRA slot, overridable (LoraSession)"):
                lines.append(f"{k} / W4 + r{r} branch, fused: paired median time ratio "
                             f"{np.median(np.asarray(times[k]) / fused_t):.3f}, CPU time "
                             f"{np.median(np.asarray(cpu[k]) / np.asarray(cpu[f'W4 + r{r} branch, fused'])):.3f}")
    for r in args.ranks:
        unfused, fused = models[f"W4 + r{r} branch, unfused"], models[f"W4 + r{r} branch, fused"]
        ref = session(unfused, args.threads, accuracy_level=0).run(None, {"x": x})[0]
        exact = session(fused, args.threads, accuracy_level=0).run(None, {"x": x})[0]
        rel = {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in
               (("fused, accuracy_level 0", exact), ("unfused, accuracy_level 4", outs[f"W4 + r{r} branch, unfused"]),
                ("fused, accuracy_level 4", outs[f"W4 + r{r} branch, fused"]))}
        lines.append(f"rank {r}: rel L2 vs the unfused graph at accuracy_level 0: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    publish("\n".join(lines), f"bench_fusion-{args.branch}" if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
