"""Time each graph form of one layer's low-rank branch in ONNX Runtime CPU, shape by shape.

    python tools/bench_branch_forms.py 1152 4608 [--rounds 31] [--ranks 32 64]

Builds raw ONNX graphs (MatMulNBits written directly, random INT4 codes) for one K x N layer at
1024 tokens: the W4 main GEMM alone ('base') and, per rank, the branch as
  foldup_mnb / foldup_f32   x @ A (MatMulNBits / fp32), Concat [x | h], one MatMulNBits over K + r
  fusedown_add              one MatMulNBits of N + r columns, Split, fp32 h @ B, Add
  fusedown_gemm             the same with Gemm(h, B, C = y0) instead of MatMul + Add
  unfused / unfused_gemm    MatMulNBits main, fp32 x @ A and h @ B, Add (or Gemm with C)
Forms run interleaved; each line gives the median ms and the median paired ratio to 'base'.
This is how the default passes (fold_up where K <= N, fuse_down where K > N) and the ort
legalizer's fp32 factors were chosen; numbers scatter by about 2 points on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]
from docs_section import publish  # noqa: E402
from graphs.constants import OPSET  # noqa: E402
from graphs.runtime import ort_session  # noqa: E402

M = 1024


class Builder:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.rng = [], [], np.random.default_rng(seed)

    def const(self, name: str, a) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def nbits(self, x: str, y: str, k: int, n: int, block: int = 64) -> None:
        blocks = -(-k // block)
        w = self.const(f"{y}.w", self.rng.integers(0, 255, (n, blocks, block // 2), dtype=np.uint8))
        s = self.const(f"{y}.s", (self.rng.random(n * blocks) * 0.01 + 0.001).astype(np.float32))
        self.nodes.append(helper.make_node("MatMulNBits", [x, w, s], [y], domain="com.microsoft", K=k, N=n,
                                           bits=4, block_size=block, accuracy_level=4))

    def fp32(self, x: str, y: str, k: int, n: int) -> None:
        w = self.const(f"{y}.w", (self.rng.standard_normal((k, n)) * 0.03).astype(np.float32))
        self.nodes.append(helper.make_node("MatMul", [x, w], [y]))

    def up_and_add(self, h: str, y0: str, n: int, r: int, gemm: bool) -> None:
        if not gemm:
            self.fp32(h, "u", r, n)
            self.nodes.append(helper.make_node("Add", [y0, "u"], ["y"]))
            return
        shapes = {k: self.const(k, np.array(v, np.int64)) for k, v in (("s_h", [M, r]), ("s_y", [M, n]), ("s_out", [1, M, n]))}
        b = self.const("b.w", (self.rng.standard_normal((r, n)) * 0.03).astype(np.float32))
        self.nodes += [helper.make_node("Reshape", [h, shapes["s_h"]], ["h2"]),
                       helper.make_node("Reshape", [y0, shapes["s_y"]], ["y02"]),
                       helper.make_node("Gemm", ["h2", b, "y02"], ["y2"]),
                       helper.make_node("Reshape", ["y2", shapes["s_out"]], ["y"])]

    def model(self, k: int):
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, M, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def build(form: str, k: int, n: int, r: int):
    b = Builder()
    if form == "base":
        b.nbits("x", "y", k, n)
    elif form.startswith("foldup"):
        (b.nbits if form == "foldup_mnb" else b.fp32)("x", "h", k, r)
        b.nodes.append(helper.make_node("Concat", ["x", "h"], ["c"], axis=-1))
        b.nbits("c", "y", k + r, n)
    elif form.startswith("fusedown"):
        b.nbits("x", "z", k, n + r)
        b.nodes.append(helper.make_node("Split", ["z", b.const("sizes", np.array([n, r], np.int64))], ["y0", "h"], axis=-1))
        b.up_and_add("h", "y0", n, r, gemm=form == "fusedown_gemm")
    elif form.startswith("unfused"):
        b.nbits("x", "y0", k, n)
        b.fp32("x", "h", k, r)
        b.up_and_add("h", "y0", n, r, gemm=form == "unfused_gemm")
    else:
        raise ValueError(form)
    return b.model(k)


FORMS = ("foldup_mnb", "foldup_f32", "fusedown_add", "fusedown_gemm", "unfused", "unfused_gemm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("k", type=int)
    p.add_argument("n", type=int)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true", help="also write the result into docs/benchmarks.md")
    args = p.parse_args(argv)
    keys = [("base", 0)] + [(f, r) for r in args.ranks for f in FORMS]
    sessions = {key: ort_session(build(key[0], args.k, args.n, key[1]), accuracy_level=4, threads=args.threads,
                                 spinning=False) for key in keys}
    x = np.random.default_rng(1).standard_normal((1, M, args.k)).astype(np.float32)
    times = {key: [] for key in keys}
    for s in sessions.values():
        s.run(None, {"x": x})
    for rnd in range(args.rounds):
        for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            t0 = time.perf_counter()
            sessions[key].run(None, {"x": x})
            times[key].append(time.perf_counter() - t0)
    base = np.asarray(times[("base", 0)])
    rows = ["| layer | form | median ms | vs W4 main only |", "|---|---|---:|---:|"]
    for (form, r), t in times.items():
        t = np.asarray(t)
        label = form if not r else f"{form} r{r}"
        rows.append(f"| {args.k}x{args.n} | {label} | {np.median(t) * 1e3:.2f} | {100 * (np.median(t / base) - 1):+.1f}% |")
    publish("\n".join(rows), f"bench_branch_forms-{args.k}x{args.n}" if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
