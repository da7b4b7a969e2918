"""The ``loraq`` command line. Every user error ends as one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loraq_export.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block; main() adds the one "loraq: error: "
        raise UserError(f"{message} (see {self.prog} --help)")


def _recipe_help() -> str:
    """Every choice a recipe string takes, read from the formats themselves."""
    from calibless.formats import BRANCH_FORMATS, GROUP_SIZES, MAIN_FORMATS
    from loraq_export.fit.recipes import DEFAULT_BUDGET, DEFAULT_RECIPES
    groups = " | ".join(f"g{g}" for g in GROUP_SIZES if g) + " | gch (per channel)"
    return (f"recipe string <main>-g<group>[-ag<N>][-r<rank>-<branch>][-had<B>][-asym] (default "
            f"{DEFAULT_RECIPES['ort']} under --budget {DEFAULT_BUDGET:g}; --target tensorrt: {DEFAULT_RECIPES['tensorrt']} "
            f"under --budget {DEFAULT_BUDGET:g}), or a .yaml/.json recipe file; main: {' | '.join(MAIN_FORMATS)}; "
            f"group: {groups}; branch: {' | '.join(BRANCH_FORMATS)}; N, B: powers of two")


def _method_help() -> str:
    from calibless.methods import METHODS
    from loraq_export.fit.recipes import DEFAULT_METHOD
    return f"fitting method: {' | '.join(sorted(METHODS))} (default {DEFAULT_METHOD}; see docs/methods.md)"


def _model_help() -> str:
    from loraq_export.models.diffusion_presets import PRESETS
    from loraq_export.models.text_encoder_presets import TEXT_ENCODER_PRESETS
    return (f"'minilm' (default: the bundled all-MiniLM-L6-v2), a preset ({' | '.join(PRESETS)}; text encoders "
            f"{' | '.join(TEXT_ENCODER_PRESETS)}: published configs, seeded random weights), a local diffusers "
            "pipeline or transformer folder, or a local transformers folder (BERT-family, T5 encoder, Gemma-2)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=_model_help())
    p.add_argument("--recipe", default=None, help=_recipe_help())
    p.add_argument("--method", default=None, help=_method_help())
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--num-layers", type=int, default=None, help="presets only: build a shallower copy")
    p.add_argument("--seed", type=int, default=0, help="seed for preset weights and fitting (default 0)")
    p.add_argument("--workers", type=int, default=None, help="fitting processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--component", choices=["transformer", "text_encoder", "all"], default=None,
                   help="a pipeline folder or preset: quantize its transformer (the default for a folder), its text "
                        "encoder (T5EncoderModel, Gemma2Model), or all: each in its own subfolder of --out, with a "
                        "memory table")
    p.add_argument("--budget", type=float, default=None, metavar="BITS",
                   help="bits per weight over the quantized layers (as the report counts them): allocate each layer's "
                        "group size, branch rank and format under it (written to OUT/allocation.yaml); without "
                        "--recipe the default budget applies (see --recipe), with --recipe none")
    from loraq_export.commands.lora import add_lora_arguments
    add_lora_arguments(p, slot=p.prog.endswith("export"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loraq", description="Data-free 4-bit quantization with a quantized low-rank branch, "
                                               "exported as QDQ ONNX and validated in ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ex = sub.add_parser("export", help="quantize (or load a checkpoint), export QDQ ONNX, validate in ONNX Runtime")
    _add_common(ex)
    ex.add_argument("--fp-onnx", action="store_true", help="also write the unquantized graph as model_fp.onnx")
    ex.add_argument("--no-quality", action="store_true", help="skip the end-to-end quality evaluation")
    ex.add_argument("--target", choices=["ort", "tensorrt"], default="ort",
                    help="legalize the graph for ONNX Runtime (default) or TensorRT")
    ex.add_argument("--no-fuse", action="store_true", help="keep the low-rank branch unfused (for comparison, debugging)")
    ex.add_argument("--convert", action="store_true",
                    help="tensorrt: convert what TensorRT cannot run (4-bit activations become INT8) instead of refusing")
    ex.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                    help="float type of the whole graph (default: fp16 for --target tensorrt, fp32 for ort)")
    ex.set_defaults(func=cmd_export)
    ck = sub.add_parser("check", help="check an ONNX file against a target's rules; exit 0 if it passes, 1 if not")
    ck.add_argument("onnx_file", type=Path)
    ck.add_argument("--target", choices=["ort", "tensorrt"], default="ort")
    ck.set_defaults(func=cmd_check)
    qu = sub.add_parser("quantize", help="fit the quantized layers and write a checkpoint (resumable; "
                                         "shardable with torchrun --nproc-per-node N -m loraq_export.cli quantize ...)")
    _add_common(qu)
    qu.add_argument("--target", choices=["ort", "tensorrt"], default="ort",
                    help="the runtime the checkpoint is for: ort (default) fits symmetric grids with signed scales, "
                         "tensorrt with positive ones (its rule)")
    qu.set_defaults(func=cmd_quantize)
    _add_bench(sub)
    from loraq_export.commands.engine import add_engine_parser
    add_engine_parser(sub)
    from loraq_export.commands.generate import add_generate_parser; add_generate_parser(sub)  # noqa: E702
    from loraq_export.commands.lora import add_lora_parser; add_lora_parser(sub)  # noqa: E702
    return parser


def _add_bench(sub) -> None:
    be = sub.add_parser("bench", help="fit, export and measure every (method, recipe) pair; tables and a plot of "
                                      "quality against bits (resumable; shardable with torchrun like quantize)")
    be.add_argument("model", nargs="?", default=None, help=_model_help())
    from loraq_export.commands.bench import DEFAULT_METHODS, DEFAULT_RECIPES, all_methods
    be.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(all_methods())} (ort-rtn: "
                                                    f"ONNX Runtime's quantizer); default {DEFAULT_METHODS}")
    be.add_argument("--recipes", default=None, help=f"comma-separated recipe strings as for export --recipe, each "
                                                    f"optionally <recipe>@<bits> (default {DEFAULT_RECIPES})")
    be.add_argument("--out", type=Path, default=Path("loraq-bench"),
                    help="output directory (default loraq-bench); re-running with the same one skips finished pairs")
    be.add_argument("--latency", action="store_true", help="also time each model against FP in ONNX Runtime (slow)")
    be.add_argument("--budget", default=None, metavar="BITS[,BITS...]",
                    help="also fit each method x recipe allocated per layer under each budget (bits per weight), "
                         "shown as <recipe>@<bits>; ort-rtn keeps the plain recipes")
    be.add_argument("--sentences", type=Path, default=None, metavar="FILE",
                    help="sentence encoders: measure on these sentences (one per line) instead of the bundled ones")
    be.add_argument("--num-layers", type=int, default=None, help="presets only: build a shallower copy")
    be.add_argument("--seed", type=int, default=0, help="seed for preset weights and fitting (default 0)")
    be.add_argument("--workers", type=int, default=None, help="fitting processes (default: one per core)")
    be.add_argument("--no-progress", action="store_true", help="no progress bar")
    be.set_defaults(func=cmd_bench)


def _options(args, default_out: str):
    from loraq_export.options import Options
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    return Options(model=args.model, recipe=args.recipe, method=args.method, out=args.out or Path(default_out),
                   overwrite=args.overwrite, fp_onnx=getattr(args, "fp_onnx", False), num_layers=args.num_layers,
                   seed=args.seed, workers=args.workers, progress=not args.no_progress,
                   quality=not getattr(args, "no_quality", False), target=getattr(args, "target", "ort"),
                   fuse=not getattr(args, "no_fuse", False), convert=getattr(args, "convert", False),
                   budget=args.budget, dtype=getattr(args, "dtype", None), component=args.component, lora=args.lora,
                   lora_scale=args.lora_scale, lora_format=args.lora_format, lora_slot=getattr(args, "lora_slot", None))


def cmd_export(args) -> int:
    from loraq_export.commands.export import run_export
    opts = _options(args, "loraq-out")
    if opts.component == "all":
        from loraq_export.commands.components import run_components
        run_components(opts, run_export)
        return 0
    run_export(opts)
    return 0


def cmd_check(args) -> int:
    from loraq_export.commands.check import run_check
    return run_check(args.onnx_file, args.target)  # bad files end as one clear line


def cmd_quantize(args) -> int:
    from loraq_export.commands.quantize import run_quantize
    opts = _options(args, "loraq-ckpt")
    if opts.component == "all":
        from loraq_export.commands.components import run_components
        run_components(opts, run_quantize)
        return 0
    run_quantize(opts)
    return 0


def cmd_bench(args) -> int:
    import shlex
    from loraq_export.commands.bench import DEFAULT_METHODS, DEFAULT_RECIPES, BenchOptions, run_bench
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    argv = sys.argv[1:] if args.argv is None else args.argv
    run_bench(BenchOptions(model=args.model, methods=args.methods or DEFAULT_METHODS,
                           recipes=args.recipes or DEFAULT_RECIPES, out=args.out,
                           num_layers=args.num_layers, seed=args.seed, workers=args.workers, latency=args.latency,
                           budgets=args.budget, sentences=args.sentences,
                           progress=not args.no_progress, command=" ".join(["loraq", *map(shlex.quote, argv)])))
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except UserError as e:
        print(f"loraq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args is not None and args.command == "bench":
            print("loraq: interrupted; finished pairs are kept: re-run the same command to resume", file=sys.stderr)
        elif args is not None and args.command == "quantize":
            print("loraq: interrupted; the output was not written, finished layers are kept: "
                  "re-run the same command to resume", file=sys.stderr)
        else:
            print("loraq: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
