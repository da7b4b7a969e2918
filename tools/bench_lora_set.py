"""Time ``loraq lora set`` and ``LoraSession.set_lora`` on a PixArt-Sigma-sized slot graph.

    python tools/bench_lora_set.py [--layers 84] [--slot 16] [--rank 8] [--rounds 3]

Builds, with graphs.synthetic (random INT4 codes, written by graphs.qdq as the export writes
them), a chain of --layers Linear layers cycling PixArt-Sigma's shapes (1152x1152, 1152x4608,
4608x1152; 84 = 28 blocks x 3 shapes, ~330M weights) with an empty rank --slot adapter slot beside
each, and a rank --rank LoRA on every layer; then times, median over --rounds: the whole
``loraq lora set`` command (read the graph, read the LoRA, fill, write the new file) and
``LoraSession.set_lora`` (read the LoRA, compute the fp16 slot values) on a live session.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]
from graphs.synthetic import chain_model, layer_spec  # noqa: E402
from loraq_export.cli import main as loraq  # noqa: E402

PIXART = [(1152, 1152), (1152, 4608), (4608, 1152)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=84)
    p.add_argument("--slot", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    shapes = [PIXART[i % 3] for i in range(args.layers)]
    specs = []
    for i, (k, n) in enumerate(shapes):
        s = layer_spec(k, n, 32, branch="w4a16", seed=i)
        s.adapter_down, s.adapter_up = np.zeros((k, args.slot), np.float16), np.zeros((args.slot, n), np.float16)
        specs.append(s)
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for i, (k, n) in enumerate(shapes):
        lora[f"transformer.l{i}.lora_A.weight"] = torch.randn(args.rank, k, generator=gen) / k ** 0.5
        lora[f"transformer.l{i}.lora_B.weight"] = torch.randn(n, args.rank, generator=gen) * 0.01
    with tempfile.TemporaryDirectory() as tmp:
        src, lf, out = Path(tmp) / "model.onnx", Path(tmp) / "lora.safetensors", Path(tmp) / "set.onnx"
        model = chain_model(specs)
        onnx.save(model, str(src))
        save_file(lora, str(lf))
        size = src.stat().st_size
        set_times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            assert loraq(["lora", "set", str(src), str(lf), "--out", str(out), "--overwrite"]) == 0
            set_times.append(time.perf_counter() - t0)
        from loraq_export.runtime.lora_session import LoraSession
        sess = LoraSession(src)
        swap = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            sess.set_lora(lf, 0.8)
            swap.append(time.perf_counter() - t0)
    print(f"{args.layers} PixArt-Sigma-shaped layers ({sum(k * n for k, n in shapes) / 1e6:.0f}M weights, "
          f"model.onnx {size / 2**20:.0f} MiB), rank-{args.slot} slots, rank-{args.rank} LoRA on every layer:")
    print(f"  loraq lora set (read, fill, write): median {np.median(set_times):.2f} s over {args.rounds}")
    print(f"  LoraSession.set_lora (live session): median {np.median(swap):.3f} s over {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
