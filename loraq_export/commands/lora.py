"""LoRA options of ``loraq export`` / ``loraq quantize`` (--lora, --lora-scale, --lora-format,
--lora-slot) and the ``loraq lora set`` command. docs/lora.md is the user's guide."""
from __future__ import annotations

from pathlib import Path

from calibless.adapters import ADAPTER_FORMATS, empty_slot
from loraq_export.errors import UserError
from loraq_export.fit.lora import apply_adapters
from loraq_export.models.lora_files import read_adapters

MAX_SLOT_RANK = 1024


def add_lora_arguments(p, slot: bool = True) -> None:
    p.add_argument("--lora", action="append", default=None, metavar="FILE",
                   help="a LoRA adapter (.safetensors: peft/diffusers, older diffusers or kohya layout) to join the "
                        "quantized layers' low-rank terms (merged into the float weight of layers kept in high "
                        "precision); repeat for several")
    p.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                   help="the scale of each --lora, in order (default 1)")
    p.add_argument("--lora-format", choices=list(ADAPTER_FORMATS), default="fp16",
                   help="how adapter factors are stored: fp16 (default; docs/lora.md gives the measurement), int8 "
                        "(per channel, float activations) or branch (the layer's own branch format)")
    if slot:
        p.add_argument("--lora-slot", type=int, default=None, metavar="RANK",
                       help="write an empty adapter slot of this rank (zero fp16 factors) beside every quantized "
                            "layer, to fill at run time: loraq lora set, ONNX Runtime overrides, TensorRT refit")


def check_lora_options(opts) -> None:
    """Cheap checks before any loading or fitting."""
    if opts.lora_scale and not opts.lora:
        raise UserError("--lora-scale needs --lora FILE (one scale per file)")
    if opts.lora and opts.lora_scale and len(opts.lora_scale) > len(opts.lora):
        raise UserError(f"{len(opts.lora_scale)} --lora-scale values for {len(opts.lora)} --lora files; "
                        "give one scale per file")
    slot = getattr(opts, "lora_slot", None)
    if slot is not None:
        if not 1 <= slot <= MAX_SLOT_RANK:
            raise UserError(f"--lora-slot must be a rank from 1 to {MAX_SLOT_RANK}, got {slot}")
        if opts.lora:
            raise UserError("--lora-slot writes empty slots; drop --lora and fill the slots with 'loraq lora set'")


def read_user_adapters(opts, loaded) -> list:
    return read_adapters(opts.lora, opts.lora_scale, loaded.module, loaded.name) if opts.lora else []


def join_adapters(opts, loaded, records: dict, adapters: list) -> tuple[dict, dict]:
    """(records with the adapters or the empty slots, the report's "lora" section or {})."""
    records, report = apply_adapters(loaded.module, records, adapters, opts.lora_format)
    slot = getattr(opts, "lora_slot", None)
    if slot is not None:
        rotated = next((n for n, r in records.items() if r.rotation is not None), None)
        if rotated is not None:
            raise UserError(f"--lora-slot: layer {rotated} has an input rotation (-had), which slots do not "
                            "support yet; use a recipe without -had")
        too_small = next((n for n, r in records.items() if slot > min(r.in_features, r.out_features)), None)
        if too_small is not None:
            r = records[too_small]
            raise UserError(f"--lora-slot {slot} exceeds layer {too_small}'s {r.in_features}x{r.out_features}; "
                            "choose a rank at most its smaller side")
        records = {n: empty_slot(r, slot) for n, r in records.items()}
        report = {"slot": {"rank": slot, "layers": len(records), "format": "fp16",
                           "initializers": "<layer>.lora_down (in, rank), <layer>.lora_up (rank, out); "
                                           "listed in the model metadata 'loraq.lora_slots'"}}
    return records, report


def checkpoint_adapters(q: dict, fp) -> list:
    """The adapters a checkpoint was quantized with, read again for its FP original (empty when
    the files are gone: the report then says the reference lacks them)."""
    listed = ((q or {}).get("lora") or {}).get("adapters") or []
    if not listed or fp is None:
        return []
    try:
        return read_adapters([a["file"] for a in listed], [a["scale"] for a in listed], fp.module, fp.name)
    except UserError:
        return []


def add_lora_parser(sub) -> None:
    """``loraq lora set MODEL.onnx FILE [--scale S] --out NEW.onnx``."""
    lo = sub.add_parser("lora", help="LoRA adapters in an exported graph's slots (loraq export --lora-slot RANK)")
    ls = lo.add_subparsers(dest="lora_command", required=True, parser_class=type(lo))
    s = ls.add_parser("set", help="write LoRA adapters into the slots of a graph, as a new ONNX file (no re-export)")
    s.add_argument("onnx_file", type=Path, help="a model.onnx exported with --lora-slot RANK")
    s.add_argument("lora_files", type=Path, nargs="+", metavar="FILE",
                   help="LoRA adapter file(s); several concatenate along the rank (their ranks add up)")
    s.add_argument("--scale", type=float, action="append", default=None, metavar="S",
                   help="scale of each FILE, in order (default 1)")
    s.add_argument("--out", type=Path, required=True, help="the new ONNX file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=cmd_lora_set)


def cmd_lora_set(args) -> int:
    import time
    from graphs.lora_slots import fill_slots
    from loraq_export.commands.engine import _onnx
    from loraq_export.runtime.lora_session import graph_slots, slot_values
    from loraq_export.store.outputs import write_bytes_atomic
    t0 = time.perf_counter()
    out = args.out
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    if not out.resolve().parent.is_dir():
        raise UserError(f"folder {out.resolve().parent} does not exist; create it or choose another --out")
    if out.resolve() == args.onnx_file.resolve():
        raise UserError("--out must differ from the input graph; write a new file")
    model = _onnx(args.onnx_file)  # a readable ONNX model (external data not loaded), else one line
    from onnx import TensorProto
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UserError(f"{args.onnx_file} keeps its weights in an external data file, which lora set does not "
                        "rewrite yet; use the Python LoraSession instead")
    slots = graph_slots(model, args.onnx_file)
    values, adapters = slot_values(slots, args.lora_files, args.scale, str(args.onnx_file))
    fill_slots(model, values)
    write_bytes_atomic(out, model.SerializeToString())
    touched = sorted({n for a in adapters for n in a.layers})
    rank = next(iter(slots.values()))[2]
    print(f"loraq: {len(touched)} of {len(slots)} slots (rank {rank}) filled from "
          + ", ".join(f"{Path(a.path).name} x{a.scale:g} (r{'/'.join(map(str, a.ranks))})" for a in adapters)
          + f" -> {out} in {time.perf_counter() - t0:.2f} s")
    return 0
