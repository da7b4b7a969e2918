"""The weight memory of the full-size pipelines, per component, in float16 and quantized.

    python tools/pipeline_memory.py [--recipe w4a16-g64-r32-w8a8] [--method loraq] [pixart-sigma sana-1.6b ...]

Computed from the published configs (loraq_export/models/diffusion_presets.py and
text_encoder_presets.py): each component is built on the meta device (shapes, no weights) and
every quantized layer's stored bits come from its shape and the recipe (calibless/bits.py, the
count the export report gives for a fitted layer). Nothing is fitted; the VAE is not counted.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]
from loraq_export.evaluate.memory import format_memory, preset_pipeline_memory  # noqa: E402
from loraq_export.models.text_encoder_presets import PIPELINES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipelines", nargs="*", default=["pixart-sigma", "sana-1.6b"], choices=sorted(PIPELINES))
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--method", default=None)
    args = ap.parse_args()
    for p in args.pipelines:
        print(f"{p}:\n{format_memory(preset_pipeline_memory(p, args.recipe, args.method))}")


if __name__ == "__main__":
    main()
