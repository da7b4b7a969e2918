"""How a LoRA adapter's factors should be stored beside a quantized layer: fp16, INT8 or the branch's format.

    python tools/bench_lora_storage.py FOLDER [--recipe w4a8-g32-r8-w8a8] [--rank 8] [--strength 0.1]

Quantizes FOLDER (a diffusers transformer folder) once, then for each storage format loads the
same rank --rank LoRA (loraq_export/models/synthetic_lora.py's synthetic adapter on attention and feed-forward
layers, B A = --strength x the weight's norm) with load_lora and prints: the adapter term's own
relative error against its float product (mean over layers), the model output's relative L2 to
the FP model with the LoRA merged in float, as a ratio to the plain quantized model's distance
from FP, and the adapter's bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]
from loraq_export.models.synthetic_lora import lora_factors, merge_in_float, save_peft  # noqa: E402
from loraq_export import load_lora, load_quantized_model, unload_lora  # noqa: E402
from loraq_export.commands.quantize import run_quantize  # noqa: E402
from loraq_export.fit.swap import LoraqLinear  # noqa: E402
from loraq_export.models import load_model  # noqa: E402
from loraq_export.models.diffusion import DiffusionWrapper  # noqa: E402
from loraq_export.options import Options  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--recipe", default="w4a8-g32-r8-w8a8")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--strength", type=float, default=0.1)
    args = p.parse_args(argv)
    fp = load_model(args.folder)
    ins = [fp.make_inputs(seed=s, batch=2) for s in (7, 8)]

    def run(w):
        with torch.no_grad():
            return [w(*i).numpy() for i in ins]

    def rel(a, b):
        return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))

    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "ckpt"
        run_quantize(Options(model=args.folder, recipe=args.recipe, out=ck, workers=1, progress=False), echo=lambda *a: None)
        q = load_quantized_model(ck)
        wq = DiffusionWrapper(q)
        base = rel(run(wq), run(fp.wrapper))
        f = lora_factors(fp.module, rank=args.rank, seed=4, strength=args.strength)
        path = save_peft(Path(tmp) / "lora.safetensors", f)
        merge_in_float(fp.module, f, 1.0)
        ref = run(fp.wrapper)
        print(f"{args.folder}, {args.recipe}, rank-{args.rank} LoRA on {len(f)} layers (strength {args.strength}); "
              f"plain quantized model vs FP: rel L2 {base:.4f}")
        print("| storage | adapter term error (mean rel) | output vs FP+LoRA | ratio to plain | adapter bytes |")
        print("|---|---:|---:|---:|---:|")
        for fmt in ("fp16", "int8", "branch"):
            rep = load_lora(q, path, 1.0, fmt)
            errs = []
            for name, m in q.named_modules():
                if isinstance(m, LoraqLinear) and m.record.adapter is not None:
                    a, b = f[name]
                    want = (b.double() @ a.double()).T
                    got = m.record.adapter.down_weight().double() @ m.record.adapter.up_weight().double()
                    errs.append(float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
            out = rel(run(wq), ref)
            unload_lora(q)
            print(f"| {fmt} ({rep['quantized_layers'][next(iter(rep['quantized_layers']))]['format']}) | "
                  f"{np.mean(errs):.2e} | {out:.4f} | {out / base:.3f} | {rep['adapter_bytes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
