"""Write a text encoder preset (published config, seeded random weights) as a transformers folder
in a 16-bit dtype, with a tokenizer beside it: what a user's downloaded encoder looks like, at
full size, without a download.

    python tools/write_text_encoder_folder.py t5-v1_1-xxl t5xxl                 # 4.76B, bfloat16, 9.5 GB
    python tools/write_text_encoder_folder.py gemma-2-2b gemma2 --num-layers 2

The model is the preset by name, built in the 16-bit dtype (``build_stored`` in
models/text_encoders.py: no float32 copy is ever held; Linear weights N(0, 1/fan_in), embeddings
N(0, 1), norms at their initial value; what transformers keeps in float32 when it loads that dtype
is float32: T5's ``wo`` in a float16 folder, nothing in a bfloat16 one), so quantizing the folder or the preset by name
gives the same results. The tokenizer is the small offline one of models/random_text_encoders.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]

from loraq_export.models.random_text_encoders import build_gemma_tokenizer, build_t5_tokenizer  # noqa: E402
from loraq_export.models.text_encoder_presets import text_encoder_preset  # noqa: E402
from loraq_export.models.text_encoders import build_stored  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("out")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        print(f"error: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    t = time.perf_counter()
    cls_name, config = text_encoder_preset(args.preset, args.num_layers)
    model = build_stored(cls_name, config, args.seed, DTYPES[args.dtype])
    params = sum(p.numel() for p in model.parameters())
    tmp = f"{args.out}.partial"
    model.save_pretrained(tmp, max_shard_size="2GB")
    (build_t5_tokenizer() if cls_name == "T5EncoderModel" else build_gemma_tokenizer()).save_pretrained(tmp)
    os.replace(tmp, args.out)
    keep32 = sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.dtype == torch.float32}) or ["nothing"]
    print(f"{args.preset}: {params / 1e9:.3f}B parameters, {args.dtype} ({', '.join(keep32)} float32) "
          f"-> {args.out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
