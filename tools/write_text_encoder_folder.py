"""Write a text encoder preset (published config, seeded random weights) as a transformers folder
in a 16-bit dtype, with a tokenizer beside it: what a user's downloaded encoder looks like, at
full size, without a download.

    python tools/write_text_encoder_folder.py t5-v1_1-xxl t5xxl                 # 4.76B, bfloat16, 11 GB
    python tools/write_text_encoder_folder.py gemma-2-2b gemma2 --num-layers 2

Built on the meta device and filled in place (no float32 copy of the model is ever held), Linear
weights N(0, 1/fan_in) and embeddings N(0, 1) as the presets (models/text_encoders.py, ``reinit_``),
norm weights at their initial value; the layers the class keeps in float32
(``_keep_in_fp32_modules``: T5's ``wo``) are written in float32, as transformers saves them. The
tokenizer is the small offline one of models/random_text_encoders.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]

from loraq_export.models.random_text_encoders import build_gemma_tokenizer, build_t5_tokenizer  # noqa: E402
from loraq_export.models.stored_dtype import kept_in_float32  # noqa: E402
from loraq_export.models.text_encoder_presets import text_encoder_preset  # noqa: E402
from loraq_export.models.text_encoders import config_for, reinit_, transformers_class  # noqa: E402

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
    with torch.device("meta"):
        model = transformers_class(cls_name)(config_for(cls_name, config))
    model = model.to(DTYPES[args.dtype]).to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and kept_in_float32(model, name):
                mod.float()
            elif not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                for p in mod.parameters(recurse=False):
                    # the norms' initial values: T5LayerNorm scales by w (ones), Gemma2RMSNorm by 1 + w (zeros)
                    p.fill_(0.0 if cls_name == "Gemma2Model" else 1.0)
    reinit_(model, args.seed)
    params = sum(p.numel() for p in model.parameters())
    tmp = f"{args.out}.partial"
    model.save_pretrained(tmp, max_shard_size="2GB")
    (build_t5_tokenizer() if cls_name == "T5EncoderModel" else build_gemma_tokenizer()).save_pretrained(tmp)
    os.replace(tmp, args.out)
    keep32 = ", ".join(model._keep_in_fp32_modules or ()) or "nothing"
    print(f"{args.preset}: {params / 1e9:.3f}B parameters, {args.dtype} ({keep32} float32) "
          f"-> {args.out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
